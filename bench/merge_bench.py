#!/usr/bin/env python3
"""The PEFT side of bench/merge.sh: make a LoRA adapter, time PEFT's merge_and_unload +
save_pretrained, and check adapter-merge's output against PEFT's. Each mode prints one JSON line.

    python bench/merge_bench.py --make-adapter DIR --model models/smollm2 [--seed 0]
    python bench/merge_bench.py --peft OUT --model M --adapter DIR [--threads 2] [--dequantize]
    python bench/merge_bench.py --compare OURS --against PEFT_OUT
    python bench/merge_bench.py --largest M

--make-adapter: get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
with lora_B overwritten by N(0, 0.02²) (PEFT starts B at zero, which would make the merge a
no-op), saved with save_pretrained.

--peft: base = AutoModelForCausalLM.from_pretrained(M, float32, CPU) (a 4-bit folder loads as
bitsandbytes Linear4bit with device_map="cpu"), PeftModel.from_pretrained, merge_and_unload,
save_pretrained(OUT, safe_serialization=True); load / merge / save timed separately (imports are
not in these figures; bench/merge.sh measures the whole process with /usr/bin/time -v). On a
4-bit base:
  - default: PEFT's Linear4bit.merge dequantizes, adds ΔW and re-quantizes (what
    `adapter-merge --requantize` does). transformers 5.24 refuses to save_pretrained a model loaded
    from a pre-quantized bnb checkpoint, so model._weight_conversions is emptied first (the
    workaround of tests/fixtures/generate_merge.py, which asserts it re-saves byte for byte);
  - --dequantize: transformers' model.dequantize() first (bitsandbytes' dequantize_4bit, f32),
    then a plain merge: the QLoRA-correct f32 model that plain `adapter-merge` writes.

--compare OURS --against REF: every tensor of OURS/model.safetensors against REF's: max |Δ| over
floating-point tensors (in f32), byte equality of the rest (4-bit packed weights, quant states).
A tied lm_head.weight present on one side only is compared against the other side's
model.embed_tokens.weight.

--largest M: the largest tensor of a model folder (name, bytes), from the safetensors header.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

t_import = time.perf_counter()
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

IMPORT_TORCH_S = time.perf_counter() - t_import


def is_4bit(model: Path) -> bool:
    cfg = json.loads((model / "config.json").read_text())
    q = cfg.get("quantization_config") or {}
    return bool(q.get("load_in_4bit") or q.get("_load_in_4bit"))


def load_base(model: Path):
    from transformers import AutoModelForCausalLM

    if is_4bit(model):
        import bitsandbytes

        m = AutoModelForCausalLM.from_pretrained(str(model), device_map="cpu")
        # bitsandbytes' float32 path (no bf16 repacking on AVX512-BF16 CPUs), as the fixtures do
        for mod in m.modules():
            if isinstance(mod, bitsandbytes.nn.Linear4bit):
                mod.support_avx512bf16_for_cpu = False
    else:
        m = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)
    m.eval()
    return m


def make_adapter(a) -> dict:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(a.seed)
    base = load_base(Path(a.model))
    cfg = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0,
                     task_type="CAUSAL_LM")
    pm = get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(a.seed + 1)
    n_b, params = 0, 0
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * 0.02)
                n_b += 1
            if "lora_" in name:
                params += p.numel()
    pm.save_pretrained(a.make_adapter)
    return {"adapter": a.make_adapter, "modules": n_b, "params": params, "seed": a.seed,
            "r": 16, "lora_alpha": 32, "target_modules": "all-linear"}


def peft_merge(a) -> dict:
    t0 = time.perf_counter()
    import transformers  # noqa: F401
    from peft import PeftModel

    import_s = time.perf_counter() - t0 + IMPORT_TORCH_S
    torch.set_num_threads(a.threads)
    model = Path(a.model)
    nf4 = is_4bit(model)

    t0 = time.perf_counter()
    base = load_base(model)
    td = time.perf_counter()
    if a.dequantize:
        assert nf4, f"--dequantize: {model} is not a 4-bit model"
        base = base.dequantize()
        assert not getattr(base, "is_quantized", False)
    t1 = time.perf_counter()
    pm = PeftModel.from_pretrained(base, a.adapter)
    t2 = time.perf_counter()
    merged = pm.merge_and_unload()
    t3 = time.perf_counter()
    if nf4 and not a.dequantize:
        wc = getattr(merged, "_weight_conversions", None)
        assert wc and all(type(op).__name__ == "Bnb4bitDeserialize" for c in wc for op in c.operations), wc
        merged._weight_conversions = []
    merged.save_pretrained(a.peft, safe_serialization=True)
    t4 = time.perf_counter()
    out = Path(a.peft)
    return {
        "base_4bit": nf4,
        "dequantized": bool(a.dequantize),
        "import_seconds": import_s,
        "load_base_seconds": td - t0,
        "dequantize_seconds": t1 - td,
        "load_adapter_seconds": t2 - t1,
        "load_seconds": t2 - t0,
        "merge_seconds": t3 - t2,
        "save_seconds": t4 - t3,
        "seconds": t4 - t0,
        "threads": a.threads,
        "bytes_out": sum(p.stat().st_size for p in out.iterdir() if p.suffix == ".safetensors"),
        "files": sorted(p.name for p in out.iterdir()),
    }


def read_all(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    assert files, f"{path}: no safetensors file"
    out = {}
    for f in files:
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


def compare(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict:
    notes = []
    for side, a, b in (("ours", ours, ref), ("reference", ref, ours)):
        if "lm_head.weight" in a and "lm_head.weight" not in b and "model.embed_tokens.weight" in b:
            notes.append(f"lm_head.weight only in {side}: compared with the other's embed_tokens")
    only_ours = sorted(set(ours) - set(ref) - {"lm_head.weight"})
    only_ref = sorted(set(ref) - set(ours) - {"lm_head.weight"})
    keys = sorted(set(ours) & set(ref))
    if ("lm_head.weight" in ours) != ("lm_head.weight" in ref):
        keys.append("lm_head.weight")
    max_diff, worst, float_n, byte_n, byte_eq, mism = 0.0, None, 0, 0, 0, []
    for k in keys:
        x = ours.get(k, ours.get("model.embed_tokens.weight") if k == "lm_head.weight" else None)
        y = ref.get(k, ref.get("model.embed_tokens.weight") if k == "lm_head.weight" else None)
        if x.shape != y.shape:
            mism.append(f"{k}: shape {tuple(x.shape)} vs {tuple(y.shape)}")
            continue
        if x.is_floating_point() and y.is_floating_point():
            float_n += 1
            if x.dtype != y.dtype:
                mism.append(f"{k}: dtype {x.dtype} vs {y.dtype}")
            d = float((x.float() - y.float()).abs().max()) if x.numel() else 0.0
            if d > max_diff:
                max_diff, worst = d, k
        else:
            byte_n += 1
            if x.dtype == y.dtype and torch.equal(x, y):
                byte_eq += 1
            else:
                mism.append(f"{k}: bytes differ")
    return {
        "compared": len(keys),
        "float_tensors": float_n,
        "max_abs_diff": max_diff,
        "worst": worst,
        "byte_tensors": byte_n,
        "byte_equal": byte_eq,
        "mismatches": mism[:10],
        "only_ours": only_ours[:10],
        "only_reference": only_ref[:10],
        "notes": notes,
    }


def largest_tensor(model: Path) -> dict:
    best = (0, None)
    for f in model.glob("*.safetensors"):
        with open(f, "rb") as h:
            n = int.from_bytes(h.read(8), "little")
            header = json.loads(h.read(n))
        for k, v in header.items():
            if k == "__metadata__":
                continue
            size = v["data_offsets"][1] - v["data_offsets"][0]
            if size > best[0]:
                best = (size, k)
    return {"largest_tensor_bytes": best[0], "largest_tensor": best[1]}


def main() -> None:
    ap = argparse.ArgumentParser()
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--make-adapter", metavar="DIR")
    mode.add_argument("--peft", metavar="OUT", help="PEFT merge_and_unload + save_pretrained into OUT")
    mode.add_argument("--compare", metavar="OURS", help="adapter-merge output folder to check")
    mode.add_argument("--largest", metavar="MODEL", help="largest tensor of a model folder")
    ap.add_argument("--model")
    ap.add_argument("--adapter")
    ap.add_argument("--against", help="PEFT output folder (with --compare)")
    ap.add_argument("--dequantize", action="store_true",
                    help="with --peft on a 4-bit base: model.dequantize() before PEFT (plain merge)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.make_adapter:
        res = make_adapter(a)
    elif a.peft:
        res = peft_merge(a)
    elif a.largest:
        res = largest_tensor(Path(a.largest))
    else:
        res = compare(read_all(Path(a.compare)), read_all(Path(a.against)))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
