#!/usr/bin/env bash
# make bench: peftkit and transformers side by side on the same machine, model and data.
# Results go to bench/out/results.json and a markdown table on stdout (for docs/benchmarks.md).
set -euo pipefail
MODEL=${MODEL:-models/smollm2}
BIN=${BIN:-target/release}
VENV=${VENV:-$HOME/.cache/peftkit/venv}
THREADS=${THREADS:-2}
OUT=bench/out
mkdir -p "$OUT"
PY="$VENV/bin/python"
"$PY" bench/make_data.py "$OUT/eval.jsonl"

# Peak RSS of a command in MB, its stdout (one JSON line) saved to a file.
measure() { # name, command...
  local name=$1; shift
  /usr/bin/time -f "%M" -o "$OUT/$name.rss" "$@" > "$OUT/$name.json"
  echo "  $name: $(cat "$OUT/$name.json" | head -c 200) rss $(( $(cat "$OUT/$name.rss") / 1024 )) MB" >&2
}

# SECTIONS picks rows (default: all); e.g. SECTIONS="train_bf16 qlora_bf16" make bench.
SECTIONS=${SECTIONS:-eval gen gen_batch train train_bf16 qlora qlora_bf16 full frozen}
want() { [[ " $SECTIONS " == *" $1 "* ]]; }

# Our side of a LoRA r16 q,v training row: 4 steps of 4 x 256 on $OUT/train.jsonl, steady-state
# tokens/s (after the first step, as transformers' number leaves its warm-up step out).
ours_train() { # name, model, extra peft-train options...
  local name=$1 model=$2; shift 2
  ours_run "$name" "$model" --rank 16 --alpha 32 --target q_proj,v_proj --lr 2e-4 "$@"
}
# Any method: 4 steps of 4 x 256 on $OUT/train.jsonl, the method's options given.
ours_run() { # name, model, peft-train method options...
  local name=$1 model=$2; shift 2
  rm -rf "$OUT/$name" "$OUT/$name.log"
  /usr/bin/time -f "%M" -o "$OUT/$name.rss" "$BIN/peft-train" --model "$model" --data "$OUT/train.jsonl" --format text \
    --max-len 256 --batch 4 --steps 4 --schedule constant \
    --threads "$THREADS" --quiet --out "$OUT/$name" --log "$OUT/$name.log" "$@" > /dev/null
  "$PY" bench/steady_tps.py "$OUT/$name.log" > "$OUT/$name.json"
  echo "  $name: $(cat "$OUT/$name.json") rss $(( $(cat "$OUT/$name.rss") / 1024 )) MB" >&2
}

PROMPT="Write a short story about a lighthouse keeper."
if want eval; then
  echo "==> peft-eval vs transformers (8 x 256 tokens, $THREADS threads)" >&2
  measure ours_eval "$BIN/peft-eval" --model "$MODEL" --data "$OUT/eval.jsonl" --max-len 256 --threads "$THREADS" --json --quiet
  measure hf_eval "$PY" bench/hf_reference.py eval --model "$MODEL" --data "$OUT/eval.jsonl" --threads "$THREADS"
fi
if want gen; then
  echo "==> generation, greedy, 128 new tokens" >&2
  measure ours_gen "$BIN/peft-generate" --model "$MODEL" --chat --prompt "$PROMPT" --max-new-tokens 128 --ignore-eos --threads "$THREADS" --json
  measure hf_gen "$PY" bench/hf_reference.py generate --model "$MODEL" --threads "$THREADS"
fi

if want gen_batch; then
  echo "==> batched generation: 16 chat prompts together, 64 greedy tokens each" >&2
  "$PY" -c '
import json, sys
topics = ["a lighthouse keeper", "a lost cat", "the first snow", "a robot gardener", "an old map",
          "a night train", "a quiet library", "a desert well", "a broken clock", "a river town",
          "a kite festival", "a secret recipe", "a mountain pass", "a letter never sent",
          "a market at dawn", "the last bus"]
with open(sys.argv[1], "w") as f:
    for t in topics:
        f.write(json.dumps({"messages": [{"role": "user", "content": f"Write a short story about {t}."}]}) + "\n")
' "$OUT/gen16.jsonl"
  measure ours_gen_batch "$BIN/peft-generate" --model "$MODEL" --prompts "$OUT/gen16.jsonl" --chat --json \
    --batch 16 --max-new-tokens 64 --ignore-eos --threads "$THREADS" --quiet
  # one batch: its tokens/s is the sum of the lines' (each line: its tokens / the batch's seconds)
  "$PY" -c '
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print(json.dumps({"tokens": sum(len(l["token_ids"]) for l in lines), "sequences": len(lines),
                  "tokens_per_second": sum(l["tokens_per_second"] for l in lines)}))
' "$OUT/ours_gen_batch.json" >> "$OUT/ours_gen_batch.json"
  measure hf_gen_batch "$PY" bench/hf_reference.py generate-batch --model "$MODEL" --data "$OUT/gen16.jsonl" \
    --new-tokens 64 --threads "$THREADS"
fi

head -n 4 "$OUT/eval.jsonl" > "$OUT/train.jsonl"
if want train; then
  echo "==> LoRA r16 on q,v, batch 4 x 256, f32" >&2
  ours_train ours_train "$MODEL"
  measure hf_train "$PY" bench/hf_reference.py train --model "$MODEL" --data "$OUT/train.jsonl" --threads "$THREADS"
fi
if want train_bf16; then
  echo "==> LoRA r16 on q,v, batch 4 x 256, bf16 (ours: --compute-dtype bf16; PyTorch: bf16 model)" >&2
  ours_train ours_train_bf16 "$MODEL" --compute-dtype bf16
  measure hf_train_bf16 "$PY" bench/hf_reference.py train-bf16 --model "$MODEL" --data "$OUT/train.jsonl" --threads "$THREADS"
fi
if want full; then
  echo "==> full fine-tuning, batch 4 x 256, f32, AdamW on every parameter" >&2
  ours_run ours_full "$MODEL" --method full --lr 2e-5
  measure hf_full "$PY" bench/hf_reference.py train-full --model "$MODEL" --data "$OUT/train.jsonl" --threads "$THREADS"
fi
if want frozen; then
  echo "==> frozen fine-tuning (the top 2 blocks train), batch 4 x 256, f32" >&2
  ours_run ours_frozen "$MODEL" --method freeze --trainable last:2 --lr 1e-4
  measure hf_frozen "$PY" bench/hf_reference.py train-frozen --model "$MODEL" --data "$OUT/train.jsonl" --threads "$THREADS"
fi
QMODEL="$OUT/model-nf4"
if want qlora || want qlora_bf16; then
  [ -f "$QMODEL/config.json" ] || "$BIN/quantize-nf4" --model "$MODEL" --out "$QMODEL" --quiet
fi
if want qlora; then
  echo "==> QLoRA r16 on q,v over the NF4 base (double quant), batch 4 x 256, f32 compute" >&2
  ours_train ours_qlora "$QMODEL"
  measure hf_qlora "$PY" bench/hf_reference.py qlora-train --model "$MODEL" --data "$OUT/train.jsonl" --threads "$THREADS"
fi
if want qlora_bf16; then
  echo "==> QLoRA r16 on q,v over the NF4 base, batch 4 x 256, bf16 compute (bnb_4bit_compute_dtype=bf16)" >&2
  ours_train ours_qlora_bf16 "$QMODEL" --compute-dtype bf16
  measure hf_qlora_bf16 "$PY" bench/hf_reference.py qlora-train-bf16 --model "$MODEL" --data "$OUT/train.jsonl" --threads "$THREADS"
fi

SECTIONS="$SECTIONS" "$PY" - "$OUT" <<'PY'
import json, sys, platform, os
out = sys.argv[1]
def load(n):
    d = json.loads(open(f"{out}/{n}.json").read().strip().splitlines()[-1])
    d["rss_mb"] = int(open(f"{out}/{n}.rss").read()) / 1024
    return d
rows = [("eval", "eval 8x256 (f32)", "ours_eval", "hf_eval"),
        ("gen", "generate 128 greedy (f32)", "ours_gen", "hf_gen"),
        ("gen_batch", "generate 16 prompts x 64 greedy, one batch (f32)", "ours_gen_batch", "hf_gen_batch"),
        ("train", "LoRA r16 q,v train 4x256 (f32)", "ours_train", "hf_train"),
        ("train_bf16", "LoRA r16 q,v train 4x256 (bf16: ours autocast-style, PyTorch bf16 model)", "ours_train_bf16", "hf_train_bf16"),
        ("qlora", "QLoRA r16 q,v train 4x256 (NF4 base, f32 compute)", "ours_qlora", "hf_qlora"),
        ("qlora_bf16", "QLoRA r16 q,v train 4x256 (NF4 base, bf16 compute)", "ours_qlora_bf16", "hf_qlora_bf16"),
        ("full", "full fine-tuning 4x256 (f32, AdamW on all 134.5 M)", "ours_full", "hf_full"),
        ("frozen", "frozen fine-tuning 4x256 (f32, top 2 blocks)", "ours_frozen", "hf_frozen")]
# only this run's sections (bench/out keeps older results)
rows = [x for x in rows if x[0] in os.environ["SECTIONS"].split()]
r = {n: load(n) for _, _, a, b in rows for n in (a, b)}
json.dump(r, open(f"{out}/results.json", "w"), indent=2)
print("| task | peftkit tokens/s | transformers tokens/s | speed-up | peftkit peak RSS | transformers peak RSS |")
print("|---|---|---|---|---|---|")
for _, task, a, b in rows:
    x, y = r[a]["tokens_per_second"], r[b]["tokens_per_second"]
    print(f"| {task} | {x:.1f} | {y:.1f} | {x / y:.2f}x | {r[a]['rss_mb']:.0f} MB | {r[b]['rss_mb']:.0f} MB |")
if "ours_qlora" in r and "ours_train" in r:
    q, f = r["ours_qlora"], r["ours_train"]
    print(f"\nQLoRA vs our f32 LoRA: {q['tokens_per_second'] / f['tokens_per_second']:.2f}x tokens/s, peak RSS {q['rss_mb']:.0f} vs {f['rss_mb']:.0f} MB")
if "ours_eval" in r and "hf_eval" in r:
    print(f"\nloss: peftkit {r['ours_eval']['loss']:.5f}, transformers {r['hf_eval']['loss']:.5f}")
PY
