#!/usr/bin/env python3
"""bitsandbytes' CPU quantize_4bit over the linear weights of a model folder (the tensors
quantize-nf4 quantizes), timed tensor by tensor; prints one JSON line.

    python bench/quantize_bench.py --model models/smollm2 [--threads 2] [--compare OUT_DIR]

Only the quantize_4bit calls are timed (reading each tensor from the safetensors file is not).
With --compare, every packed weight, absmax, nested absmax and quant state is checked against
quantize-nf4's output folder OUT_DIR, byte for byte.
"""

from __future__ import annotations

import argparse
import json
import re
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

import bitsandbytes.functional as F  # noqa: E402

LLAMA = r"\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.weight$"
GPT2 = r"\.(c_attn|c_proj|c_fc)\.weight$"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quant-type", default="nf4")
    ap.add_argument("--blocksize", type=int, default=64)
    ap.add_argument("--no-double-quant", action="store_true")
    ap.add_argument("--compare", help="quantize-nf4 output folder to check byte for byte")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = Path(a.model)
    config = json.loads((model / "config.json").read_text())
    gpt2 = config["model_type"] == "gpt2"
    pattern = re.compile(GPT2 if gpt2 else LLAMA)
    ours = safe_open(str(Path(a.compare) / "model.safetensors"), "pt") if a.compare else None

    seconds, bytes_in, tensors, mismatches = 0.0, 0, 0, []
    with safe_open(str(model / "model.safetensors"), "pt") as f:
        for name in f.keys():
            if not pattern.search(name):
                continue
            w = f.get_tensor(name)
            if gpt2:
                w = w.t().contiguous()
            t0 = time.perf_counter()
            packed, state = F.quantize_4bit(
                w,
                blocksize=a.blocksize,
                compress_statistics=not a.no_double_quant,
                quant_type=a.quant_type,
            )
            seconds += time.perf_counter() - t0
            bytes_in += w.numel() * w.element_size()
            tensors += 1
            if ours is not None:
                want = {name: packed}
                want.update({f"{name}.{k}": v for k, v in state.as_dict(packed=True).items()})
                for k, v in want.items():
                    if not torch.equal(ours.get_tensor(k), v):
                        mismatches.append(k)
            del w, packed, state
    out = {
        "tensors": tensors,
        "bytes_in": bytes_in,
        "seconds": seconds,
        "gb_per_s": bytes_in / seconds / 1e9,
        "threads": a.threads,
    }
    if ours is not None:
        out["compared"] = tensors
        out["mismatches"] = mismatches[:10]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
