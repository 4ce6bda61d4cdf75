//! With the `cuda-sim` feature: compiles the CUDA kernels (src/gpu/kernels.cu) for the host
//! with the simulator's runtime (src/gpu/sim), so that the GPU code runs and is tested on
//! machines without a GPU. Needs a C++17 compiler (g++ or clang++). Without the feature this
//! script does nothing.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "cuda-sim")]
    sim::build();
}

#[cfg(feature = "cuda-sim")]
mod sim {
    use std::path::PathBuf;

    pub fn build() {
        let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
        let gpu = root.join("src/gpu");
        let sim = gpu.join("sim");
        // The GPU's kernels, and the simulator's own test kernels.
        let sources = [gpu.join("kernels.cu"), sim.join("selftest.cu")];
        for f in ["cuda_sim.h", "launch_table.h", "runtime.cpp"] {
            println!("cargo:rerun-if-changed={}", sim.join(f).display());
        }
        let mut table = "#include \"cuda_sim.h\"\n#include \"launch_table.h\"\n".to_string();
        let mut names = Vec::new();
        for path in &sources {
            println!("cargo:rerun-if-changed={}", path.display());
            // One table entry per `extern "C" __global__ void NAME(`.
            let src = std::fs::read_to_string(path).expect("reading a kernel source");
            table += &format!("#line 1 \"{}\"\n{}\n", path.display(), track_shared(&src));
            names.extend(
                src.split("extern \"C\" __global__ void ")
                    .skip(1)
                    .filter_map(|rest| rest.split('(').next())
                    .map(|n| n.trim().to_string()),
            );
        }
        table += "#line 1 \"cudasim_kernels.cpp\"\n";
        table += "\nextern \"C\" const cudasim::Entry cudasim_table[] = {\n";
        for n in &names {
            table += &format!(
                "    {{\"{n}\", &cudasim::Kernel<{n}>::invoke, cudasim::Kernel<{n}>::signature}},\n"
            );
        }
        table += "    {nullptr, nullptr, nullptr}};\n";
        let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("cudasim_kernels.cpp");
        std::fs::write(&out, table).expect("writing the simulator's kernel table");

        cc::Build::new()
            .cpp(true)
            .std("c++17")
            .include(&sim)
            .file(&out)
            .file(sim.join("runtime.cpp"))
            .opt_level(2)
            .warnings(false)
            .flag_if_supported("-Wno-unknown-pragmas")
            .compile("peftkit_cudasim");
    }

    /// After every `__shared__ T name[...];` declaration, `CUDASIM_TRACK(name);` on the same
    /// line (line numbers stay those of the source): the simulator then refills the array with
    /// NaN before each block, as a GPU's shared memory holds garbage, so that a read before
    /// the block's own write is not served a previous block's values.
    fn track_shared(src: &str) -> String {
        let mut out = String::with_capacity(src.len() + 256);
        let mut rest = src;
        while let Some(i) = rest.find("__shared__ ") {
            let (head, tail) = rest.split_at(i);
            out += head;
            let line_start = head.rfind('\n').map_or(0, |p| p + 1);
            let end = tail
                .find(';')
                .expect("a __shared__ declaration ends with ;")
                + 1;
            let decl = &tail[..end];
            out += decl;
            rest = &tail[end..];
            if head[line_start..].trim_start().starts_with('#') {
                continue; // a macro definition, not a declaration
            }
            assert!(
                !decl.contains(','),
                "one __shared__ variable per declaration: {decl}"
            );
            let name = decl[..decl.find(['[', '=', ';']).unwrap()]
                .split_whitespace()
                .last()
                .unwrap()
                .trim_start_matches('*');
            out += &format!(" CUDASIM_TRACK({name});");
        }
        out + rest
    }
}
