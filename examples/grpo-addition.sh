#!/usr/bin/env bash
# GRPO on a verifiable reward, end to end on a CPU (docs/grpo-train.md, the chart in
# docs/img/grpo-train-reward.png): SmolLM2-135M-Instruct learns single-digit addition from the
# reward "the final answer equals the record's answer" alone, no reference answers in the
# prompt and no reward model. 60 steps of 2 prompts × 8 completions take about 3 minutes on
# 2 cores; held-out accuracy went from 19 % to 81 % (64 prompts, one sampled answer each).
#
#   make build model && bash examples/grpo-addition.sh [OUT]
set -euo pipefail
BIN=${BIN:-target/release}
MODEL=${MODEL:-models/smollm2}
OUT=${1:-runs/grpo-addition}
mkdir -p "$OUT"
# 400 training and 64 held-out prompts {"prompt": [user message], "answer": "7"}, fixed seed
python3 - "$OUT" <<'PY'
import json, random, sys
r = random.Random(5)
def rec():
    a, b = r.randint(1, 9), r.randint(1, 9)
    return {"prompt": [{"role": "user", "content": f"What is {a} + {b}? Reply with only the number."}],
            "answer": str(a + b)}
for name, n in (("train.jsonl", 400), ("val.jsonl", 64)):
    with open(f"{sys.argv[1]}/{name}", "w") as f:
        for _ in range(n):
            f.write(json.dumps(rec()) + "\n")
PY
"$BIN/grpo-train" --model "$MODEL" --prompts "$OUT/train.jsonl" --val-data "$OUT/val.jsonl" \
  --reward answer:answer --num-generations 8 --batch 2 --max-completion-length 16 --steps 60 \
  --lr 5e-5 --rank 16 --alpha 32 --target all-linear --seed 1 \
  --out "$OUT/adapter" --log "$OUT/grpo.jsonl" --plot "$OUT/grpo.png"
