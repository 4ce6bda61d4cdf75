//! The device check behind `gpu-check`: every kernel against the CPU path (and its speed
//! against the roofline it is bound by), the whole LoRA/QLoRA step against the CPU engine,
//! and training throughput and peak memory on a model folder.

use super::blas::Gemm;
use super::device::{Arg, Gpu};
use super::engine::loss::{launch_cross_entropy, CeKernel};
use super::engine::GpuEngine;
use super::flash::{launch_flash_bwd, launch_flash_fwd, FlashArgs};
use super::weights::{launch_gemv_q4, Q4Ptrs};
use crate::error::{Error, Result};
use crate::model::{Model, QuantizeOnLoad};
use crate::quant::{blockwise, QuantType};
use crate::rng::Rng;
use crate::train::engine::{Batch, Engine};
use crate::train::lora::{self, LoraConfig, Targets};
use crate::train::optim::AdamW;
use crate::train::params::TrainState;
use serde_json::{json, Value};
use std::path::Path;
use std::time::Instant;

fn rand_vec(rng: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.normal() * scale).collect()
}

fn bf(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

/// max |a − b| / max(max |b|, tiny); infinite where `a` has a NaN or infinity that `b` has
/// not (f64::max would skip a NaN and pass the check).
pub(crate) fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let mut num = 0f64;
    let mut den = 1e-30f64;
    for (&x, &y) in a.iter().zip(b) {
        if !x.is_finite() && y.is_finite() {
            return f64::INFINITY;
        }
        num = num.max((x as f64 - y as f64).abs());
        den = den.max((y as f64).abs());
    }
    num / den
}

/// Seconds per call of `f`, after a warm-up, over `reps` calls.
fn time(gpu: &Gpu, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    gpu.sync()?;
    let t = Instant::now();
    for _ in 0..reps {
        f()?;
    }
    gpu.sync()?;
    Ok(t.elapsed().as_secs_f64() / reps as f64)
}

struct Report {
    rows: Vec<Value>,
    failed: usize,
}

impl Report {
    fn add(&mut self, name: &str, err: f64, tol: f64, extra: Value) {
        let pass = err <= tol && err.is_finite();
        if !pass {
            self.failed += 1;
        }
        let mut v = json!({"check": name, "error": err, "tolerance": tol, "pass": pass});
        if let (Some(o), Value::Object(e)) = (v.as_object_mut(), extra) {
            o.extend(e);
        }
        crate::cli::info(format!(
            "{:<28} error {:.2e} (tolerance {:.0e}) {}",
            name,
            err,
            tol,
            if pass { "ok" } else { "FAILED" }
        ));
        self.rows.push(v);
    }
}

/// Device-to-device copy bandwidth (bytes read + written per second): the memory roofline.
fn copy_bandwidth(gpu: &Gpu, bytes: usize, reps: usize) -> Result<f64> {
    let a = gpu.alloc(bytes)?;
    let b = gpu.alloc(bytes)?;
    let t = time(gpu, reps, || gpu.copy(&b, &a, bytes))?;
    Ok(2.0 * bytes as f64 / t)
}

/// The problem sizes of [`kernels`]: a GPU's (large enough to time against the roofline) or
/// the simulator's (small, odd where a kernel has a tail path, and not timed).
pub struct KernelShapes {
    /// RMSNorm rows × hidden.
    pub norm: (usize, usize),
    /// SwiGLU width per norm row.
    pub swiglu_cols: usize,
    /// 4-bit weight out × in and block size.
    pub q4: (usize, usize, usize),
    /// More 4-bit GEMV shapes (out × in, block size 64): the layers of a model, from small
    /// (launch-bound) to large.
    pub gemv: &'static [(usize, usize)],
    /// The checked product m × n × k, and the timed square product's size.
    pub gemm: (usize, usize, usize),
    pub gemm_speed: Option<usize>,
    /// Cross-entropy rows × vocabulary.
    pub ce: (usize, usize),
    pub copy_bytes: usize,
    /// Flash attention: (sequences, heads, kv heads, L, head dim, sliding window or 0); the
    /// sequences are L, then shorter (padding).
    pub attention: &'static [(usize, usize, usize, usize, usize, usize)],
    /// Time the kernels (false: one call each).
    pub timed: bool,
}

impl KernelShapes {
    pub fn device() -> Self {
        Self {
            norm: (4096, 2048),
            swiglu_cols: 4096,
            q4: (8192, 8192, 64),
            // A 1B Llama's q/o, k/v, gate/up and down projections, and a 7B's MLP.
            gemv: &[
                (2048, 2048),
                (512, 2048),
                (8192, 2048),
                (2048, 8192),
                (11008, 4096),
            ],
            gemm: (512, 1024, 2048),
            gemm_speed: Some(8192),
            ce: (1024, 49152),
            copy_bytes: 1 << 30,
            attention: &[
                (4, 32, 8, 1024, 64, 0),
                (2, 32, 8, 2048, 128, 0),
                (2, 8, 2, 300, 64, 100),
            ],
            timed: true,
        }
    }

    pub fn simulator() -> Self {
        Self {
            norm: (6, 200),
            swiglu_cols: 67,
            q4: (42, 1056, 64),
            // 32 rows per block (8192 rows and more) with a partial last block; one chunk.
            gemv: &[(8200, 64), (3, 32)],
            gemm: (12, 20, 36),
            gemm_speed: None,
            ce: (5, 12000),
            copy_bytes: 1 << 16,
            attention: &[
                (2, 4, 2, 70, 64, 0),
                (2, 2, 1, 40, 128, 0),
                (1, 2, 2, 90, 64, 20),
                (2, 4, 1, 33, 16, 0),
                (1, 2, 2, 20, 80, 0),
                // Query tiles wholly after key tiles, inside the sequence: the unmasked path.
                (2, 2, 1, 200, 32, 0),
            ],
            timed: false,
        }
    }

    fn reps(&self, n: usize) -> usize {
        if self.timed {
            n
        } else {
            0
        }
    }
}

/// NCCL on this GPU, as one rank of one (`cuda:N` builds): the communicator starts, and sums
/// in place a buffer of the training engine's (its raw address, in the context the engine
/// opened), as data-parallel runs sum the gradients AdamW keeps on the device. One rank's sum
/// is its input. Returns (json, failures); no NCCL library is not a failure.
#[cfg(feature = "cuda")]
pub fn nccl_one_rank(gpu: &Gpu) -> Result<(Value, usize)> {
    use crate::dist::{nccl::Nccl, Communicator, Single};
    let super::DeviceSpec::Cuda(ordinal) = gpu.spec else {
        return Ok((json!({"skipped": "not a CUDA device"}), 0));
    };
    let mut comm = match Nccl::new(Box::new(Single), ordinal) {
        Ok(c) => c,
        Err(e) if e.to_string().contains("was not found") => {
            crate::cli::info(format!("NCCL: skipped ({e})"));
            return Ok((json!({"skipped": e.to_string()}), 0));
        }
        Err(e) => return Err(e),
    };
    let want: Vec<f32> = (0..100_003).map(|i| (i % 97) as f32 * 0.25 - 3.0).collect();
    let buf = gpu.upload(&want)?;
    gpu.sync()?;
    comm.all_reduce_sum_gpu(buf.ptr, want.len())?;
    let got = gpu.download_f32(&buf, want.len())?;
    let mut host = want.clone();
    comm.all_reduce_sum(&mut host)?;
    let pass = got == want && host == want;
    crate::cli::info(format!(
        "NCCL, one rank: in-place sum of the engine's memory and of host memory {}",
        if pass { "ok" } else { "FAILED" }
    ));
    Ok((json!({"pass": pass}), usize::from(!pass)))
}

/// Kernel-by-kernel checks and speeds. Returns (json rows, failures).
pub fn kernels(gpu: &Gpu, s: &KernelShapes) -> Result<(Value, usize)> {
    let mut rep = Report {
        rows: Vec::new(),
        failed: 0,
    };
    let mut rng = Rng::new(7);
    let bw = copy_bandwidth(gpu, s.copy_bytes, s.reps(10))?;
    if s.timed {
        crate::cli::info(format!("copy bandwidth {:.0} GB/s", bw / 1e9));
    }

    // RMSNorm forward/backward
    let (rows, d) = s.norm;
    let x = rand_vec(&mut rng, rows * d, 1.0);
    let w = rand_vec(&mut rng, d, 1.0);
    let dy = rand_vec(&mut rng, rows * d, 1.0);
    let eps = 1e-5f32;
    let (gx, gw, gdy) = (gpu.upload(&x)?, gpu.upload(&w)?, gpu.upload(&dy)?);
    let gy = gpu.alloc_bf16(rows * d)?;
    let grs = gpu.alloc_f32(rows)?;
    let gdx = gpu.alloc_f32(rows * d)?;
    let norm_fwd = || {
        gpu.launch_norm(
            rows,
            d,
            &[
                Arg::P(gx.ptr),
                Arg::P(gw.ptr),
                Arg::P(gy.ptr),
                Arg::P(grs.ptr),
                Arg::I(d as i32),
                Arg::F(eps),
            ],
        )
    };
    let t = time(gpu, s.reps(20), norm_fwd)?;
    let mut want = vec![0f32; rows * d];
    let mut want_dx = vec![0f32; rows * d];
    for r in 0..rows {
        let xr = &x[r * d..(r + 1) * d];
        let ss: f64 = xr.iter().map(|&v| (v as f64) * (v as f64)).sum();
        let rs = 1.0 / (ss / d as f64 + eps as f64).sqrt();
        let dyr = &dy[r * d..(r + 1) * d];
        let dot: f64 = (0..d)
            .map(|c| w[c] as f64 * dyr[c] as f64 * xr[c] as f64)
            .sum();
        for c in 0..d {
            want[r * d + c] = bf((xr[c] as f64 * rs * w[c] as f64) as f32);
            want_dx[r * d + c] = (rs * w[c] as f64 * dyr[c] as f64
                - xr[c] as f64 * dot * rs * rs * rs / d as f64)
                as f32;
        }
    }
    let got = gpu.download_bf16(&gy, rows * d)?;
    rep.add(
        "rmsnorm_fwd",
        rel_err(&got, &want),
        1e-2,
        json!({"ms": t * 1e3, "roofline_fraction": (rows * d * 6) as f64 / t / bw}),
    );
    let norm_bwd = || {
        gpu.launch_rows(
            "rmsnorm_bwd",
            rows,
            d,
            &[
                Arg::P(gx.ptr),
                Arg::P(gw.ptr),
                Arg::P(grs.ptr),
                Arg::P(gdy.ptr),
                Arg::P(gdx.ptr),
                Arg::I(d as i32),
            ],
        )
    };
    // The kernel adds into dx (zeroed at allocation): check one call, then time.
    norm_bwd()?;
    let got = gpu.download_f32(&gdx, rows * d)?;
    let t = time(gpu, s.reps(20), norm_bwd)?;
    rep.add(
        "rmsnorm_bwd",
        rel_err(&got, &want_dx),
        1e-4,
        json!({"ms": t * 1e3, "roofline_fraction": (rows * d * 16) as f64 / t / bw}),
    );

    // SwiGLU forward/backward
    let n = rows * s.swiglu_cols;
    let g = rand_vec(&mut rng, n, 2.0);
    let u = rand_vec(&mut rng, n, 1.0);
    let da = rand_vec(&mut rng, n, 1.0);
    let (gg, gu, gda) = (gpu.upload(&g)?, gpu.upload(&u)?, gpu.upload(&da)?);
    let (ga, gdg, gdu) = (gpu.alloc_bf16(n)?, gpu.alloc_bf16(n)?, gpu.alloc_bf16(n)?);
    let t = time(gpu, s.reps(20), || {
        gpu.launch_n(
            "silu_mul_fwd",
            n,
            &[
                Arg::P(gg.ptr),
                Arg::P(gu.ptr),
                Arg::P(ga.ptr),
                Arg::L(n as i64),
            ],
        )
    })?;
    let sig = |x: f32| 1.0 / (1.0 + (-x as f64).exp());
    let want: Vec<f32> = (0..n)
        .map(|i| bf((g[i] as f64 * sig(g[i]) * u[i] as f64) as f32))
        .collect();
    rep.add(
        "silu_mul_fwd",
        rel_err(&gpu.download_bf16(&ga, n)?, &want),
        1e-2,
        json!({"ms": t * 1e3, "roofline_fraction": (n * 10) as f64 / t / bw}),
    );
    let t = time(gpu, s.reps(20), || {
        gpu.launch_n(
            "silu_mul_bwd",
            n,
            &[
                Arg::P(gg.ptr),
                Arg::P(gu.ptr),
                Arg::P(gda.ptr),
                Arg::P(gdg.ptr),
                Arg::P(gdu.ptr),
                Arg::L(n as i64),
            ],
        )
    })?;
    let want_dg: Vec<f32> = (0..n)
        .map(|i| {
            let s = sig(g[i]);
            bf((da[i] as f64 * u[i] as f64 * s * (1.0 + g[i] as f64 * (1.0 - s))) as f32)
        })
        .collect();
    let want_du: Vec<f32> = (0..n)
        .map(|i| bf((da[i] as f64 * g[i] as f64 * sig(g[i])) as f32))
        .collect();
    let err = rel_err(&gpu.download_bf16(&gdg, n)?, &want_dg)
        .max(rel_err(&gpu.download_bf16(&gdu, n)?, &want_du));
    rep.add(
        "silu_mul_bwd",
        err,
        1e-2,
        json!({"ms": t * 1e3, "roofline_fraction": (n * 16) as f64 / t / bw}),
    );

    // GPT-2's LayerNorm (forward, input gradient, weight and bias gradients) and GELU.
    layernorm_and_gelu(gpu, s, &mut rep, &mut rng)?;

    // 4-bit decode: bit-exact with the CPU decoder; fused GEMV against decode + f64 product.
    let (out, inp, bs) = s.q4;
    let wq = rand_vec(&mut rng, out * inp, 0.02);
    let (packed, absmax) = blockwise::quantize_4bit(&wq, bs, QuantType::Nf4);
    let code = QuantType::Nf4.code();
    let cpu = blockwise::dequantize_4bit(&packed, &absmax, out * inp, bs, code);
    let (gp, gam, gc) = (
        gpu.upload(&packed)?,
        gpu.upload(&absmax)?,
        gpu.upload(&code[..])?,
    );
    let gout = gpu.alloc_f32(out * inp)?;
    gpu.launch_n(
        "dequant_q4_f32",
        out * inp / 2,
        &[
            Arg::P(gp.ptr),
            Arg::P(gam.ptr),
            Arg::P(gc.ptr),
            Arg::P(gout.ptr),
            Arg::L((out * inp) as i64),
            Arg::I(bs as i32),
        ],
    )?;
    let got = gpu.download_f32(&gout, out * inp)?;
    let exact = got
        .iter()
        .zip(&cpu)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    rep.add(
        "dequant_q4 (bit-exact)",
        exact as f64,
        0.0,
        json!({"mismatches": exact}),
    );
    drop(gout);
    let gbf = gpu.alloc_bf16(out * inp)?;
    let t = time(gpu, s.reps(20), || {
        gpu.launch_n(
            "dequant_q4_bf16",
            out * inp / 2,
            &[
                Arg::P(gp.ptr),
                Arg::P(gam.ptr),
                Arg::P(gc.ptr),
                Arg::P(gbf.ptr),
                Arg::L((out * inp) as i64),
                Arg::I(bs as i32),
            ],
        )
    })?;
    let got = gpu.download_bf16(&gbf, out * inp)?;
    let exact = got
        .iter()
        .zip(&cpu)
        .filter(|(a, b)| a.to_bits() != bf(**b).to_bits())
        .count();
    rep.add(
        "dequant_q4_bf16 (bit-exact)",
        exact as f64,
        0.0,
        json!({"ms": t * 1e3, "roofline_fraction": (out * inp / 2 + out * inp * 2 + absmax.len() * 4) as f64 / t / bw}),
    );
    let q4 = Q4Ptrs {
        packed: gp.ptr,
        absmax: gam.ptr,
        code: gc.ptr,
        blocksize: bs,
    };
    let shape = (out, inp, absmax.len());
    check_gemv(gpu, &mut rep, &mut rng, &q4, &cpu, shape, s.reps(50), bw)?;
    gemv_shapes(gpu, s, &mut rep, &mut rng, bw)?;
    // The fused 4-bit GEMM, both products a linear layer takes (x·Wᵀ, and dy·W added into
    // what is there), against f64 products of the decoded weight; on a GPU also timed against
    // decoding into bf16 and cuBLAS.
    let m = if s.timed { 2048 } else { 37 };
    // (Tensor-core kernels: sm_80 and later; older GPUs skip them, as the engine does.)
    let products: &[(i32, &str)] = if gpu.bf16_tensor_cores() {
        &[(1, "x·Wᵀ"), (0, "dy·W, accumulated")]
    } else {
        &[]
    };
    for &(w_nk, name) in products {
        let (n, k) = if w_nk == 1 { (out, inp) } else { (inp, out) };
        let x: Vec<f32> = rand_vec(&mut rng, m * k, 1.0)
            .iter()
            .map(|&v| bf(v))
            .collect();
        let y0 = rand_vec(&mut rng, m * n, 1.0);
        let (gx, gy) = (gpu.upload_bf16(&x)?, gpu.upload(&y0)?);
        let fused = || {
            gpu.launch(
                "gemm_q4",
                (m.div_ceil(64) * n.div_ceil(64)) as u32,
                128,
                &[
                    Arg::P(gx.ptr),
                    Arg::P(gp.ptr),
                    Arg::P(gam.ptr),
                    Arg::P(gc.ptr),
                    Arg::P(gy.ptr),
                    Arg::I(m as i32),
                    Arg::I(n as i32),
                    Arg::I(k as i32),
                    Arg::I(bs as i32),
                    Arg::I(w_nk),
                    Arg::I(1 - w_nk),
                ],
            )
        };
        fused()?;
        let got = gpu.download_f32(&gy, m * n)?;
        // Every row on the simulator; on a GPU the first 16 and the last (an f64 reference of
        // the whole product would take minutes on the host).
        let rows: Vec<usize> = (0..m.min(16)).chain((m > 16).then_some(m - 1)).collect();
        let w_at = |nn: usize, kk: usize| {
            if w_nk == 1 {
                cpu[nn * inp + kk]
            } else {
                cpu[kk * inp + nn]
            }
        };
        let (mut g_rows, mut want) = (Vec::new(), Vec::new());
        for &r in &rows {
            for c in 0..n {
                let dot: f64 = (0..k)
                    .map(|j| x[r * k + j] as f64 * bf(w_at(c, j)) as f64)
                    .sum();
                want.push((dot + if w_nk == 1 { 0.0 } else { y0[r * n + c] as f64 }) as f32);
                g_rows.push(got[r * n + c]);
            }
        }
        let t_fused = time(gpu, s.reps(10), fused)?;
        let t_decoded = time(gpu, s.reps(10), || {
            gpu.launch_n(
                "dequant_q4_bf16",
                (out * inp).div_ceil(2),
                &[
                    Arg::P(gp.ptr),
                    Arg::P(gam.ptr),
                    Arg::P(gc.ptr),
                    Arg::P(gbf.ptr),
                    Arg::L((out * inp) as i64),
                    Arg::I(bs as i32),
                ],
            )?;
            let g = if w_nk == 1 {
                Gemm::nt(m, n, k, gx.ptr, gbf.ptr, gy.ptr)
            } else {
                Gemm::nn(m, n, k, gx.ptr, gbf.ptr, gy.ptr)
            };
            gpu.gemm(&g)
        })?;
        rep.add(
            &format!("gemm_q4 (fused NF4 GEMM, {name})"),
            rel_err(&g_rows, &want),
            1e-4,
            json!({"ms": t_fused * 1e3, "decode_and_cublas_ms": t_decoded * 1e3,
                   "tflops": 2.0 * (m * n * k) as f64 / t_fused / 1e12}),
        );
    }
    drop((gbf, gp, gam));

    // bf16 product (cuBLAS) against an f64 product of the same bf16 inputs.
    let (m, nn, k) = s.gemm;
    let a = rand_vec(&mut rng, m * k, 1.0);
    let b = rand_vec(&mut rng, nn * k, 1.0);
    let (ga_, gb_) = (gpu.upload_bf16(&a)?, gpu.upload_bf16(&b)?);
    let gc_ = gpu.alloc_f32(m * nn)?;
    gpu.gemm(&Gemm::nt(m, nn, k, ga_.ptr, gb_.ptr, gc_.ptr))?;
    let want: Vec<f32> = (0..m * nn)
        .map(|i| {
            let (r, c) = (i / nn, i % nn);
            (0..k)
                .map(|j| bf(a[r * k + j]) as f64 * bf(b[c * k + j]) as f64)
                .sum::<f64>() as f32
        })
        .collect();
    rep.add(
        "gemm bf16 (cuBLAS)",
        rel_err(&gpu.download_f32(&gc_, m * nn)?, &want),
        1e-4,
        json!({}),
    );
    if let Some(sz) = s.gemm_speed {
        let (m, nn, k) = (sz, sz, sz);
        let (a2, b2, c2) = (
            gpu.alloc_bf16(m * k)?,
            gpu.alloc_bf16(nn * k)?,
            gpu.alloc_f32(m * nn)?,
        );
        let t = time(gpu, s.reps(10), || {
            gpu.gemm(&Gemm::nt(m, nn, k, a2.ptr, b2.ptr, c2.ptr))
        })?;
        let tflops = 2.0 * (m * nn * k) as f64 / t / 1e12;
        rep.add(
            &format!("gemm bf16 {sz}³ speed"),
            0.0,
            0.0,
            json!({"ms": t * 1e3, "tflops": tflops}),
        );
        drop((a2, b2, c2));
    }

    // Cross-entropy: the float4 path, and the scalar one (a vocabulary not a multiple of 4).
    let (cr, v) = s.ce;
    // Each with the row cached in shared memory where it fits (the engine's choice), and read
    // twice from global memory.
    for (kernel, label) in [(CeKernel::Best, ""), (CeKernel::Uncached, ", uncached")] {
        let odd = format!(", V odd{label}");
        cross_entropy(
            gpu,
            &mut rep,
            &mut rng,
            (cr, v),
            kernel,
            s.reps(20),
            bw,
            label,
        )?;
        cross_entropy(gpu, &mut rep, &mut rng, (cr, v - 1), kernel, 0, bw, &odd)?;
    }
    // Bottleneck adapters' activations (ReLU, SiLU) and their derivatives, element by element.
    let z: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) / 97.0).collect();
    let dz = rand_vec(&mut rng, z.len(), 1.0);
    let (gz, gdz) = (gpu.upload(&z)?, gpu.upload(&dz)?);
    let (ga_, gd_) = (gpu.alloc_bf16(z.len())?, gpu.alloc_bf16(z.len())?);
    let silu = |v: f32| v as f64 / (1.0 + (-v as f64).exp());
    for (kind, name) in [(0, "relu"), (1, "silu")] {
        let n = Arg::L(z.len() as i64);
        gpu.launch_n(
            "adapter_act",
            z.len(),
            &[Arg::P(gz.ptr), Arg::P(ga_.ptr), n, Arg::I(kind)],
        )?;
        gpu.launch_n(
            "adapter_act_bwd",
            z.len(),
            &[
                Arg::P(gdz.ptr),
                Arg::P(gz.ptr),
                Arg::P(gd_.ptr),
                n,
                Arg::I(kind),
            ],
        )?;
        let want_a: Vec<f32> = z
            .iter()
            .map(|&v| {
                bf(if kind == 0 {
                    v.max(0.0)
                } else {
                    silu(v) as f32
                })
            })
            .collect();
        let want_d: Vec<f32> = z
            .iter()
            .zip(&dz)
            .map(|(&v, &g)| {
                let d = if kind == 0 {
                    f64::from(u8::from(v > 0.0))
                } else {
                    let s = 1.0 / (1.0 + (-v as f64).exp());
                    s * (1.0 + v as f64 * (1.0 - s))
                };
                bf((g as f64 * d) as f32)
            })
            .collect();
        let err = rel_err(&gpu.download_bf16(&ga_, z.len())?, &want_a)
            .max(rel_err(&gpu.download_bf16(&gd_, z.len())?, &want_d));
        rep.add(&format!("adapter_act ({name})"), err, 1e-2, json!({}));
    }
    let attention = if gpu.bf16_tensor_cores() {
        s.attention
    } else {
        crate::cli::info("no bf16 tensor cores (before sm_80): the flash and fused 4-bit GEMM kernels are not checked; the engine does not use them here");
        &[]
    };
    for &(nseq, heads, kvh, l, dh, window) in attention {
        if !super::flash::flash_available(gpu, dh) {
            crate::cli::info(format!(
                "flash attention at head size {dh} cannot run on this GPU (shared memory): not checked"
            ));
            continue;
        }
        check_flash(
            gpu,
            &mut rng,
            &mut rep,
            s,
            (nseq, heads, kvh, l, dh, window),
        )?;
    }
    Ok((
        json!({"copy_bandwidth_gbs": bw / 1e9, "kernels": rep.rows}),
        rep.failed,
    ))
}

/// Causal attention in f64 over the padded layout (`[seq, heads, L, dh]`, inputs as given):
/// the reference for the flash kernels. Rows at or past their sequence's length are zero.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_reference(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    lens: &[usize],
    heads: usize,
    kvh: usize,
    l: usize,
    dh: usize,
    window: usize,
) -> Vec<f32> {
    use rayon::prelude::*;
    let mut out = vec![0f32; q.len()];
    // One (sequence, head) per task: the device check's shapes take minutes on one thread.
    out.par_chunks_mut(l * dh)
        .enumerate()
        .for_each(|(sh, out)| {
            let (s, h) = (sh / heads, sh % heads);
            let len = lens[s];
            let kh = h / (heads / kvh);
            let qb = (s * heads + h) * l * dh;
            let kb = (s * kvh + kh) * l * dh;
            for t in 0..len {
                let (lo, p) = causal_probs(q, k, qb + t * dh, kb, t, dh, window);
                for c in 0..dh {
                    let o: f64 = (lo..=t)
                        .zip(&p)
                        .map(|(j, p)| p * v[kb + j * dh + c] as f64)
                        .sum();
                    out[t * dh + c] = o as f32;
                }
            }
        });
    out
}

/// Cross-entropy over `cr` rows of a `v` vocabulary against f64: the loss, then at a
/// sampling temperature (PPO) the log-probabilities, entropies and gradient, by `kernel`. Timed over
/// `reps` calls (none: 0).
#[allow(clippy::too_many_arguments)]
fn cross_entropy(
    gpu: &Gpu,
    rep: &mut Report,
    rng: &mut Rng,
    (cr, v): (usize, usize),
    kernel: CeKernel,
    reps: usize,
    bw: f64,
    label: &str,
) -> Result<()> {
    let logits = rand_vec(rng, cr * v, 3.0);
    let tgt: Vec<i32> = (0..cr).map(|i| ((i * 7919) % v) as i32).collect();
    let (gl, gt) = (gpu.upload(&logits)?, gpu.upload(&tgt)?);
    let (gn, gg2, ge) = (
        gpu.alloc_f32(cr)?,
        gpu.alloc_bf16(cr * v)?,
        gpu.alloc_f32(cr)?,
    );
    // (scale, 1/temperature, entropies wanted)
    let ce = |scale: f32, inv_t: f32, entropy: bool| {
        launch_cross_entropy(
            gpu,
            cr,
            v,
            kernel,
            &[
                Arg::P(gl.ptr),
                Arg::P(gt.ptr),
                Arg::P(gn.ptr),
                Arg::P(gg2.ptr),
                Arg::I(v as i32),
                Arg::F(scale),
                Arg::P(0),
                Arg::F(inv_t),
                Arg::P(if entropy { ge.ptr } else { 0 }),
                Arg::P(0),
            ],
        )
    };
    let t = time(gpu, reps, || ce(1.0, 1.0, false))?;
    let want: Vec<f32> = (0..cr)
        .map(|r| {
            let row = &logits[r * v..(r + 1) * v];
            let m = row.iter().cloned().fold(f32::MIN, f32::max) as f64;
            let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
            (lse - row[tgt[r] as usize] as f64) as f32
        })
        .collect();
    rep.add(
        &format!("cross_entropy{label}"),
        rel_err(&gpu.download_f32(&gn, cr)?, &want),
        1e-5,
        json!({"ms": t * 1e3, "roofline_fraction": (cr * v * 6) as f64 / t / bw}),
    );
    // At a sampling temperature (PPO): log-probabilities, entropies and the gradient of the
    // tempered distribution.
    let inv_t = 1.0 / 0.7f32;
    ce(0.5, inv_t, true)?;
    let (mut want_nll, mut want_ent, mut want_grad) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..cr {
        let z: Vec<f64> = logits[r * v..(r + 1) * v]
            .iter()
            .map(|&x| x as f64 * inv_t as f64)
            .collect();
        let m = z.iter().cloned().fold(f64::MIN, f64::max);
        let lse = m + z.iter().map(|&x| (x - m).exp()).sum::<f64>().ln();
        want_nll.push((lse - z[tgt[r] as usize]) as f32);
        let p: Vec<f64> = z.iter().map(|&x| (x - lse).exp()).collect();
        want_ent.push(-p.iter().map(|&q| q * q.ln()).sum::<f64>() as f32);
        for (j, &q) in p.iter().enumerate() {
            let onehot = f64::from(u8::from(j == tgt[r] as usize));
            want_grad.push(((q - onehot) * 0.5 * inv_t as f64) as f32);
        }
    }
    rep.add(
        &format!("cross_entropy at a temperature (nll, entropy{label})"),
        rel_err(&gpu.download_f32(&gn, cr)?, &want_nll)
            .max(rel_err(&gpu.download_f32(&ge, cr)?, &want_ent)),
        1e-5,
        json!({}),
    );
    rep.add(
        &format!("cross_entropy at a temperature (gradient, bf16{label})"),
        rel_err(&gpu.download_bf16(&gg2, cr * v)?, &want_grad),
        8e-3,
        json!({}),
    );
    Ok(())
}

/// The fused 4-bit GEMV on the sweep's shapes (block size 64).
fn gemv_shapes(
    gpu: &Gpu,
    s: &KernelShapes,
    rep: &mut Report,
    rng: &mut Rng,
    bw: f64,
) -> Result<()> {
    let bs = 64;
    let code = QuantType::Nf4.code();
    let gc = gpu.upload(&code[..])?;
    for &(out, inp) in s.gemv {
        let w = rand_vec(rng, out * inp, 0.02);
        let (packed, absmax) = blockwise::quantize_4bit(&w, bs, QuantType::Nf4);
        let dec = blockwise::dequantize_4bit(&packed, &absmax, out * inp, bs, code);
        let (gp, gam) = (gpu.upload(&packed)?, gpu.upload(&absmax)?);
        let q4 = Q4Ptrs {
            packed: gp.ptr,
            absmax: gam.ptr,
            code: gc.ptr,
            blocksize: bs,
        };
        let shape = (out, inp, absmax.len());
        check_gemv(gpu, rep, rng, &q4, &dec, shape, s.reps(50), bw)?;
    }
    Ok(())
}

/// The fused 4-bit GEMV of `q4` (`out` × `inp`, `scales` scales; `dec` its decoded values)
/// against an f64 product, timed over `reps` calls: ms and the fraction of the copy bandwidth
/// the weight's bytes and scales take per call.
#[allow(clippy::too_many_arguments)]
fn check_gemv(
    gpu: &Gpu,
    rep: &mut Report,
    rng: &mut Rng,
    q4: &Q4Ptrs,
    dec: &[f32],
    (out, inp, scales): (usize, usize, usize),
    reps: usize,
    bw: f64,
) -> Result<()> {
    let x = rand_vec(rng, inp, 1.0);
    let gx = gpu.upload(&x)?;
    let gy = gpu.alloc_f32(out)?;
    let gemv = || {
        if launch_gemv_q4(gpu, q4, gx.ptr, gy.ptr, out, inp)? {
            Ok(())
        } else {
            Err(Error::Device(format!(
                "gemv_q4 does not take {out} × {inp}"
            )))
        }
    };
    let t = time(gpu, reps, gemv)?;
    let want: Vec<f32> = dec
        .chunks(inp)
        .map(|row| {
            row.iter()
                .zip(&x)
                .map(|(&w, &x)| w as f64 * x as f64)
                .sum::<f64>() as f32
        })
        .collect();
    rep.add(
        &format!("gemv_q4 {out}×{inp}"),
        rel_err(&gpu.download_f32(&gy, out)?, &want),
        1e-4,
        json!({"ms": t * 1e3, "roofline_fraction": (out * inp / 2 + scales * 4) as f64 / t / bw}),
    );
    Ok(())
}

/// Row `q[qi..qi + dh]`'s causal softmax over the keys of head block `kb` (query position
/// `t`, sliding `window` or 0): the first key it sees and the probabilities, in f64.
fn causal_probs(
    q: &[f32],
    k: &[f32],
    qi: usize,
    kb: usize,
    t: usize,
    dh: usize,
    window: usize,
) -> (usize, Vec<f64>) {
    let scale = 1.0 / (dh as f64).sqrt();
    let lo = if window > 0 {
        (t + 1).saturating_sub(window)
    } else {
        0
    };
    let sc: Vec<f64> = (lo..=t)
        .map(|j| {
            (0..dh)
                .map(|c| q[qi + c] as f64 * k[kb + j * dh + c] as f64)
                .sum::<f64>()
                * scale
        })
        .collect();
    let m = sc.iter().cloned().fold(f64::MIN, f64::max);
    let e: Vec<f64> = sc.iter().map(|x| (x - m).exp()).collect();
    let z: f64 = e.iter().sum();
    (lo, e.into_iter().map(|x| x / z).collect())
}

/// The gradients of [`attention_reference`] given `d_o`: (dQ, dK, dV), in f64.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_backward_reference(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    d_o: &[f32],
    lens: &[usize],
    heads: usize,
    kvh: usize,
    l: usize,
    dh: usize,
    window: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    use rayon::prelude::*;
    let scale = 1.0 / (dh as f64).sqrt();
    let grp = heads / kvh;
    let mut dq = vec![0f64; q.len()];
    let mut dk = vec![0f64; k.len()];
    let mut dv = vec![0f64; v.len()];
    // One (sequence, kv head) per task, with the dQ of its group's query heads: the tasks'
    // outputs do not overlap (the device check's shapes take minutes on one thread).
    dq.par_chunks_mut(grp * l * dh)
        .zip(dk.par_chunks_mut(l * dh))
        .zip(dv.par_chunks_mut(l * dh))
        .enumerate()
        .for_each(|(sk, ((dq, dk), dv))| {
            let (s, kh) = (sk / kvh, sk % kvh);
            let len = lens[s];
            let kb = sk * l * dh;
            for hg in 0..grp {
                let qb = (s * heads + kh * grp + hg) * l * dh;
                let dq = &mut dq[hg * l * dh..(hg + 1) * l * dh];
                for t in 0..len {
                    let (lo, p) = causal_probs(q, k, qb + t * dh, kb, t, dh, window);
                    let dp: Vec<f64> = (lo..=t)
                        .map(|j| {
                            (0..dh)
                                .map(|c| d_o[qb + t * dh + c] as f64 * v[kb + j * dh + c] as f64)
                                .sum()
                        })
                        .collect();
                    let pdp: f64 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
                    for (i, j) in (lo..=t).enumerate() {
                        let ds = p[i] * (dp[i] - pdp) * scale;
                        for c in 0..dh {
                            dv[j * dh + c] += p[i] * d_o[qb + t * dh + c] as f64;
                            dq[t * dh + c] += ds * k[kb + j * dh + c] as f64;
                            dk[j * dh + c] += ds * q[qb + t * dh + c] as f64;
                        }
                    }
                }
            }
        });
    let f = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect();
    (f(dq), f(dk), f(dv))
}

/// The flash attention forward kernel against [`attention_reference`] on bf16 inputs, and its
/// speed (causal FLOPs against the bf16 matrix peak is for the reader: gpu-check prints ms).
fn check_flash(
    gpu: &Gpu,
    rng: &mut Rng,
    rep: &mut Report,
    s: &KernelShapes,
    (nseq, heads, kvh, l, dh, window): (usize, usize, usize, usize, usize, usize),
) -> Result<()> {
    let lens: Vec<usize> = (0..nseq)
        .map(|i| if i == 0 { l } else { l / 2 + i })
        .collect();
    let q: Vec<f32> = rand_vec(rng, nseq * heads * l * dh, 1.0)
        .into_iter()
        .map(bf)
        .collect();
    let k: Vec<f32> = rand_vec(rng, nseq * kvh * l * dh, 1.0)
        .into_iter()
        .map(bf)
        .collect();
    let v: Vec<f32> = rand_vec(rng, nseq * kvh * l * dh, 1.0)
        .into_iter()
        .map(bf)
        .collect();
    let (gq, gk, gv) = (
        gpu.upload_bf16(&q)?,
        gpu.upload_bf16(&k)?,
        gpu.upload_bf16(&v)?,
    );
    let lens_i: Vec<i32> = lens.iter().map(|&x| x as i32).collect();
    let glen = gpu.upload(&lens_i)?;
    let go = gpu.uninit_f32(q.len())?;
    let glse = gpu.uninit_f32(nseq * heads * l)?;
    let args = FlashArgs {
        q: gq.ptr,
        k: gk.ptr,
        v: gv.ptr,
        seq_len: glen.ptr,
        nseq,
        heads,
        kv_heads: kvh,
        l,
        dh,
        window,
    };
    let t = time(gpu, s.reps(10), || {
        launch_flash_fwd(gpu, &args, go.ptr, glse.ptr)
    })?;
    let want = attention_reference(&q, &k, &v, &lens, heads, kvh, l, dh, window);
    let got = gpu.download_f32(&go, q.len())?;
    let causal_flops: f64 = lens
        .iter()
        .map(|&n| 2.0 * 2.0 * (n * (n + 1) / 2) as f64 * dh as f64 * heads as f64)
        .sum();
    rep.add(
        &format!("flash_fwd L={l} d={dh} w={window}"),
        rel_err(&got, &want),
        1e-2,
        json!({"ms": t * 1e3, "tflops": causal_flops / t / 1e12}),
    );

    // Backward: dQ, dK, dV against the f64 gradients of the same bf16 inputs.
    let d_o: Vec<f32> = rand_vec(rng, q.len(), 1.0).into_iter().map(bf).collect();
    let gdo = gpu.upload_bf16(&d_o)?;
    let mut grads = None;
    let t = time(gpu, s.reps(10), || {
        grads = Some(launch_flash_bwd(gpu, &args, gdo.ptr, go.ptr, glse.ptr)?);
        Ok(())
    })?;
    let (gdq, gdk, gdv) = grads.expect("the backward kernel ran");
    let (wq, wk, wv) =
        attention_backward_reference(&q, &k, &v, &d_o, &lens, heads, kvh, l, dh, window);
    let err = rel_err(&gpu.download_f32(&gdq, q.len())?, &wq)
        .max(rel_err(&gpu.download_f32(&gdk, k.len())?, &wk))
        .max(rel_err(&gpu.download_f32(&gdv, v.len())?, &wv));
    rep.add(
        &format!("flash_bwd L={l} d={dh} w={window}"),
        err,
        1e-2,
        json!({"ms": t * 1e3, "tflops": 2.5 * causal_flops / t / 1e12}),
    );
    Ok(())
}

/// LoRA (all linears, random non-zero B so every gradient flows) on `model`; DoRA with
/// `dora`.
/// LayerNorm and GELU (GPT-2's) against f64 references, untimed.
fn layernorm_and_gelu(gpu: &Gpu, s: &KernelShapes, rep: &mut Report, rng: &mut Rng) -> Result<()> {
    let (rows, d) = s.norm;
    let x: Vec<f32> = rand_vec(rng, rows * d, 1.0)
        .iter()
        .map(|v| v + 0.5)
        .collect();
    let (w, b) = (rand_vec(rng, d, 1.0), rand_vec(rng, d, 1.0));
    let dy = rand_vec(rng, rows * d, 1.0);
    let eps = 1e-5f64;
    let (gx, gw, gb, gdy) = (
        gpu.upload(&x)?,
        gpu.upload(&w)?,
        gpu.upload(&b)?,
        gpu.upload(&dy)?,
    );
    let (gy, gst) = (gpu.alloc_bf16(rows * d)?, gpu.alloc_f32(2 * rows)?);
    let (gdx, gdw, gdb) = (
        gpu.alloc_f32(rows * d)?,
        gpu.alloc_f32(d)?,
        gpu.alloc_f32(d)?,
    );
    gpu.launch_rows(
        "layernorm_fwd",
        rows,
        d,
        &[
            Arg::P(gx.ptr),
            Arg::P(gw.ptr),
            Arg::P(gb.ptr),
            Arg::P(gy.ptr),
            Arg::P(gst.ptr),
            Arg::I(d as i32),
            Arg::F(eps as f32),
        ],
    )?;
    gpu.launch_rows(
        "layernorm_bwd",
        rows,
        d,
        &[
            Arg::P(gx.ptr),
            Arg::P(gw.ptr),
            Arg::P(gst.ptr),
            Arg::P(gdy.ptr),
            Arg::P(gdx.ptr),
            Arg::I(d as i32),
        ],
    )?;
    gpu.launch_cols(
        "layernorm_dwb",
        d,
        &[
            Arg::P(gx.ptr),
            Arg::P(gst.ptr),
            Arg::P(gdy.ptr),
            Arg::P(gdw.ptr),
            Arg::P(gdb.ptr),
            Arg::L(rows as i64),
            Arg::I(d as i32),
        ],
    )?;
    let (mut y, mut dx) = (vec![0f32; rows * d], vec![0f32; rows * d]);
    let (mut dw, mut db) = (vec![0f64; d], vec![0f64; d]);
    for r in 0..rows {
        let xr: Vec<f64> = x[r * d..(r + 1) * d].iter().map(|&v| v as f64).collect();
        let dyr: Vec<f64> = dy[r * d..(r + 1) * d].iter().map(|&v| v as f64).collect();
        let mean = xr.iter().sum::<f64>() / d as f64;
        let var = xr.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / d as f64;
        let rs = 1.0 / (var + eps).sqrt();
        let xh: Vec<f64> = xr.iter().map(|v| (v - mean) * rs).collect();
        let g: Vec<f64> = (0..d).map(|c| w[c] as f64 * dyr[c]).collect();
        let (mg, mgx) = (
            g.iter().sum::<f64>() / d as f64,
            g.iter().zip(&xh).map(|(a, b)| a * b).sum::<f64>() / d as f64,
        );
        for c in 0..d {
            y[r * d + c] = bf((xh[c] * w[c] as f64 + b[c] as f64) as f32);
            dx[r * d + c] = (rs * (g[c] - mg - xh[c] * mgx)) as f32;
            dw[c] += dyr[c] * xh[c];
            db[c] += dyr[c];
        }
    }
    let f = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
    rep.add(
        "layernorm_fwd",
        rel_err(&gpu.download_bf16(&gy, rows * d)?, &y),
        1e-2,
        json!({}),
    );
    rep.add(
        "layernorm_bwd",
        rel_err(&gpu.download_f32(&gdx, rows * d)?, &dx),
        1e-4,
        json!({}),
    );
    rep.add(
        "layernorm_dwb",
        rel_err(&gpu.download_f32(&gdw, d)?, &f(&dw))
            .max(rel_err(&gpu.download_f32(&gdb, d)?, &f(&db))),
        1e-4,
        json!({}),
    );
    // GELU, both forms, and their derivatives.
    let z: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) / 97.0).collect();
    let dz = rand_vec(rng, z.len(), 1.0);
    let n = z.len();
    let (gz, gdz) = (gpu.upload(&z)?, gpu.upload(&dz)?);
    let (ga, gd) = (gpu.alloc_bf16(n)?, gpu.alloc_bf16(n)?);
    for (kind, name) in [(0, "tanh"), (1, "erf")] {
        gpu.launch_n(
            "gelu_fwd",
            n,
            &[
                Arg::P(gz.ptr),
                Arg::P(ga.ptr),
                Arg::L(n as i64),
                Arg::I(kind),
            ],
        )?;
        gpu.launch_n(
            "gelu_bwd",
            n,
            &[
                Arg::P(gz.ptr),
                Arg::P(gdz.ptr),
                Arg::P(gd.ptr),
                Arg::L(n as i64),
                Arg::I(kind),
            ],
        )?;
        let gelu = |v: f64| -> f64 {
            if kind == 0 {
                let k = (2.0 / std::f64::consts::PI).sqrt();
                0.5 * v * (1.0 + (k * (v + 0.044715 * v * v * v)).tanh())
            } else {
                0.5 * v * (1.0 + libm_erf(v / std::f64::consts::SQRT_2))
            }
        };
        let want: Vec<f32> = z.iter().map(|&v| bf(gelu(v as f64) as f32)).collect();
        // The derivative by central differences of the f64 function.
        let want_d: Vec<f32> = z
            .iter()
            .zip(&dz)
            .map(|(&v, &g)| {
                let h = 1e-5;
                let d = (gelu(v as f64 + h) - gelu(v as f64 - h)) / (2.0 * h);
                bf((g as f64 * d) as f32)
            })
            .collect();
        rep.add(
            &format!("gelu ({name})"),
            rel_err(&gpu.download_bf16(&ga, n)?, &want)
                .max(rel_err(&gpu.download_bf16(&gd, n)?, &want_d)),
            1e-2,
            json!({}),
        );
    }
    Ok(())
}

/// erf(x) for the reference (std has none): its Maclaurin series, which in f64 loses about
/// six digits to cancellation at |x| = 3.6 (the largest the check uses), leaving ~1e-10;
/// ±1 beyond 6.
fn libm_erf(x: f64) -> f64 {
    if x.abs() >= 6.0 {
        return x.signum();
    }
    // Maclaurin series: erf(x) = 2/√π Σ (−1)^n x^(2n+1) / (n! (2n+1)).
    let mut sum = 0f64;
    let mut term = x;
    let mut n = 0f64;
    while term.abs() > 1e-17 * sum.abs().max(1e-300) && n < 200.0 {
        sum += term / (2.0 * n + 1.0);
        n += 1.0;
        term *= -x * x / n;
    }
    sum * 2.0 / std::f64::consts::PI.sqrt()
}

fn lora_state(
    model: &Model,
    rank: usize,
    targets: Targets,
    seed: u64,
    dora: bool,
) -> Result<TrainState> {
    let mut state = TrainState::new(model.linears().len());
    let cfg = LoraConfig {
        rank,
        alpha: 2.0 * rank as f32,
        targets,
        dora,
        ..Default::default()
    };
    let mut rng = Rng::new(seed);
    lora::attach(model, &mut state, &cfg, &mut rng)?;
    for lo in state.lora.iter_mut().flatten() {
        lo.b.iter_mut().for_each(|x| *x = rng.normal() * 0.02);
    }
    Ok(state)
}

fn grads(state: &TrainState) -> Vec<f32> {
    state
        .params
        .iter()
        .flat_map(|(_, p)| p.grad.iter().copied())
        .collect()
}

/// Generation on the GPU ([`super::decode::GpuDecoder`]) against the CPU's KV-cache decoder,
/// teacher-forced: a 7-token prompt, then 5 single tokens; the logits of every step, relative
/// to the largest. `state` holds the adapters (for `model`, loaded into it as `opts` names).
pub fn decode_vs_cpu(
    gpu: Gpu,
    model: &Model,
    state: &TrainState,
    opts: &crate::model::ForwardOptions,
) -> Result<(f64, Gpu)> {
    use crate::generate::{CpuDecoder, Decoder};
    let mut rng = Rng::new(11);
    let vocab = model.config.vocab as u64;
    let toks: Vec<u32> = (0..12).map(|_| (rng.next_u64() % vocab) as u32).collect();
    let mut eng = GpuEngine::for_eval(gpu, model, state)?;
    let mut worst = 0f64;
    {
        let mut cpu = CpuDecoder::new(model, opts)?;
        let mut dev = super::decode::GpuDecoder::new(&mut eng, state, 64)?;
        let steps: Vec<&[u32]> = std::iter::once(&toks[..7])
            .chain(toks[7..].chunks(1))
            .collect();
        for step in steps {
            let (c, g) = (cpu.step(step)?, dev.step(step)?);
            worst = worst.max(rel_err(&g, &c));
        }
    }
    Ok((worst, eng.gpu))
}

/// Evaluation passes of the GPU engine against the CPU engine's on random sequences, with a
/// LoRA adapter whose B is not zero (so that it changes the outputs): the loss with the
/// adapters on, and with them off against the base model (DPO's reference pass).
pub fn eval_vs_cpu(gpu: Gpu, model_dir: &Path) -> Result<(Value, usize, Gpu)> {
    let model = Model::load(model_dir)?;
    let mut state = lora_state(&model, 8, Targets::AllLinear, 1, false)?;
    // B large enough that the adapter moves the loss well past the tolerance below.
    for lo in state.lora.iter_mut().flatten() {
        lo.b.iter_mut().for_each(|x| *x *= 10.0);
    }
    let mut base = TrainState::new(model.linears().len());
    let mut rng = Rng::new(5);
    let vocab = model.config.vocab as u64;
    let seqs: Vec<Vec<u32>> = [29usize, 50]
        .iter()
        .map(|&n| (0..n).map(|_| (rng.next_u64() % vocab) as u32).collect())
        .collect();
    let labels: Vec<Vec<i32>> = seqs
        .iter()
        .map(|s| s.iter().map(|&t| t as i32).collect())
        .collect();
    let batch = Batch {
        ids: seqs.iter().map(|s| &s[..]).collect(),
        labels: labels.iter().map(|s| &s[..]).collect(),
    };
    let cpu = Engine::for_eval(&model);
    let mean = |s: crate::train::engine::StepStats| s.nll_sum / s.loss_tokens as f64;
    let with = mean(cpu.forward_backward(&mut state, &batch, 0.0, &mut Rng::new(0))?);
    let without = mean(cpu.forward_backward(&mut base, &batch, 0.0, &mut Rng::new(0))?);
    let mut eng = GpuEngine::new(gpu, &model, &state)?;
    let g_with = mean(eng.eval(&state, &batch)?);
    eng.set_adapters_enabled(false);
    let g_without = mean(eng.eval(&state, &batch)?);
    eng.set_adapters_enabled(true);
    let mut rep = Report {
        rows: Vec::new(),
        failed: 0,
    };
    let rel = |a: f64, b: f64| (a - b).abs() / b.abs();
    // Random tokens keep the loss near log(vocab), so the adapter moves it by ~0.3%: the
    // tolerance is 1e-3 here (bf16 compute gives 1e-4 to 2e-4), and the adapter's effect
    // must be well above it.
    rep.add(
        "eval with the adapter vs CPU",
        rel(g_with, with),
        1e-3,
        json!({"cpu": with, "gpu": g_with}),
    );
    rep.add(
        "eval, adapter off vs base",
        rel(g_without, without),
        1e-3,
        json!({"cpu": without, "gpu": g_without}),
    );
    // The adapter must matter here, or the two checks above could not tell on from off.
    rep.add(
        "the adapter changes the loss",
        if rel(with, without) > 2.5e-3 {
            0.0
        } else {
            1.0
        },
        0.0,
        json!({"with": with, "without": without}),
    );
    Ok((json!(rep.rows), rep.failed, eng.gpu))
}

/// One step of the GPU engine against the CPU engine (f32) on the same batch: loss and
/// every LoRA gradient. The GPU computes in bf16, so the tolerance is bf16's.
/// What [`engine_vs_cpu`] runs: QLoRA (a 4-bit base), flash attention, DoRA, or IA3 (instead
/// of LoRA, PEFT's default targets for the architecture).
#[derive(Clone, Copy, Debug, Default)]
pub struct EngineCase {
    pub q4: bool,
    /// 4-bit products on the fused `gemm_q4` kernel (with `q4`).
    pub fused_q4: bool,
    pub flash: bool,
    pub dora: bool,
    pub ia3: bool,
    /// Full fine-tuning (every base tensor) instead of adapters.
    pub full: bool,
    /// Prompt tuning (5 virtual tokens) instead of adapters.
    pub prompt: bool,
    /// Prefix tuning (with this reparameterization MLP width) or P-Tuning v2 (0), 4 virtual
    /// tokens, instead of LoRA.
    pub prefix: Option<usize>,
    /// Bottleneck adapters of this variant and activation instead of LoRA.
    pub bottleneck: Option<(
        crate::train::bottleneck::Variant,
        crate::train::bottleneck::Activation,
    )>,
}

impl EngineCase {
    /// Every method the GPU engine runs, as the device check and the simulator tests go
    /// through them: LoRA, QLoRA, LoRA with flash attention, DoRA and IA3 (each on a 16-bit
    /// and a 4-bit base), full fine-tuning, prompt tuning, bottleneck adapters (Houlsby and
    /// parallel), P-Tuning v2, and prefix tuning with flash attention; QLoRA and IA3 on a 4-bit
    /// base once more with the fused 4-bit GEMM.
    pub fn every() -> Vec<Self> {
        use crate::train::bottleneck::{Activation, Variant};
        let base = Self::default();
        vec![
            base,
            Self { q4: true, ..base },
            Self {
                q4: true,
                fused_q4: true,
                ..base
            },
            Self {
                ia3: true,
                q4: true,
                fused_q4: true,
                ..base
            },
            Self {
                flash: true,
                ..base
            },
            Self { dora: true, ..base },
            Self {
                dora: true,
                q4: true,
                ..base
            },
            Self { ia3: true, ..base },
            Self {
                ia3: true,
                q4: true,
                ..base
            },
            Self { full: true, ..base },
            Self {
                prompt: true,
                ..base
            },
            Self {
                bottleneck: Some((Variant::Houlsby, Activation::Silu)),
                ..base
            },
            Self {
                bottleneck: Some((Variant::Parallel, Activation::Silu)),
                ..base
            },
            Self {
                prefix: Some(0),
                ..base
            },
            Self {
                prefix: Some(16),
                flash: true,
                ..base
            },
        ]
    }
}

/// IA3 with PEFT's default targets, its vectors moved off 1 so that they change the outputs.
fn ia3_state(model: &Model, seed: u64) -> Result<TrainState> {
    let mut state = TrainState::new(model.linears().len());
    let cfg = crate::train::ia3::Ia3Config::default_for(model.config.arch);
    crate::train::ia3::attach(model, &mut state, &cfg)?;
    let mut rng = Rng::new(seed);
    for v in state.ia3.iter_mut().flatten() {
        v.l.iter_mut().for_each(|x| *x += rng.normal() * 0.2);
    }
    Ok(state)
}

/// Prompt tuning: 5 random virtual tokens.
fn prompt_state(model: &Model) -> TrainState {
    let mut st = TrainState::new(model.linears().len());
    let h = model.config.hidden;
    let mut rng = Rng::new(4);
    let emb = (0..5 * h).map(|_| rng.normal() * 0.5).collect();
    crate::train::prompt::set_trainable(&mut st, crate::train::prompt::PromptParams { n: 5, emb });
    st
}

/// Bottleneck adapters of `variant` with a non-zero up projection, so that every gradient
/// flows. (The whole-step check uses SiLU: ReLU's derivative jumps at 0, and where bf16
/// rounding moves an input across it the element's gradient flips, 13-18% of the down
/// projection's gradient here; the activation kernels are checked on their own in `kernels`.)
fn bottleneck_state(
    model: &Model,
    (variant, activation): (
        crate::train::bottleneck::Variant,
        crate::train::bottleneck::Activation,
    ),
) -> Result<TrainState> {
    let mut st = TrainState::new(model.linears().len());
    let cfg = crate::train::bottleneck::BottleneckConfig {
        variant,
        size: 8,
        reduction_factor: 16,
        activation,
        base_model_name_or_path: None,
    };
    let mut rng = Rng::new(6);
    crate::train::bottleneck::attach(model, &mut st, &cfg, &mut rng)?;
    if let Some(bp) = &mut st.bottleneck {
        for u in bp.units.iter_mut().flatten().flatten() {
            u.up_w.iter_mut().for_each(|x| *x = rng.normal() * 0.05);
        }
    }
    Ok(st)
}

/// Prefix tuning with 4 virtual tokens, through a reparameterization MLP of `width` (0: none).
fn prefix_state(model: &Model, width: usize) -> Result<TrainState> {
    let mut st = TrainState::new(model.linears().len());
    let cfg = crate::train::prefix::PrefixConfig {
        num_virtual_tokens: 4,
        projection: (width > 0).then_some(width),
        base_model_name_or_path: None,
    };
    crate::train::prefix::attach(model, &mut st, &cfg, &mut Rng::new(8))?;
    Ok(st)
}

/// Generation and evaluation with an adapter of every PEFT type peft-generate and peft-eval
/// load (LoRA, DoRA, IA3, prompt tuning, prefix tuning with and without its MLP, bottleneck
/// adapters in series and in parallel), installed into the CPU model as those tools do,
/// against the same on the GPU: each decoding step's logits, and per-token log-probabilities.
/// Returns (rows, failures, the device).
pub fn adapters_vs_cpu(mut gpu: Gpu, model_dir: &Path) -> Result<(Value, usize, Gpu)> {
    use crate::train::bottleneck::{Activation, Variant};
    use crate::train::lora::AdapterKind;
    let mut rep = Report {
        rows: Vec::new(),
        failed: 0,
    };
    type Make = fn(&Model) -> Result<TrainState>;
    let kinds: [(&str, AdapterKind, Make); 8] = [
        ("lora", AdapterKind::Lora, |m| {
            lora_state(m, 8, Targets::AllLinear, 1, false)
        }),
        ("dora", AdapterKind::Lora, |m| {
            lora_state(m, 8, Targets::AllLinear, 1, true)
        }),
        ("ia3", AdapterKind::Ia3, |m| ia3_state(m, 1)),
        ("prompt", AdapterKind::Prompt, |m| Ok(prompt_state(m))),
        ("prefix", AdapterKind::Prefix, |m| prefix_state(m, 0)),
        ("prefix (MLP)", AdapterKind::Prefix, |m| prefix_state(m, 16)),
        ("bottleneck (Houlsby)", AdapterKind::Bottleneck, |m| {
            bottleneck_state(m, (Variant::Houlsby, Activation::Silu))
        }),
        ("bottleneck (parallel)", AdapterKind::Bottleneck, |m| {
            bottleneck_state(m, (Variant::Parallel, Activation::Silu))
        }),
    ];
    let mut rng = Rng::new(12);
    for (name, kind, make) in kinds {
        let mut model = Model::load(model_dir)?;
        let state = make(&model)?;
        // The same adapter again (every maker is seeded) for the CPU model's hooks.
        let installed = make(&model)?;
        match kind {
            AdapterKind::Lora => lora::install(&mut model, installed, 0),
            AdapterKind::Ia3 => crate::train::ia3::install(&mut model, installed, 0),
            AdapterKind::Prompt => crate::train::prompt::install(&mut model, installed, 0),
            AdapterKind::Prefix => crate::train::prefix::install(&mut model, installed, 0),
            AdapterKind::Bottleneck => crate::train::bottleneck::install(&mut model, installed, 0),
        }
        let opts = crate::model::ForwardOptions { adapter: Some(0) };
        let (worst, g) = decode_vs_cpu(gpu, &model, &state, &opts)?;
        gpu = g;
        // bf16 against f32 gives 1-2.5% of these small logits; a missing adapter or a wrong
        // position gives tens of percent.
        rep.add(
            &format!("{name}: generation logits"),
            worst,
            5e-2,
            json!({}),
        );
        let vocab = model.config.vocab as u64;
        let seqs: Vec<Vec<u32>> = [19usize, 33]
            .iter()
            .map(|&n| (0..n).map(|_| (rng.next_u64() % vocab) as u32).collect())
            .collect();
        let refs: Vec<&[u32]> = seqs.iter().map(|s| &s[..]).collect();
        let cpu = crate::eval::cpu_scorer(&model, &opts)(&refs)?;
        let mut eng = GpuEngine::for_eval(gpu, &model, &state)?;
        let dev = eng.token_logprobs(&state, &refs)?;
        gpu = eng.gpu;
        let err = if cpu.len() == dev.len() {
            cpu.iter()
                .zip(&dev)
                .map(|(a, b)| ((a - b).abs() / a.abs().max(1.0)) as f64)
                .fold(0.0, f64::max)
        } else {
            f64::INFINITY
        };
        // Relative to each log-probability (random tokens: about −6 nats here).
        rep.add(
            &format!("{name}: token log-probabilities"),
            err,
            2e-2,
            json!({}),
        );
    }
    let failed = rep.failed;
    Ok((Value::Array(rep.rows), failed, gpu))
}

pub fn engine_vs_cpu(gpu: Gpu, model_dir: &Path, case: EngineCase) -> Result<(Value, usize, Gpu)> {
    let EngineCase {
        q4,
        fused_q4,
        flash,
        dora,
        ia3,
        full,
        prompt,
        bottleneck,
        prefix,
    } = case;
    let quant = q4.then_some(QuantizeOnLoad {
        quant_type: QuantType::Nf4,
        blocksize: 64,
        double_quant: true,
    });
    let model = Model::load_with(model_dir, quant)?;
    let full_state = || {
        let mut st = TrainState::new(model.linears().len());
        crate::train::full::register(&model, &mut st, |_| true, false);
        st
    };
    let (mut cpu_state, mut gpu_state) = if let Some(w) = prefix {
        (prefix_state(&model, w)?, prefix_state(&model, w)?)
    } else if let Some(b) = bottleneck {
        (bottleneck_state(&model, b)?, bottleneck_state(&model, b)?)
    } else if prompt {
        (prompt_state(&model), prompt_state(&model))
    } else if full {
        (full_state(), full_state())
    } else if ia3 {
        (ia3_state(&model, 1)?, ia3_state(&model, 1)?)
    } else {
        (
            lora_state(&model, 8, Targets::AllLinear, 1, dora)?,
            lora_state(&model, 8, Targets::AllLinear, 1, dora)?,
        )
    };
    let mut rng = Rng::new(3);
    let vocab = model.config.vocab as u32;
    let seqs: Vec<Vec<u32>> = [37usize, 64, 20]
        .iter()
        .map(|&n| {
            (0..n)
                .map(|_| (rng.next_u64() % vocab as u64) as u32)
                .collect()
        })
        .collect();
    let labels: Vec<Vec<i32>> = seqs
        .iter()
        .map(|s| {
            s.iter()
                .enumerate()
                .map(|(i, &t)| if i % 5 == 1 { -100 } else { t as i32 })
                .collect()
        })
        .collect();
    let batch = Batch {
        ids: seqs.iter().map(|s| &s[..]).collect(),
        labels: labels.iter().map(|s| &s[..]).collect(),
    };
    let scale = 1.0 / batch.loss_tokens() as f32;
    let cpu = Engine::new(&model, &cpu_state).forward_backward(
        &mut cpu_state,
        &batch,
        scale,
        &mut Rng::new(0),
    )?;
    let mut eng = GpuEngine::new(gpu, &model, &gpu_state)?;
    // The gradients come back to the host, where this check compares them (the device
    // optimizer would keep the base tensors' on the device).
    eng.keep_optimizer_on_host()?;
    eng.use_flash_attention(flash);
    eng.use_fused_q4(fused_q4);
    let g = eng.forward_backward(&mut gpu_state, &batch, scale, &mut Rng::new(0))?;
    let (gc, gg) = (grads(&cpu_state), grads(&gpu_state));
    let num: f64 = gc
        .iter()
        .zip(&gg)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum();
    let den: f64 = gc.iter().map(|a| (*a as f64).powi(2)).sum();
    let grad_rel = (num / den.max(1e-30)).sqrt();
    let loss_c = cpu.nll_sum / cpu.loss_tokens as f64;
    let loss_g = g.nll_sum / g.loss_tokens as f64;
    let loss_rel = (loss_c - loss_g).abs() / loss_c.abs();
    // Per tensor, to point at the layer and projection if the whole comparison fails.
    let mut per: Vec<(String, f64)> = cpu_state
        .params
        .iter()
        .zip(&gpu_state.params)
        .map(|((slot, c), (_, g))| {
            let num: f64 = c
                .grad
                .iter()
                .zip(&g.grad)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum();
            let den: f64 = c.grad.iter().map(|a| (*a as f64).powi(2)).sum();
            (format!("{slot:?}"), (num / den.max(1e-30)).sqrt())
        })
        .collect();
    per.sort_by(|a, b| b.1.total_cmp(&a.1));
    per.truncate(4);
    let name = format!(
        "{}{} step{} vs CPU",
        match (q4, ia3, full, prompt) {
            _ if bottleneck.is_some() => "bottleneck adapter",
            _ if prefix.is_some() => "prefix tuning",
            (_, _, _, true) => "prompt tuning",
            (_, _, true, _) => "full",
            (_, true, _, _) => "IA3",
            (true, _, _, _) => "QLoRA",
            _ => "LoRA",
        },
        if dora { " (DoRA)" } else { "" },
        if flash { " (flash)" } else { "" }
    );
    let mut rep = Report {
        rows: Vec::new(),
        failed: 0,
    };
    rep.add(
        &format!("{name}: loss"),
        loss_rel,
        1e-2,
        json!({"cpu": loss_c, "gpu": loss_g}),
    );
    rep.add(
        &format!("{name}: gradients"),
        grad_rel,
        5e-2,
        json!({"tensors": gpu_state.params.len(), "worst": per}),
    );
    Ok((Value::Array(rep.rows), rep.failed, eng.gpu))
}

pub struct BenchOptions {
    pub q4: bool,
    pub batch: usize,
    pub seq: usize,
    pub steps: usize,
    pub warmup: usize,
    pub rank: usize,
    pub targets: Targets,
}

/// Training throughput: LoRA or QLoRA (NF4, double quantization, as bitsandbytes) on the
/// model, random tokens, AdamW on the host.
pub fn bench(gpu: Gpu, model_dir: &Path, o: &BenchOptions) -> Result<(Value, Gpu)> {
    let t_load = Instant::now();
    let quant = o.q4.then_some(QuantizeOnLoad {
        quant_type: QuantType::Nf4,
        blocksize: 64,
        double_quant: true,
    });
    let mut model = Model::load_with(model_dir, quant)?;
    let mut state = TrainState::new(model.linears().len());
    let cfg = LoraConfig {
        rank: o.rank,
        alpha: 2.0 * o.rank as f32,
        targets: o.targets.clone(),
        ..Default::default()
    };
    let mut rng = Rng::new(0);
    lora::attach(&model, &mut state, &cfg, &mut rng)?;
    gpu.reset_peak();
    let mut eng = GpuEngine::new(gpu, &model, &state)?;
    let load_s = t_load.elapsed().as_secs_f64();
    let (model_bytes, _) = eng.gpu.memory();
    let vocab = model.config.vocab as u64;
    let opt = AdamW {
        lr: 1e-4,
        ..Default::default()
    };
    let mut times = Vec::new();
    let mut losses = Vec::new();
    for step in 0..o.warmup + o.steps {
        let seqs: Vec<Vec<u32>> = (0..o.batch)
            .map(|_| {
                (0..o.seq)
                    .map(|_| (rng.next_u64() % vocab) as u32)
                    .collect()
            })
            .collect();
        let labels: Vec<Vec<i32>> = seqs
            .iter()
            .map(|s| s.iter().map(|&t| t as i32).collect())
            .collect();
        let batch = Batch {
            ids: seqs.iter().map(|s| &s[..]).collect(),
            labels: labels.iter().map(|s| &s[..]).collect(),
        };
        let t = Instant::now();
        state.zero_grads();
        let s = eng.forward_backward(
            &mut state,
            &batch,
            1.0 / batch.loss_tokens() as f32,
            &mut rng,
        )?;
        // As the trainers step (no clipping, as the reference): adapters on the device.
        eng.clip_and_step(&opt, &mut model, &mut state, None, 1e-4, step as u64 + 1)?;
        eng.gpu.sync()?;
        let dt = t.elapsed().as_secs_f64();
        losses.push(s.nll_sum / s.loss_tokens as f64);
        if step >= o.warmup {
            times.push(dt);
        }
    }
    let total: f64 = times.iter().sum();
    let tps = (o.batch * o.seq * times.len()) as f64 / total;
    let (_, peak) = eng.gpu.memory();
    let (used, dev_total) = eng.gpu.device_used();
    let profile: Option<serde_json::Map<String, Value>> = eng.profile().map(|p| {
        p.into_iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect()
    });
    let v = json!({
        "profile_ms_per_step": profile,
        "method": if o.q4 { "qlora" } else { "lora" },
        "gpu": eng.gpu.name(),
        "batch": o.batch, "seq": o.seq, "rank": o.rank, "steps": o.steps,
        "tokens_per_second": tps,
        "step_ms": times.iter().map(|t| t * 1e3).collect::<Vec<_>>(),
        "model_bytes_on_gpu": model_bytes,
        "peak_allocated_bytes": peak,
        "device_used_bytes": used, "device_total_bytes": dev_total,
        "trainable_params": state.trainable_count(),
        "first_loss": losses.first(), "last_loss": losses.last(),
        "load_seconds": load_s,
    });
    crate::cli::info(format!(
        "{} {}×{}: {:.0} tokens/s, peak {:.2} GB allocated (model {:.2} GB)",
        if o.q4 { "QLoRA" } else { "LoRA" },
        o.batch,
        o.seq,
        tps,
        peak as f64 / 1e9,
        model_bytes as f64 / 1e9
    ));
    Ok((v, eng.gpu))
}
