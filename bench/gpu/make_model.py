"""Write a random-weight LlamaForCausalLM folder (HF format, bf16 safetensors, one file) for the
GPU benchmark. No network: the config is built here, the weights are drawn here.

    python make_model.py --out DIR [--tiny] [--tokenizer-dir DIR] [--seed 0]

Default shape is "1B-class" (~1.07B parameters, ~2.1 GB on disk); --tiny is a 2-layer toy
with the same vocabulary, for testing the scripts on CPU.
"""
import argparse, json, os, shutil, sys, time

import torch
import transformers
from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig

SHAPES = {
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128),
}
ROPE_THETA = 100000.0
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


def make_config(shape):
    common = dict(vocab_size=49152, rms_norm_eps=1e-5, tie_word_embeddings=True, max_position_embeddings=8192,
                  hidden_act="silu", bos_token_id=1, eos_token_id=2, initializer_range=0.02,
                  attention_bias=False, mlp_bias=False, use_cache=True, **SHAPES[shape])
    try:  # transformers >= 5: rope settings live in rope_parameters
        cfg = LlamaConfig(rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA}, **common)
    except TypeError:  # transformers 4.x
        cfg = LlamaConfig(rope_theta=ROPE_THETA, **common)
    theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", getattr(cfg, "rope_theta", None))
    if theta != ROPE_THETA:
        sys.exit(f"make_model: config did not take rope_theta={ROPE_THETA} (got {theta})")
    return cfg


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--tokenizer-dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    a = p.parse_args()

    t0 = time.perf_counter()
    dev = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = make_config("tiny" if a.tiny else "1b")
    torch.manual_seed(a.seed)
    # Build the model right on the device, in bf16. `from_config` runs the normal init
    # (post_init -> _init_weights: normal(0, initializer_range) for Linear/Embedding, 1 for RMSNorm);
    # it is checked below rather than trusted, since meta-device loading paths skip init.
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.eval()

    # Sanity: really random, right dtype, tied head, parameter count.
    sd = model.state_dict()
    probe = {n: sd[n] for n in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                                f"model.layers.{cfg.num_hidden_layers - 1}.mlp.down_proj.weight")}
    stds = {n: round(t.float().std().item(), 5) for n, t in probe.items()}
    bad = {n: s for n, s in stds.items() if not (0.015 < s < 0.025)}
    if bad or any(not torch.isfinite(t.float()).all() for t in probe.values()):
        sys.exit(f"make_model: weights do not look like N(0, 0.02) init: {stds}")
    norm = sd["model.layers.0.input_layernorm.weight"].float()
    if not torch.all(norm == 1):
        sys.exit("make_model: RMSNorm weights are not 1")
    dtypes = {t.dtype for t in model.parameters()}
    if dtypes != {torch.bfloat16}:
        sys.exit(f"make_model: expected all-bf16 parameters, got {dtypes}")
    tied = model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    if not tied:
        sys.exit("make_model: lm_head is not tied to embed_tokens")
    n_params = sum(t.numel() for t in model.parameters())  # tied weight counted once
    t_init = time.perf_counter() - t0

    os.makedirs(a.out, exist_ok=True)
    model = model.to("cpu")
    model.save_pretrained(a.out, max_shard_size="1000GB")
    gen_path = os.path.join(a.out, "generation_config.json")
    if not os.path.exists(gen_path):
        GenerationConfig(bos_token_id=1, eos_token_id=2).save_pretrained(a.out)

    copied = []
    if a.tokenizer_dir:
        for f in TOKENIZER_FILES:
            src = os.path.join(a.tokenizer_dir, f)
            if os.path.exists(src):
                shutil.copy(src, os.path.join(a.out, f))
                copied.append(f)
        if "tokenizer.json" not in copied:
            sys.exit(f"make_model: no tokenizer.json in {a.tokenizer_dir}")

    files = sorted(os.listdir(a.out))
    if "model.safetensors" not in files:
        sys.exit(f"make_model: expected one model.safetensors, folder has {files}")
    with open(os.path.join(a.out, "config.json")) as f:
        saved = json.load(f)
    print(json.dumps({
        "out": a.out, "shape": "tiny" if a.tiny else "1b", "device": dev, "params": n_params,
        "weight_std": stds, "dtype_in_config": saved.get("dtype", saved.get("torch_dtype")),
        "model_safetensors_bytes": os.path.getsize(os.path.join(a.out, "model.safetensors")),
        "files": files, "tokenizer_files": copied, "init_s": round(t_init, 2),
        "total_s": round(time.perf_counter() - t0, 2), "transformers": transformers.__version__,
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
