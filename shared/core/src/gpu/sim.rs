//! The GPU simulator's backend (`--device cuda-sim`, cargo feature `cuda-sim`): device memory is
//! host memory, kernels.cu runs on the C++ runtime in `sim/` (every GPU thread a fiber, with
//! real barriers and warp shuffles), and the products are computed here the way cuBLAS
//! computes them for us: bf16 inputs, f32 accumulation and output.
//!
//! It exists so that the kernels and the GPU engine are tested in CI, where there is no GPU.
//! It checks more than a GPU would: every launch's argument kinds against the kernel's
//! parameters, a barrier or shuffle some threads skip (reported as a deadlock), and reads of
//! memory no one wrote (uninitialised allocations and shared memory are NaN).

use super::blas::Gemm;
use super::device::{Arg, Backend, KERNEL_NAMES};
use crate::error::{Error, Result};
use rayon::prelude::*;
use std::alloc::{self, Layout};
use std::any::Any;
use std::ffi::{c_char, c_int, c_void, CStr, CString};

extern "C" {
    fn cudasim_launch(
        name: *const c_char,
        grid: *const u32,
        block: *const u32,
        shared: u32,
        args: *mut *mut c_void,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn cudasim_signature(name: *const c_char) -> *const c_char;
}

/// Host memory standing in for a device allocation.
struct HostMem {
    ptr: *mut u8,
    layout: Layout,
}

impl Drop for HostMem {
    fn drop(&mut self) {
        // Safety: allocated in `alloc` with this layout.
        unsafe { alloc::dealloc(self.ptr, self.layout) }
    }
}

pub(crate) struct SimBackend;

impl SimBackend {
    /// Checks that the simulator was built with every kernel the GPU code launches.
    pub fn new() -> Result<Self> {
        for name in KERNEL_NAMES {
            if signature(name).is_none() {
                return Err(Error::Device(format!(
                    "kernel {name} missing from the simulator's table"
                )));
            }
        }
        Ok(Self)
    }
}

/// The kernel's parameter kinds (launch_table.h), or None for an unknown kernel.
fn signature(name: &str) -> Option<String> {
    let cname = CString::new(name).ok()?;
    // Safety: a NUL-terminated name; the table's strings are static.
    let sig = unsafe { cudasim_signature(cname.as_ptr()) };
    (!sig.is_null()).then(|| {
        unsafe { CStr::from_ptr(sig) }
            .to_string_lossy()
            .into_owned()
    })
}

/// The kind letter of an argument, as the kernel table names parameters (launch_table.h).
fn kind(a: &Arg) -> char {
    match a {
        Arg::P(_) => 'P',
        Arg::I(_) => 'I',
        Arg::L(_) | Arg::U64(_) => 'L',
        Arg::F(_) => 'F',
    }
}

fn bf16_at(base: u64, i: usize) -> f32 {
    // Safety: the product's operands lie inside allocations of this backend (the caller's
    // shapes and strides, as cuBLAS would read them).
    let bits = unsafe { *(base as *const u16).add(i) };
    f32::from_bits((bits as u32) << 16)
}

impl Backend for SimBackend {
    fn name(&self) -> String {
        "cuda-sim (the GPU kernels simulated on the CPU)".into()
    }

    fn alloc(&self, bytes: usize, zeroed: bool) -> Result<(Box<dyn Any>, u64)> {
        let layout = Layout::from_size_align(bytes.max(1), 256)
            .map_err(|e| Error::Device(format!("allocating {bytes} bytes: {e}")))?;
        // Safety: a non-zero size.
        let ptr = unsafe {
            if zeroed {
                alloc::alloc_zeroed(layout)
            } else {
                let p = alloc::alloc(layout);
                if !p.is_null() {
                    // All ones: NaN as f32 and as bf16, so a read before the first write shows.
                    std::ptr::write_bytes(p, 0xff, bytes);
                }
                p
            }
        };
        if ptr.is_null() {
            return Err(Error::Device(format!(
                "allocating {} MiB of simulated device memory",
                bytes >> 20
            )));
        }
        Ok((Box::new(HostMem { ptr, layout }), ptr as u64))
    }

    fn upload(&self, dst: u64, src: &[u8]) -> Result<()> {
        // Safety: `dst` is a live allocation at least `src.len()` long (checked by Gpu).
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut u8, src.len()) };
        Ok(())
    }

    fn download(&self, src: u64, dst: &mut [u8]) -> Result<()> {
        // Safety: as in `upload`.
        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    fn copy(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        // Safety: as in `upload`; device copies may not overlap either.
        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst as *mut u8, bytes) };
        Ok(())
    }

    fn zero(&self, dst: u64, bytes: usize) -> Result<()> {
        // Safety: as in `upload`.
        unsafe { std::ptr::write_bytes(dst as *mut u8, 0, bytes) };
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        Ok(())
    }

    fn launch(&self, name: &str, grid: u32, block: u32, shared: u32, args: &[Arg]) -> Result<()> {
        let sig = signature(name).ok_or_else(|| Error::Device(format!("unknown kernel {name}")))?;
        let cname = CString::new(name).expect("a kernel name has no NUL");
        let given: String = args.iter().map(kind).collect();
        if sig != given {
            return Err(Error::Device(format!(
                "launching {name}: arguments of kinds {given}, the kernel takes {sig} \
                 (P pointer, I int, L 64-bit integer, F float)"
            )));
        }
        // One 8-byte slot per argument, little-endian: a 4-byte parameter reads its low half.
        let mut slots: Vec<u64> = args
            .iter()
            .map(|a| match *a {
                Arg::P(v) | Arg::U64(v) => v,
                Arg::I(v) => v as u32 as u64,
                Arg::L(v) => v as u64,
                Arg::F(v) => v.to_bits() as u64,
            })
            .collect();
        let mut ptrs: Vec<*mut c_void> = slots
            .iter_mut()
            .map(|s| s as *mut u64 as *mut c_void)
            .collect();
        let mut err = vec![0 as c_char; 512];
        let (g, b) = ([grid, 1, 1], [block, 1, 1]);
        // Safety: `ptrs` points at live argument slots whose kinds match the kernel's
        // parameters (checked above); the error buffer's length is passed.
        let rc = unsafe {
            cudasim_launch(
                cname.as_ptr(),
                g.as_ptr(),
                b.as_ptr(),
                shared,
                ptrs.as_mut_ptr(),
                err.as_mut_ptr(),
                err.len(),
            )
        };
        if rc != 0 {
            let msg = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy();
            return Err(Error::Device(format!("simulated kernel {msg}")));
        }
        Ok(())
    }

    fn gemm(&self, g: &Gemm) -> Result<()> {
        let g = *g;
        let a_at = move |bt: usize, i: usize, p: usize| {
            let off = bt * g.stride_a + if g.ta { p * g.lda + i } else { i * g.lda + p };
            bf16_at(g.a, off)
        };
        let b_at = move |bt: usize, p: usize, j: usize| {
            let off = bt * g.stride_b + if g.tb { j * g.ldb + p } else { p * g.ldb + j };
            bf16_at(g.b, off)
        };
        (0..g.batch * g.m).into_par_iter().for_each(|row| {
            let (bt, i) = (row / g.m, row % g.m);
            let a: Vec<f32> = (0..g.k).map(|p| a_at(bt, i, p)).collect();
            let c = (g.c as *mut f32).wrapping_add(bt * g.stride_c + i * g.ldc);
            for j in 0..g.n {
                let mut acc = 0f32;
                for (p, &av) in a.iter().enumerate() {
                    acc += av * b_at(bt, p, j);
                }
                // Safety: row `i` of batch `bt` of C, written by this task only. With beta = 0
                // C is not read (it may be uninitialised), as in cuBLAS.
                unsafe {
                    let cj = c.add(j);
                    *cj = if g.beta == 0.0 {
                        g.alpha * acc
                    } else {
                        g.alpha * acc + g.beta * *cj
                    };
                }
            }
        });
        Ok(())
    }

    fn device_used(&self) -> Option<(usize, usize)> {
        None
    }

    fn bf16_tensor_cores(&self) -> bool {
        true
    }

    /// Hopper's opt-in limit (227 KB) less 1 KB, so the shared-memory paths run here too.
    fn max_dynamic_shared(&self) -> usize {
        (227 << 10) - 1024
    }
}

#[cfg(test)]
mod tests {
    use crate::error::Result;
    use crate::gpu::check::{self, KernelShapes};
    use crate::gpu::device::{Arg, Gpu};
    use crate::gpu::DeviceSpec;
    use std::path::PathBuf;

    fn sim() -> Gpu {
        Gpu::open(DeviceSpec::Sim).unwrap()
    }

    #[test]
    fn warp_shuffles_and_ballot_follow_cuda() {
        let gpu = sim();
        let x: Vec<f32> = (0..64).map(|i| i as f32).collect();
        let (gx, gout) = (gpu.upload(&x).unwrap(), gpu.alloc_f32(64).unwrap());
        gpu.launch("sim_warp_sum", 1, 64, &[Arg::P(gx.ptr), Arg::P(gout.ptr)])
            .unwrap();
        let got = gpu.download_f32(&gout, 64).unwrap();
        // Lanes 0-31 sum 0..31, lanes 32-63 sum 32..63.
        assert!(got[..32].iter().all(|&v| v == 496.0), "{got:?}");
        assert!(got[32..].iter().all(|&v| v == 1520.0), "{got:?}");

        let xi: Vec<i32> = (0..32).map(|i| 100 + i * 3).collect();
        let gxi = gpu.upload(&xi).unwrap();
        let outs: Vec<_> = (0..4).map(|_| gpu.alloc(32 * 4).unwrap()).collect();
        let mut args = vec![Arg::P(gxi.ptr)];
        args.extend(outs.iter().map(|b| Arg::P(b.ptr)));
        gpu.launch("sim_shuffles", 1, 32, &args).unwrap();
        let read = |b| -> Vec<i32> {
            let v = gpu.download_f32(b, 32).unwrap();
            v.iter().map(|f| f.to_bits() as i32).collect()
        };
        let (down, up, bcast) = (read(&outs[0]), read(&outs[1]), read(&outs[2]));
        for l in 0..32usize {
            // Out of range: the lane's own value (CUDA's rule).
            assert_eq!(
                down[l],
                xi[if l + 3 < 32 { l + 3 } else { l }],
                "down lane {l}"
            );
            let seg = l / 16 * 16;
            assert_eq!(
                up[l],
                xi[if l >= seg + 5 { l - 5 } else { l }],
                "up lane {l}"
            );
            assert_eq!(bcast[l], xi[7], "broadcast lane {l}");
        }
        let ballot = read(&outs[3]);
        let want = (0..32).fold(0u32, |m, l| m | (((xi[l] & 1) as u32) << l));
        assert!(ballot.iter().all(|&b| b as u32 == want));
    }

    /// ldmatrix as the PTX ISA defines it: lane 8·m + r gives the address of row r of matrix
    /// m, and the 32-bit word w of row r goes to lane 4·r + w, register m; with .trans the
    /// matrices are read as their transposes.
    #[test]
    fn ldmatrix_follows_the_ptx_isa() {
        let gpu = sim();
        // Matrix m, row r, column c holds m·64 + r·8 + c.
        let src: Vec<u16> = (0..256).collect();
        let gsrc = gpu.upload(&src).unwrap();
        for trans in [false, true] {
            let out = gpu.alloc(32 * 4 * 4).unwrap();
            gpu.launch(
                "sim_ldmatrix",
                1,
                32,
                &[Arg::P(gsrc.ptr), Arg::P(out.ptr), Arg::I(i32::from(trans))],
            )
            .unwrap();
            let got: Vec<u32> = gpu
                .download_f32(&out, 128)
                .unwrap()
                .iter()
                .map(|f| f.to_bits())
                .collect();
            let value = |m: usize, r: usize, c: usize| (m * 64 + r * 8 + c) as u32;
            for lane in 0..32 {
                let (r, w) = (lane / 4, lane % 4);
                for m in 0..4 {
                    let (lo, hi) = if trans {
                        (value(m, 2 * w, r), value(m, 2 * w + 1, r))
                    } else {
                        (value(m, r, 2 * w), value(m, r, 2 * w + 1))
                    };
                    assert_eq!(
                        got[lane * 4 + m],
                        lo | hi << 16,
                        "trans {trans}, lane {lane}, matrix {m}"
                    );
                }
            }
        }
    }

    /// A kernel that traps (flash attention's passes given less shared memory than they lay
    /// out) fails its launch with the reason, as __trap() fails one on a GPU.
    #[test]
    fn a_trap_fails_the_launch() {
        let gpu = sim();
        let buf = gpu.alloc_f32(1024).unwrap();
        let lens = gpu.upload(&[64i32]).unwrap();
        // `tensors` pointers, the lengths, then heads, kv heads, L, window and the scale, with
        // 16 bytes less shared memory than the kernel lays out.
        let launch = |kernel: &str, tensors: usize, shared: usize| {
            let mut args: Vec<Arg> = (0..tensors).map(|_| Arg::P(buf.ptr)).collect();
            args.extend([
                Arg::P(lens.ptr),
                Arg::I(1),
                Arg::I(1),
                Arg::I(64),
                Arg::I(0),
                Arg::F(0.125),
            ]);
            gpu.launch_shared(kernel, 1, 128, shared as u32 - 16, &args)
                .unwrap_err()
                .to_string()
        };
        let err = launch(
            "flash_fwd_d64",
            5,
            crate::gpu::flash::flash_fwd_shared_bytes(64),
        );
        assert!(err.contains("flash_fwd: too little shared memory"), "{err}");
        let err = launch(
            "flash_bwd_d64",
            9,
            crate::gpu::flash::flash_bwd_shared_bytes(64),
        );
        assert!(err.contains("flash_bwd: too little shared memory"), "{err}");
    }

    #[test]
    fn a_shuffle_some_lanes_skip_is_a_deadlock_not_a_hang() {
        let gpu = sim();
        let x = gpu.upload(&[0f32; 32]).unwrap();
        let e = gpu
            .launch("sim_divergent_shuffle", 1, 32, &[Arg::P(x.ptr)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("deadlock") && e.contains("finished"), "{e}");
    }

    #[test]
    fn a_missing_barrier_shows_as_a_wrong_result() {
        let gpu = sim();
        let out = gpu.alloc(128 * 4).unwrap();
        let want: Vec<i32> = (0..128).map(|t| (t + 1) % 128 + 1).collect();
        let read = || -> Vec<i32> {
            let v = gpu.download_f32(&out, 128).unwrap();
            v.iter().map(|f| f.to_bits() as i32).collect()
        };
        gpu.launch("sim_neighbour", 1, 128, &[Arg::P(out.ptr), Arg::I(1)])
            .unwrap();
        assert_eq!(read(), want);
        gpu.launch("sim_neighbour", 2, 128, &[Arg::P(out.ptr), Arg::I(0)])
            .unwrap();
        assert_ne!(read(), want, "a read racing a write went unnoticed");
    }

    #[test]
    fn unwritten_memory_reads_as_nan_and_arguments_are_checked() {
        let gpu = sim();
        let out = gpu.alloc_f32(32).unwrap();
        gpu.launch_shared("sim_unwritten_shared", 1, 32, 128, &[Arg::P(out.ptr)])
            .unwrap();
        assert!(gpu
            .download_f32(&out, 32)
            .unwrap()
            .iter()
            .all(|v| v.is_nan()));
        let fresh = gpu.uninit_f32(8).unwrap();
        assert!(gpu
            .download_f32(&fresh, 8)
            .unwrap()
            .iter()
            .all(|v| v.is_nan()));

        let e = gpu
            .launch("sim_warp_sum", 1, 32, &[Arg::P(out.ptr), Arg::I(0)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("PI") && e.contains("takes PP"), "{e}");
        let e = gpu.launch("no_such_kernel", 1, 32, &[]).unwrap_err();
        assert!(e.to_string().contains("unknown kernel"), "{e}");
        let e = gpu.launch("sim_warp_sum", 1, 2048, &[Arg::P(0), Arg::P(0)]);
        assert!(e.unwrap_err().to_string().contains("threads per block"));
    }

    /// QLoRA's quantization: NF4, blocks of 64, double quantization.
    fn nf4() -> crate::model::QuantizeOnLoad {
        crate::model::QuantizeOnLoad {
            quant_type: crate::quant::QuantType::Nf4,
            blocksize: 64,
            double_quant: true,
        }
    }

    /// Every kernel of kernels.cu against the CPU path, as gpu-check runs them on a GPU.
    #[test]
    fn every_kernel_matches_the_cpu_path() {
        let (v, failed) = check::kernels(&sim(), &KernelShapes::simulator()).unwrap();
        assert_eq!(failed, 0, "{v:#}");
    }

    /// Generation (the KV cache, attn_decode) against the CPU decoder on every architecture,
    /// including Mistral's sliding window.
    #[test]
    fn gpu_generation_matches_the_cpu_decoder() {
        use crate::model::{ForwardOptions, Model};
        use crate::train::params::TrainState;
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models");
        let mut gpu = sim();
        let nf4 = nf4();
        let plain = [
            "llama_gqa",
            "llama_untied",
            "llama3_rope",
            "qwen2",
            "mistral",
            "gpt2",
        ];
        // 4-bit weights: the single-token steps take the fused GEMV.
        let cases = plain.map(|n| (n, None)).into_iter().chain([
            ("llama_gqa", Some(nf4)),
            ("qwen2", Some(nf4)),
            ("gpt2", Some(nf4)),
        ]);
        for (name, quant) in cases {
            let model = Model::load_with(&root.join(name), quant).unwrap();
            let state = TrainState::new(model.linears().len());
            let (worst, g) =
                check::decode_vs_cpu(gpu, &model, &state, &ForwardOptions::default()).unwrap();
            gpu = g;
            // bf16 against f32 gives 1-2.5% of these small logits; a wrong position or
            // cache row gives tens of percent.
            assert!(
                worst < 5e-2,
                "{name} ({quant:?}): logits differ by {worst} of the largest"
            );
        }
    }

    /// AdamW on the device (states in device memory, and paged) against the host's AdamW on
    /// the same gradients: full fine-tuning, two steps with clipping, every tensor's value and
    /// moments brought back to the host.
    #[test]
    fn device_adamw_matches_the_host_optimizer() {
        use crate::model::Model;
        use crate::rng::Rng;
        use crate::train::backend::Backend;
        use crate::train::engine::{Batch, Engine};
        use crate::train::optim::AdamW;
        use crate::train::params::TrainState;
        let dir =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/gpt2");
        let ids: Vec<u32> = (0..40).map(|i| (i * 37 % 400) as u32).collect();
        let labels: Vec<i32> = ids.iter().map(|&t| t as i32).collect();
        let batch = Batch {
            ids: vec![&ids[..]],
            labels: vec![&labels[..]],
        };
        let opt = AdamW {
            lr: 1e-3,
            weight_decay: 0.1,
            ..AdamW::default()
        };
        let run = |place: Option<bool>| {
            let mut model = Model::load(&dir).unwrap();
            let mut state = TrainState::new(model.linears().len());
            crate::train::full::register(&model, &mut state, |_| true, false);
            let mut engine = crate::gpu::engine::GpuEngine::new(sim(), &model, &state).unwrap();
            match place {
                None => engine.keep_optimizer_on_host().unwrap(),
                Some(paged) => engine.use_device_optimizer(paged).unwrap(),
            }
            let mut backend = Backend::Cuda(Box::new(engine));
            let before: Vec<Vec<f32>> = (0..state.params.len())
                .map(|k| state.value_and_state_mut(&mut model, k).0.to_vec())
                .collect();
            let mut norms = Vec::new();
            for step in 1..=2 {
                state.zero_grads();
                let cpu = Engine::for_eval(&model);
                backend
                    .forward_backward(&cpu, &mut state, &batch, 0.1, &mut Rng::new(0))
                    .unwrap();
                let norm = backend
                    .clip_and_step(&opt, &mut model, &mut state, Some(0.5), opt.lr, step)
                    .unwrap();
                norms.push(norm);
            }
            backend.sync_to_host(&mut model, &mut state).unwrap();
            let values: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..state.params.len())
                .map(|k| {
                    // The change of the value (the steps), not the value itself.
                    let (v, p) = state.value_and_state_mut(&mut model, k);
                    let change = v.iter().zip(&before[k]).map(|(a, b)| a - b).collect();
                    (change, p.m.clone(), p.v.clone())
                })
                .collect();
            (norms, values)
        };
        let (host_norms, host) = run(None);
        for paged in [false, true] {
            let (norms, dev) = run(Some(paged));
            for (a, b) in host_norms.iter().zip(&norms) {
                assert!(
                    (a - b).abs() <= 1e-4 * a,
                    "paged {paged}: grad norm {b} vs {a}"
                );
            }
            for (k, (h, d)) in host.iter().zip(&dev).enumerate() {
                // (A change is a difference of two f32 values ~100× larger: 1e-5 of it is
                // their rounding.)
                for (what, x, y) in [("change", &h.0, &d.0), ("m", &h.1, &d.1), ("v", &h.2, &d.2)] {
                    let err = crate::gpu::check::rel_err(y, x);
                    assert!(
                        err < 1e-4,
                        "paged {paged}: tensor {k} {what} differs by {err}"
                    );
                }
            }
        }
    }

    /// The adapters' AdamW on the device: after a step the device holds the run's values and
    /// the host's are stale (saving refuses them) until `sync_to_host`; a pass of another
    /// state (PPO's frozen reference) uses its own values and the run's next pass gets the
    /// run's back; an evaluation copy of the run's state evaluates the device's values; after
    /// `sync_to_host` a new state with the host's values computes the same loss to the bit.
    #[test]
    fn device_adapter_optimizer_keeps_the_runs_values() {
        use crate::model::Model;
        use crate::rng::Rng;
        use crate::train::engine::Batch;
        use crate::train::lora::{self, LoraConfig};
        use crate::train::optim::AdamW;
        use crate::train::params::TrainState;
        let dir =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/llama_gqa");
        let mut model = Model::load(&dir).unwrap();
        let n = model.linears().len();
        let mut state = TrainState::new(n);
        let cfg = LoraConfig {
            rank: 4,
            alpha: 8.0,
            ..Default::default()
        };
        lora::attach(&model, &mut state, &cfg, &mut Rng::new(1)).unwrap();
        let ids: Vec<u32> = (0..24).map(|i| (i * 37 % 200) as u32).collect();
        let labels: Vec<i32> = ids.iter().map(|&t| t as i32).collect();
        let batch = Batch {
            ids: vec![&ids[..]],
            labels: vec![&labels[..]],
        };
        let mut engine = crate::gpu::engine::GpuEngine::new(sim(), &model, &state).unwrap();
        let with_values = |lora: &[Option<crate::train::params::LoraParams>]| {
            let mut s = TrainState::new(n);
            s.lora = lora.to_vec();
            s
        };
        let initial = with_values(&state.lora);
        engine
            .forward_backward(&mut state, &batch, 0.1, &mut Rng::new(0))
            .unwrap();
        let opt = AdamW::default();
        engine
            .clip_and_step(&opt, &mut model, &mut state, Some(1.0), 1e-2, 1)
            .unwrap();
        assert!(state.host_stale && state.check_synced().is_err());
        let loss = |e: &mut crate::gpu::engine::GpuEngine, s: &TrainState| {
            e.eval(s, &batch).unwrap().nll_sum
        };
        let run = loss(&mut engine, &state);
        let mut other = with_values(&state.lora);
        for lo in other.lora.iter_mut().flatten() {
            lo.b.iter_mut().for_each(|b| *b = 0.05);
        }
        let o = loss(&mut engine, &other);
        assert!(
            (o - run).abs() > 1e-3,
            "another state's values: {o} vs {run}"
        );
        assert_eq!(
            loss(&mut engine, &state),
            run,
            "the run's values after another's"
        );
        assert_eq!(
            loss(&mut engine, &state.adapters_only()),
            run,
            "an evaluation copy"
        );
        let stale = loss(&mut engine, &initial);
        assert!(
            (stale - run).abs() > 1e-5,
            "the step changed nothing: {stale}"
        );
        engine.sync_to_host(&mut model, &mut state).unwrap();
        assert!(!state.host_stale);
        assert_eq!(
            loss(&mut engine, &with_values(&state.lora)),
            run,
            "synced values"
        );
        // The moments came back too (A's gradient is zero while B is: only B's moved).
        let b_moments = state
            .params
            .iter()
            .filter(|(s, _)| matches!(s, crate::train::params::Slot::LoraB(_)));
        assert!(b_moments
            .clone()
            .all(|(_, p)| p.v.iter().any(|&x| x != 0.0)));
        assert!(b_moments.count() > 0);
    }

    /// A communicator that sums the simulator's device memory in place, as NCCL sums a GPU's
    /// (the simulator's device addresses are host addresses), and counts the values it
    /// summed so.
    struct SumsSimMemory {
        inner: crate::dist::InProcess,
        on_device: usize,
    }

    impl crate::dist::Communicator for SumsSimMemory {
        fn rank(&self) -> usize {
            self.inner.rank()
        }
        fn world(&self) -> usize {
            self.inner.world()
        }
        fn backend(&self) -> &'static str {
            "in-process, on the simulator's memory"
        }
        fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()> {
            self.inner.all_reduce_sum(buf)
        }
        fn all_reduce_sum_f64(&mut self, buf: &mut [f64]) -> Result<()> {
            self.inner.all_reduce_sum_f64(buf)
        }
        fn broadcast(&mut self, root: usize, bytes: &mut Vec<u8>) -> Result<()> {
            self.inner.broadcast(root, bytes)
        }
        fn barrier(&mut self) -> Result<()> {
            self.inner.barrier()
        }
        fn gpu_device(&self) -> Option<crate::gpu::DeviceSpec> {
            Some(crate::gpu::DeviceSpec::Sim)
        }
        fn all_reduce_sum_gpu(&mut self, ptr: u64, n: usize) -> Result<()> {
            // SAFETY: a live simulator allocation of at least n f32s (the engine's gradients),
            // which nothing else touches during the call.
            let values = unsafe { std::slice::from_raw_parts_mut(ptr as *mut f32, n) };
            self.on_device += n;
            self.inner.all_reduce_sum(values)
        }
    }

    /// Data parallel with AdamW on the device: two ranks (threads, the in-process
    /// communicator) each take half of a window, sum the gradients their devices keep and
    /// step; both end where one engine does that takes the halves as two micro-batches.
    /// Three ways: through the host; in place in device memory (as NCCL does); and with one
    /// rank that cannot sum in device memory, which sends both through the host.
    #[test]
    fn data_parallel_device_optimizer_matches_one_process() {
        use crate::dist::{Communicator, InProcess};
        use crate::model::Model;
        use crate::rng::Rng;
        use crate::train::engine::Batch;
        use crate::train::lora::{self, LoraConfig};
        use crate::train::optim::AdamW;
        use crate::train::params::TrainState;
        fn setup() -> (Model, TrainState) {
            let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../tests/fixtures/models/llama_gqa");
            let model = Model::load(&dir).unwrap();
            let mut state = TrainState::new(model.linears().len());
            let cfg = LoraConfig {
                rank: 4,
                alpha: 8.0,
                dropout: 0.0,
                ..Default::default()
            };
            lora::attach(&model, &mut state, &cfg, &mut Rng::new(1)).unwrap();
            // B away from zero, so that A's gradient is not zero either.
            for lo in state.lora.iter_mut().flatten() {
                lo.b.iter_mut()
                    .enumerate()
                    .for_each(|(i, b)| *b = (i % 7) as f32 * 0.01 - 0.03);
            }
            (model, state)
        }
        fn half(rank: usize) -> Vec<u32> {
            (0..20)
                .map(|i| ((i * 37 + rank * 11) % 200) as u32)
                .collect()
        }
        // Two optimizer steps from `halves` (this rank's, or both), their values afterwards.
        fn run(ranks: &[usize], comm: Option<&mut dyn Communicator>) -> Vec<Vec<f32>> {
            let (mut model, mut state) = setup();
            let mut e = crate::gpu::engine::GpuEngine::new(sim(), &model, &state).unwrap();
            let opt = AdamW::default();
            let mut comm = comm;
            for step in 1..=2 {
                state.zero_grads();
                for &r in ranks {
                    let ids = half(r);
                    let labels: Vec<i32> = ids.iter().map(|&t| t as i32).collect();
                    let batch = Batch {
                        ids: vec![&ids[..]],
                        labels: vec![&labels[..]],
                    };
                    e.forward_backward(&mut state, &batch, 0.05, &mut Rng::new(0))
                        .unwrap();
                }
                if let Some(c) = comm.as_deref_mut() {
                    crate::dist::all_reduce_grads(c, &mut state, &mut [0.0]).unwrap();
                    e.all_reduce_device_grads(c).unwrap();
                }
                e.clip_and_step(&opt, &mut model, &mut state, Some(1.0), 1e-2, step)
                    .unwrap();
            }
            e.sync_to_host(&mut model, &mut state).unwrap();
            (0..state.params.len())
                .map(|k| state.value_and_state_mut(&mut model, k).0.to_vec())
                .collect()
        }
        let one = run(&[0, 1], None);
        // Which ranks' communicators sum device memory; how many values each summed there.
        for (in_place, want_on_device) in [
            ([false, false], false),
            ([true, true], true),
            ([true, false], false),
        ] {
            let ranks: Vec<(Vec<Vec<f32>>, usize)> = InProcess::group(2)
                .into_iter()
                .enumerate()
                .map(|(rank, c)| {
                    std::thread::spawn(move || {
                        if in_place[rank] {
                            let mut c = SumsSimMemory {
                                inner: c,
                                on_device: 0,
                            };
                            let values = run(&[rank], Some(&mut c));
                            (values, c.on_device)
                        } else {
                            let mut c = c;
                            (run(&[rank], Some(&mut c)), 0)
                        }
                    })
                })
                .collect::<Vec<_>>()
                .into_iter()
                .map(|h| h.join().unwrap())
                .collect();
            for (rank, (values, on_device)) in ranks.iter().enumerate() {
                assert_eq!(*on_device > 0, want_on_device, "{in_place:?}, rank {rank}");
                for (k, (a, b)) in one.iter().zip(values).enumerate() {
                    let err = crate::gpu::check::rel_err(b, a);
                    assert!(err < 1e-6, "{in_place:?}, rank {rank}, tensor {k}: {err}");
                }
            }
        }
        let (_, start) = setup();
        // (And the steps moved every tensor.)
        let moved = start
            .lora
            .iter()
            .flatten()
            .zip(one.chunks(2))
            .all(|(lo, ab)| lo.a != ab[0] && lo.b != ab[1]);
        assert!(moved);
    }

    /// Gradient checkpointing off (the forward pass keeps every block's activations) gives the
    /// gradients that recomputing them gives, to the bit: LoRA with dropout, and full
    /// fine-tuning.
    #[test]
    fn kept_activations_give_the_recomputed_gradients() {
        use crate::model::Model;
        use crate::rng::Rng;
        use crate::train::engine::Batch;
        use crate::train::lora::{self, LoraConfig};
        use crate::train::params::TrainState;
        let dir =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/llama_gqa");
        let model = Model::load(&dir).unwrap();
        let ids: Vec<u32> = (0..30).map(|i| (i * 37 % 200) as u32).collect();
        let labels: Vec<i32> = ids.iter().map(|&t| t as i32).collect();
        let batch = Batch {
            ids: vec![&ids[..], &ids[..17]],
            labels: vec![&labels[..], &labels[..17]],
        };
        for full in [false, true] {
            let grads = |checkpointing: bool| {
                let mut state = TrainState::new(model.linears().len());
                if full {
                    crate::train::full::register(&model, &mut state, |_| true, false);
                } else {
                    let cfg = LoraConfig {
                        rank: 4,
                        alpha: 8.0,
                        dropout: 0.1,
                        ..Default::default()
                    };
                    lora::attach(&model, &mut state, &cfg, &mut Rng::new(1)).unwrap();
                    for lo in state.lora.iter_mut().flatten() {
                        lo.b.iter_mut().for_each(|b| *b = 0.02);
                    }
                }
                let mut e = crate::gpu::engine::GpuEngine::new(sim(), &model, &state).unwrap();
                // (The gradients come to the host, where they are compared.)
                e.keep_optimizer_on_host().unwrap();
                e.use_gradient_checkpointing(checkpointing);
                e.forward_backward(&mut state, &batch, 0.05, &mut Rng::new(3))
                    .unwrap();
                state
                    .params
                    .iter()
                    .flat_map(|(_, p)| p.grad.clone())
                    .collect::<Vec<f32>>()
            };
            let (recomputed, kept) = (grads(true), grads(false));
            assert!(recomputed.iter().any(|&g| g != 0.0));
            assert_eq!(recomputed, kept, "full fine-tuning: {full}");
        }
    }

    /// Several sequences decoded together (PPO's rollouts: prompts of different lengths, then
    /// one token each, a sequence leaving the batch) against the CPU's batched decoder, with
    /// 16-bit and 4-bit weights.
    #[test]
    fn batched_gpu_decoding_matches_the_cpu() {
        use crate::model::{ForwardOptions, Model};
        use crate::train::params::TrainState;
        use crate::train::rollout::{BatchDecoder, CpuBatchDecoder};
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models");
        let mut gpu = sim();
        let nf4 = nf4();
        // 4-bit weights: up to 8 rows take one fused GEMV per row.
        for (name, quant) in [("qwen2", None), ("gpt2", None), ("llama_gqa", Some(nf4))] {
            let model = Model::load_with(&root.join(name), quant).unwrap();
            let state = TrainState::new(model.linears().len());
            let opts = ForwardOptions::default();
            let prompts: Vec<Vec<u32>> = [5u32, 9, 2]
                .iter()
                .map(|&n| (1..=n).map(|t| t * 7 % 100).collect())
                .collect();
            let refs: Vec<&[u32]> = prompts.iter().map(|p| &p[..]).collect();
            let mut engine = crate::gpu::engine::GpuEngine::for_eval(gpu, &model, &state).unwrap();
            engine.use_adapters_for_decoding(&state).unwrap();
            {
                let mut dev =
                    crate::gpu::decode::GpuBatchDecoder::new(&mut engine, &refs, 4, 128).unwrap();
                let mut cpu = CpuBatchDecoder::new(&model, 3, &opts).unwrap();
                let mut next: Vec<Vec<u32>> = prompts.clone();
                for (step, active) in [vec![0, 1, 2], vec![0, 1, 2], vec![0, 2], vec![2]]
                    .iter()
                    .enumerate()
                {
                    let (c, g) = (
                        cpu.step(active, &next).unwrap(),
                        dev.step(active, &next).unwrap(),
                    );
                    assert_eq!(c.len(), g.len());
                    let worst = crate::gpu::check::rel_err(&g, &c);
                    assert!(worst < 5e-2, "{name} step {step}: logits differ by {worst}");
                    for &i in active {
                        next[i] = vec![(step as u32 * 13 + i as u32) % 100];
                    }
                }
            }
            gpu = engine.gpu;
        }
    }

    /// Generation and evaluation with an adapter of every PEFT type, against the CPU's, on a
    /// Llama-family model and on GPT-2 (learned positions: the prefix and the virtual tokens
    /// shift them).
    #[test]
    fn gpu_generation_and_evaluation_take_every_adapter_type() {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models");
        let mut gpu = sim();
        for name in ["llama_gqa", "gpt2"] {
            let (v, failed, g) = check::adapters_vs_cpu(gpu, &root.join(name)).unwrap();
            gpu = g;
            assert_eq!(failed, 0, "{name}: {v:#}");
        }
    }

    /// Evaluation with the adapters on, and off (the base model: DPO's reference pass).
    #[test]
    fn gpu_evaluation_matches_the_cpu_with_and_without_adapters() {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models");
        let (v, failed, _) = check::eval_vs_cpu(sim(), &root.join("qwen2")).unwrap();
        assert_eq!(failed, 0, "{v:#}");
    }

    /// The whole GPU training step (every method) against the CPU engine on the committed
    /// tiny models: loss, all gradients, and each tensor's gradient on its own.
    #[test]
    fn gpu_engine_steps_match_the_cpu_engine() {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models");
        let mut gpu = sim();
        for name in ["llama_gqa", "llama_untied", "llama3_rope", "qwen2", "gpt2"] {
            for case in check::EngineCase::every() {
                let (v, failed, g) = check::engine_vs_cpu(gpu, &root.join(name), case).unwrap();
                gpu = g;
                assert_eq!(failed, 0, "{name} {case:?}: {v:#}");
                let worst = v[1]["worst"][0][1].as_f64().unwrap();
                assert!(worst < 0.06, "{name} {case:?}: worst tensor {worst}: {v:#}");
            }
        }
    }
}
