// How the simulator calls a kernel: the launch passes an array of pointers to the argument
// values (cuLaunchKernel's convention), which Kernel<F>::invoke unpacks into a call of F.
// `signature` names each parameter's kind (P pointer, I 4-byte integer, L 8-byte integer,
// F float, D double) so that the Rust side can check a launch's arguments against the kernel.
#pragma once

#include <cstddef>
#include <type_traits>
#include <utility>

namespace cudasim {
struct Entry {
    const char* name;
    void (*invoke)(void**);
    const char* signature;
};

template <class T>
constexpr char kind() {
    if constexpr (std::is_pointer_v<T>) return 'P';
    else if constexpr (std::is_floating_point_v<T>) return sizeof(T) == 4 ? 'F' : 'D';
    else return sizeof(T) == 8 ? 'L' : 'I';
}

template <class... A, std::size_t... I>
void call(void (*f)(A...), void** a, std::index_sequence<I...>) {
    f(*static_cast<A*>(a[I])...);
}

template <auto F>
struct Kernel;

template <class... A, void (*F)(A...)>
struct Kernel<F> {
    static void invoke(void** a) { call(F, a, std::index_sequence_for<A...>{}); }
    static constexpr char signature[] = {kind<A>()..., 0};
};
}  // namespace cudasim
