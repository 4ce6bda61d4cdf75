//! Prefix tuning and P-Tuning v2 on the GPU: the prefix's keys and values in the first rows
//! of the padded attention layout, and their gradient.

use super::*;

/// Prefix tuning on the device (see [`GpuEngine::prefix`]).
pub(in crate::gpu) struct GpuPrefix {
    pub(in crate::gpu) n: usize,
    pub(in crate::gpu) stride: usize,
    pub(in crate::gpu) kv_dim: usize,
    pub(in crate::gpu) p: DBuf,
    pub(super) dp: DBuf,
    /// The host's P of this pass and what its backward needs (the MLP's activations).
    pub(super) values: Option<crate::train::prefix::PrefixValues>,
}

impl GpuEngine {
    /// `prefix_to_heads` (P → the padded keys or values) or `prefix_grad` (their gradient →
    /// dP): the same arguments, the prefix's columns at `off`.
    pub(super) fn prefix_launch(
        &self,
        kernel: &str,
        src: &DBuf,
        dst: &DBuf,
        off: usize,
        p: &GpuPrefix,
        lay: &Layout,
    ) -> Result<()> {
        let (kvh, dh) = (self.model.kv_heads, self.model.head_dim);
        let n = if kernel == "prefix_to_heads" {
            lay.nseq * kvh * p.n * dh
        } else {
            kvh * p.n * dh
        };
        self.gpu.launch_n(
            kernel,
            n,
            &[
                Arg::P(src.ptr),
                Arg::P(dst.ptr),
                Arg::I(off as i32),
                Arg::I(p.n as i32),
                Arg::I(lay.nseq as i32),
                Arg::I(kvh as i32),
                Arg::I(dh as i32),
                Arg::I(lay.l as i32),
                Arg::I(p.stride as i32),
            ],
        )
    }
}
