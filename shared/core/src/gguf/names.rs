//! Tensor names and row orders of llama.cpp's GGUF files against Hugging Face's, both ways:
//! model-import reads GGUF names, model-export writes them (GPT-2's too).

/// Whole-model tensors: (GGUF name, HF name).
const FIXED: &[(&str, &str)] = &[
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];

/// Per-block modules: (GGUF part of `blk.N.PART.weight`, HF module under `model.layers.N.`).
const LAYER: &[(&str, &str)] = &[
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
];

/// The HF name of a GGUF tensor of a llama-family model (`blk.3.attn_q.weight` →
/// `model.layers.3.self_attn.q_proj.weight`).
pub fn hf_name(name: &str) -> Option<String> {
    if let Some((_, hf)) = FIXED.iter().find(|(g, _)| *g == name) {
        return Some((*hf).to_owned());
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (part, suffix) = rest.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    let (_, hf) = LAYER.iter().find(|(g, _)| *g == part)?;
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

/// The GGUF name of an HF tensor of a llama-family model (the inverse of [`hf_name`]).
pub fn gguf_name(name: &str) -> Option<String> {
    if let Some((g, _)) = FIXED.iter().find(|(_, hf)| *hf == name) {
        return Some((*g).to_owned());
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = rest.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    let (g, _) = LAYER.iter().find(|(_, hf)| *hf == module)?;
    Some(format!("blk.{layer}.{g}.{suffix}"))
}

/// GPT-2's per-block modules: (GGUF part, HF module under `h.N.`).
const GPT2_LAYER: &[(&str, &str)] = &[
    ("attn_norm", "ln_1"),
    ("attn_qkv", "attn.c_attn"),
    ("attn_output", "attn.c_proj"),
    ("ffn_norm", "ln_2"),
    ("ffn_up", "mlp.c_fc"),
    ("ffn_down", "mlp.c_proj"),
];

/// The GGUF name of a GPT-2 tensor (with or without the `transformer.` prefix of
/// GPT2LMHeadModel's checkpoints): `transformer.h.0.attn.c_attn.weight` →
/// `blk.0.attn_qkv.weight`.
pub fn gpt2_gguf_name(name: &str) -> Option<String> {
    if name == "lm_head.weight" {
        return Some("output.weight".into());
    }
    let name = name.strip_prefix("transformer.").unwrap_or(name);
    let (module, suffix) = name.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    let fixed = match module {
        "wte" => Some("token_embd"),
        "wpe" => Some("position_embd"),
        "ln_f" => Some("output_norm"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(format!("{f}.{suffix}"));
    }
    let rest = module.strip_prefix("h.")?;
    let (layer, module) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (g, _) = GPT2_LAYER.iter().find(|(_, hf)| *hf == module)?;
    Some(format!("blk.{layer}.{g}.{suffix}"))
}

/// llama.cpp's `permute` of q/k rows for its RoPE layout: rows viewed as
/// [heads, 2, head_dim/2] become [heads, head_dim/2, 2] (transformers rotates halves,
/// ggml adjacent pairs). `x` is row-major `[rows, cols]`.
pub fn permute_rows(x: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    move_rows(x, rows, cols, heads, true)
}

/// Inverse of [`permute_rows`]: GGUF's pair layout back to transformers' halves.
pub fn unpermute_rows(x: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    move_rows(x, rows, cols, heads, false)
}

fn move_rows(x: &[f32], rows: usize, cols: usize, heads: usize, to_pairs: bool) -> Vec<f32> {
    let hd = rows / heads;
    let half = hd / 2;
    let mut out = vec![0f32; x.len()];
    for h in 0..heads {
        for i in 0..half {
            for two in 0..2 {
                let halves = h * hd + two * half + i;
                let pairs = h * hd + i * 2 + two;
                let (src, dst) = if to_pairs {
                    (halves, pairs)
                } else {
                    (pairs, halves)
                };
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&x[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_permute() {
        let (rows, cols, heads) = (24, 3, 3);
        let x: Vec<f32> = (0..rows * cols).map(|v| v as f32).collect();
        let p = permute_rows(&x, rows, cols, heads);
        // head 0, head_dim 8: rows 0..8 in halves order [0 1 2 3 | 4 5 6 7] become pairs
        // (0, 4), (1, 5), ...
        assert_eq!(p[3..6], x[12..15]);
        assert_eq!(unpermute_rows(&p, rows, cols, heads), x);
    }

    #[test]
    fn names_map_both_ways() {
        for (g, hf) in [
            (
                "blk.3.attn_q.weight",
                "model.layers.3.self_attn.q_proj.weight",
            ),
            (
                "blk.0.ffn_norm.weight",
                "model.layers.0.post_attention_layernorm.weight",
            ),
            ("blk.1.attn_k.bias", "model.layers.1.self_attn.k_proj.bias"),
            ("output.weight", "lm_head.weight"),
            ("token_embd.weight", "model.embed_tokens.weight"),
        ] {
            assert_eq!(hf_name(g).unwrap(), hf);
            assert_eq!(gguf_name(hf).unwrap(), g);
        }
        assert!(hf_name("blk.x.attn_q.weight").is_none());
        assert!(hf_name("foo").is_none());
        assert!(gguf_name("model.layers.0.mlp.act.weight").is_none());
        assert!(gguf_name("model.layers.0.self_attn.q_proj.lora_A.weight").is_none());
        for (hf, g) in [
            (
                "transformer.h.1.attn.c_attn.weight",
                "blk.1.attn_qkv.weight",
            ),
            ("h.0.mlp.c_proj.bias", "blk.0.ffn_down.bias"),
            ("transformer.wpe.weight", "position_embd.weight"),
            ("transformer.ln_f.bias", "output_norm.bias"),
            ("lm_head.weight", "output.weight"),
        ] {
            assert_eq!(gpt2_gguf_name(hf).unwrap(), g);
        }
        assert!(gpt2_gguf_name("transformer.h.0.attn.bias").is_none());
    }
}
