// The simulator's scheduler. A launch runs its blocks one after another; the threads of a block
// are fibers (ucontext) that each run until they reach __syncthreads, a warp rendezvous
// (__syncwarp, a shuffle, a ballot) or their end. A barrier opens once every thread it waits for
// has reached it; when none can open and no fiber can run, the launch fails with a deadlock
// report instead of hanging. Fibers run in alternating forward and backward order between
// barriers, so a read that races with another thread's write is likely to see the wrong value.
#include <ucontext.h>

#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "cuda_sim.h"
#include "launch_table.h"

extern "C" const cudasim::Entry cudasim_table[];

#if defined(__x86_64__)
#define CUDASIM_FAST_SWITCH 1
// Saves the callee-saved registers on the current stack, stores the stack pointer in *save,
// and resumes the context whose stack pointer is `to` (System V ABI: rbx, rbp, r12-r15).
extern "C" void cudasim_switch(void** save, void* to);
asm(R"(
    .text
    .p2align 4
    .globl cudasim_switch
    .hidden cudasim_switch
    .type cudasim_switch, @function
cudasim_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size cudasim_switch, .-cudasim_switch
)");
#endif

namespace cudasim {
thread_local uint3 thread_idx, block_idx, block_dim, grid_dim;

namespace {
enum class State { Ready, AtBarrier, AtRendezvous, Done };

struct Fiber {
#ifdef CUDASIM_FAST_SWITCH
    void* sp;
#else
    ucontext_t ctx;
#endif
    State state;
    unsigned mask;     // lanes of the pending warp rendezvous
    uint64_t offered;  // the value this lane offers to a shuffle
    bool pred;         // this lane's ballot predicate
    // cp.async copies not yet done (they land at the cp.async.wait_group that waits for their
    // group, so a read before it sees the old contents), and the groups committed so far.
    struct AsyncCopy {
        void* dst;
        const void* src;
        unsigned size, src_bytes;
        unsigned group;
    };
    std::vector<AsyncCopy> in_flight;
    unsigned committed = 0;
};

constexpr size_t kStack = 64 * 1024;
constexpr unsigned kMaxThreads = 1024;
constexpr unsigned kMaxShared = 227 * 1024;  // an H100's opt-in limit per block

struct Block {
    std::vector<Fiber> fibers;
    std::unique_ptr<char[]> stacks;
    size_t stack_fibers = 0;
#ifdef CUDASIM_FAST_SWITCH
    void* scheduler_sp = nullptr;
#else
    ucontext_t scheduler;
#endif
    unsigned current = 0;
    void (*invoke)(void**) = nullptr;
    void** args = nullptr;
    std::vector<unsigned char> shared;
    std::string trapped;  // why a thread trapped (the launch then fails)
};

thread_local Block blk;
// Static shared arrays seen so far on this OS thread (their address and size).
thread_local std::vector<std::pair<void*, unsigned long>> tracked_shared;

#ifdef CUDASIM_FAST_SWITCH
[[noreturn]] void fiber_entry() {
    blk.invoke(blk.args);
    Fiber& f = blk.fibers[blk.current];
    f.state = State::Done;
    cudasim_switch(&f.sp, blk.scheduler_sp);  // never resumed
    __builtin_unreachable();
}

// A fresh fiber's stack as cudasim_switch leaves it: six zero registers, then fiber_entry as
// the return address and a slot above it, so that fiber_entry starts with the stack aligned
// as after a call.
void init_fiber(Fiber& f, char* stack) {
    auto top = reinterpret_cast<uintptr_t>(stack + kStack) & ~uintptr_t(15);
    void** sp = reinterpret_cast<void**>(top) - 8;
    for (int i = 0; i < 6; i++) sp[i] = nullptr;
    sp[6] = reinterpret_cast<void*>(&fiber_entry);
    sp[7] = nullptr;
    f.sp = sp;
}

void resume(Fiber& f) { cudasim_switch(&blk.scheduler_sp, f.sp); }

void yield(State s) {
    Fiber& f = blk.fibers[blk.current];
    f.state = s;
    cudasim_switch(&f.sp, blk.scheduler_sp);
}
#else
void fiber_entry() {
    blk.invoke(blk.args);
    blk.fibers[blk.current].state = State::Done;
    // Returning resumes uc_link: the scheduler.
}

void init_fiber(Fiber& f, char* stack) {
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = stack;
    f.ctx.uc_stack.ss_size = kStack;
    f.ctx.uc_link = &blk.scheduler;
    makecontext(&f.ctx, fiber_entry, 0);
}

void resume(Fiber& f) { swapcontext(&blk.scheduler, &f.ctx); }

void yield(State s) {
    Fiber& f = blk.fibers[blk.current];
    f.state = s;
    swapcontext(&f.ctx, &blk.scheduler);
}
#endif

void set_thread_idx(unsigned i) {
    thread_idx.x = i % block_dim.x;
    thread_idx.y = (i / block_dim.x) % block_dim.y;
    thread_idx.z = i / (block_dim.x * block_dim.y);
}

const char* state_name(State s) {
    switch (s) {
        case State::Ready: return "running";
        case State::AtBarrier: return "at __syncthreads";
        case State::AtRendezvous: return "at a warp rendezvous";
        case State::Done: return "finished";
    }
    return "?";
}

// Lanes of a rendezvous whose every partner has arrived may go on.
bool release_rendezvous(unsigned n) {
    // Per warp: the lanes that exist and the lanes waiting at a rendezvous.
    unsigned warps = (n + 31) / 32;
    std::vector<unsigned> exists(warps, 0), waiting(warps, 0);
    for (unsigned i = 0; i < n; i++) {
        exists[i / 32] |= 1u << (i % 32);
        if (blk.fibers[i].state == State::AtRendezvous) waiting[i / 32] |= 1u << (i % 32);
    }
    std::vector<unsigned> go;
    for (unsigned i = 0; i < n; i++) {
        const Fiber& f = blk.fibers[i];
        if (f.state == State::AtRendezvous && (f.mask & exists[i / 32] & ~waiting[i / 32]) == 0) go.push_back(i);
    }
    for (unsigned i : go) blk.fibers[i].state = State::Ready;
    return !go.empty();
}

std::string deadlock_report(unsigned n) {
    std::string r = "deadlock in block (" + std::to_string(block_idx.x) + "," + std::to_string(block_idx.y) + "," +
                    std::to_string(block_idx.z) + "):";
    for (State s : {State::AtBarrier, State::AtRendezvous, State::Done}) {
        unsigned count = 0, first = 0;
        for (unsigned i = 0; i < n; i++)
            if (blk.fibers[i].state == s && count++ == 0) first = i;
        if (count)
            r += " " + std::to_string(count) + " thread(s) " + state_name(s) + " (the first: thread " +
                 std::to_string(first) + ");";
    }
    return r + " some threads never reach the barrier or shuffle the others wait at";
}

bool run_block(unsigned n, std::string& err) {
    if (blk.stack_fibers < n) {
        blk.stacks.reset(new char[n * kStack]);
        blk.stack_fibers = n;
    }
    blk.fibers.assign(n, Fiber{});
    for (unsigned i = 0; i < n; i++) {
        Fiber& f = blk.fibers[i];
        init_fiber(f, blk.stacks.get() + i * kStack);
        f.state = State::Ready;
    }
    // Shared memory holds garbage at a block's start: NaN here, until the block writes it.
    if (!blk.shared.empty()) std::memset(blk.shared.data(), 0xff, blk.shared.size());
    for (auto& [p, bytes] : tracked_shared) std::memset(p, 0xff, bytes);
    for (unsigned pass = 0;; pass++) {
        for (unsigned k = 0; k < n; k++) {
            unsigned i = (pass & 1) ? n - 1 - k : k;
            if (blk.fibers[i].state != State::Ready) continue;
            blk.current = i;
            set_thread_idx(i);
            resume(blk.fibers[i]);
        }
        if (release_rendezvous(n)) continue;
        unsigned done = 0, at_barrier = 0;
        for (const Fiber& f : blk.fibers) {
            done += f.state == State::Done;
            at_barrier += f.state == State::AtBarrier;
        }
        if (done == n) {
            if (blk.trapped.empty()) return true;
            err = blk.trapped;
            blk.trapped.clear();
            return false;
        }
        if (done + at_barrier == n) {
            for (Fiber& f : blk.fibers)
                if (f.state == State::AtBarrier) f.state = State::Ready;
            continue;
        }
        err = deadlock_report(n);
        return false;
    }
}

const Entry* find(const char* name) {
    for (const Entry* e = cudasim_table; e->name; e++)
        if (std::strcmp(e->name, name) == 0) return e;
    return nullptr;
}

void fail(char* err, size_t len, const std::string& msg) {
    if (len) {
        std::strncpy(err, msg.c_str(), len - 1);
        err[len - 1] = 0;
    }
}
}  // namespace

void sync_threads() { yield(State::AtBarrier); }

void sync_warp(unsigned mask) {
    blk.fibers[blk.current].mask = mask;
    yield(State::AtRendezvous);
}

uint64_t exchange(unsigned mask, uint64_t v, int src) {
    unsigned me = blk.current, n = (unsigned)blk.fibers.size(), base = me & ~31u;
    blk.fibers[me].offered = v;
    sync_warp(mask);
    uint64_t r = v;
    if (src >= 0 && src < 32 && ((mask >> src) & 1u) && base + src < n) r = blk.fibers[base + src].offered;
    sync_warp(mask);  // nobody offers a new value before every lane has read this one
    return r;
}

unsigned ballot(unsigned mask, bool pred) {
    unsigned me = blk.current, n = (unsigned)blk.fibers.size(), base = me & ~31u;
    blk.fibers[me].pred = pred;
    sync_warp(mask);
    unsigned r = 0;
    for (unsigned l = 0; l < 32; l++)
        if ((mask >> l) & 1u && base + l < n && blk.fibers[base + l].pred) r |= 1u << l;
    sync_warp(mask);
    return r;
}

void* dynamic_shared() { return blk.shared.data(); }

unsigned dynamic_shared_size() { return (unsigned)blk.shared.size(); }

void trap(const char* why) {
    if (blk.trapped.empty()) blk.trapped = why;
}

void cp_async(void* dst, const void* src, unsigned size, unsigned src_bytes) {
    Fiber& f = blk.fibers[blk.current];
    f.in_flight.push_back({dst, src, size, src_bytes, f.committed});
}

void cp_async_commit() { blk.fibers[blk.current].committed++; }

void cp_async_wait(unsigned n) {
    Fiber& f = blk.fibers[blk.current];
    std::vector<Fiber::AsyncCopy> still;
    for (const auto& c : f.in_flight) {
        // Done: every copy of a committed group older than the newest n.
        if (c.group + n < f.committed) {
            std::memcpy(c.dst, c.src, c.src_bytes);
            std::memset(static_cast<char*>(c.dst) + c.src_bytes, 0, c.size - c.src_bytes);
        } else {
            still.push_back(c);
        }
    }
    f.in_flight.swap(still);
}

namespace {
float bf16_to_float(unsigned bits) {
    unsigned u = bits << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
}  // namespace

void mma_m16n8k16_bf16(float* d, const unsigned* a, const unsigned* b) {
    struct Frag {
        const unsigned* a;
        const unsigned* b;
    } mine{a, b};
    unsigned me = blk.current, n = (unsigned)blk.fibers.size(), base = me & ~31u;
    blk.fibers[me].offered = reinterpret_cast<uint64_t>(&mine);
    sync_warp(0xffffffffu);
    // Every lane's registers are readable until the second rendezvous (their fibers wait).
    float A[16][16] = {}, B[16][8] = {};
    for (unsigned l = 0; l < 32 && base + l < n; l++) {
        const Frag* f = reinterpret_cast<const Frag*>(blk.fibers[base + l].offered);
        unsigned grp = l >> 2, tig = l & 3;
        for (unsigned i = 0; i < 8; i++) {
            unsigned row = (i < 2 || (i >= 4 && i < 6)) ? grp : grp + 8;
            unsigned col = tig * 2 + (i & 1) + (i >= 4 ? 8 : 0);
            A[row][col] = bf16_to_float((f->a[i / 2] >> (16 * (i & 1))) & 0xffffu);
        }
        for (unsigned i = 0; i < 4; i++) {
            unsigned k = tig * 2 + (i & 1) + (i >= 2 ? 8 : 0);
            B[k][grp] = bf16_to_float((f->b[i / 2] >> (16 * (i & 1))) & 0xffffu);
        }
    }
    sync_warp(0xffffffffu);
    unsigned l = me & 31u, grp = l >> 2, tig = l & 3;
    for (unsigned i = 0; i < 4; i++) {
        unsigned row = i < 2 ? grp : grp + 8, col = tig * 2 + (i & 1);
        float acc = d[i];
        for (unsigned k = 0; k < 16; k++) acc += A[row][k] * B[k][col];
        d[i] = acc;
    }
}

void ldmatrix_x4(unsigned* r, const void* row, bool trans) {
    unsigned me = blk.current, n = (unsigned)blk.fibers.size(), base = me & ~31u;
    blk.fibers[me].offered = reinterpret_cast<uint64_t>(row);
    sync_warp(0xffffffffu);
    unsigned l = me & 31u;
    // The 16-bit value at column `col` of the row lane `src` gave.
    auto at = [&](unsigned src, unsigned col) -> unsigned {
        if (base + src >= n) return 0u;  // a lane outside the block: undefined on a GPU
        const unsigned short* p = reinterpret_cast<const unsigned short*>(blk.fibers[base + src].offered);
        return p[col];
    };
    for (unsigned m = 0; m < 4; m++) {
        unsigned lo, hi;
        if (trans) {
            lo = at(m * 8 + 2 * (l & 3), l >> 2);
            hi = at(m * 8 + 2 * (l & 3) + 1, l >> 2);
        } else {
            lo = at(m * 8 + (l >> 2), 2 * (l & 3));
            hi = at(m * 8 + (l >> 2), 2 * (l & 3) + 1);
        }
        r[m] = lo | (hi << 16);
    }
    sync_warp(0xffffffffu);  // every lane has read the others' rows before a new offer
}

bool track(void* p, unsigned long bytes) {
    std::memset(p, 0xff, bytes);
    tracked_shared.emplace_back(p, bytes);
    return true;
}
}  // namespace cudasim

// The kernel's parameter kinds (see launch_table.h), or null for an unknown kernel.
extern "C" const char* cudasim_signature(const char* name) {
    const cudasim::Entry* e = cudasim::find(name);
    return e ? e->signature : nullptr;
}

// Runs kernel `name` on a grid of blocks; 0 on success, otherwise 1 with a message in `err`.
extern "C" int cudasim_launch(const char* name, const unsigned grid[3], const unsigned block[3], unsigned shared_bytes,
                              void** args, char* err, size_t err_len) {
    using namespace cudasim;
    const Entry* e = find(name);
    if (!e) {
        fail(err, err_len, std::string("unknown kernel ") + name);
        return 1;
    }
    unsigned n = block[0] * block[1] * block[2];
    if (n == 0 || n > kMaxThreads) {
        fail(err, err_len, "launching " + std::string(name) + ": " + std::to_string(n) + " threads per block (1 to 1024)");
        return 1;
    }
    if (grid[0] == 0 || grid[1] == 0 || grid[2] == 0) {
        fail(err, err_len, "launching " + std::string(name) + ": an empty grid");
        return 1;
    }
    if (shared_bytes > kMaxShared) {
        fail(err, err_len, "launching " + std::string(name) + ": " + std::to_string(shared_bytes) +
                               " bytes of dynamic shared memory (at most " + std::to_string(kMaxShared) + ")");
        return 1;
    }
    blk.invoke = e->invoke;
    blk.args = args;
    blk.shared.assign(shared_bytes, 0);
    grid_dim = {grid[0], grid[1], grid[2]};
    block_dim = {block[0], block[1], block[2]};
    std::string msg;
    for (unsigned z = 0; z < grid[2]; z++)
        for (unsigned y = 0; y < grid[1]; y++)
            for (unsigned x = 0; x < grid[0]; x++) {
                block_idx = {x, y, z};
                if (!run_block(n, msg)) {
                    fail(err, err_len, std::string(name) + ": " + msg);
                    return 1;
                }
            }
    return 0;
}
