#!/usr/bin/env bash
# Every training method on the same alpaca slice, SmolLM2-135M, same steps and batch (so the
# same tokens): trainable parameters, training tokens/s (after the first step), peak RSS, held-out
# loss after training, and generation tokens/s with the adapter applied on the fly and, for the
# methods that merge (LoRA, DoRA, IA3; QLoRA re-quantized to NF4), after adapter-merge. Prints a
# markdown table. REUSE=1 keeps adapters already trained in $OUT and only re-measures generation.
#
#   bash bench/methods.sh          # MODEL=models/smollm2 BIN=target/release STEPS=8 THREADS=2
set -euo pipefail
MODEL=${MODEL:-models/smollm2}
BIN=${BIN:-target/release}
VENV=${VENV:-$HOME/.cache/peftkit/venv}
PY=${PY:-$VENV/bin/python}
THREADS=${THREADS:-2}
STEPS=${STEPS:-8}
DATA=${DATA:-data/alpaca_en_demo.json}
OUT=${OUT:-bench/out/methods}
mkdir -p "$OUT"
"$PY" -c "import json; d=json.load(open('$DATA')); json.dump(d[:400], open('$OUT/alpaca400.json','w'))"
QMODEL="$OUT/model-nf4"
[ -f "$QMODEL/config.json" ] || "$BIN/quantize-nf4" --model "$MODEL" --out "$QMODEL" --quiet
PROMPT="Give three tips for staying healthy."

echo "| method | trainable params | train tokens/s | peak RSS | held-out loss before → after | generate tokens/s | merged |"
echo "|---|---|---|---|---|---|---|"
gen_tps() { # peft-generate args... → tokens/s
  "$BIN/peft-generate" "$@" --chat --prompt "$PROMPT" --max-new-tokens 64 --ignore-eos \
    --threads "$THREADS" --json | "$PY" -c "import json,sys; print(f\"{json.load(sys.stdin)['tokens_per_second']:.1f}\")"
}
row() { # name, model, lr, extra args...
  local name=$1 model=$2 lr=$3; shift 3
  local dir="$OUT/$name"
  if [ "${REUSE:-0}" != 1 ] || [ ! -f "$dir.log" ]; then
    rm -rf "$dir" "$dir.log"
    /usr/bin/time -f "%M" -o "$dir.rss" "$BIN/peft-train" --model "$model" --data "$OUT/alpaca400.json" \
      --format alpaca --steps "$STEPS" --batch 4 --max-len 256 --lr "$lr" --schedule constant \
      --val-split 0.05 --seed 1 --threads "$THREADS" --quiet --out "$dir" --log "$dir.log" "$@" \
      > "$dir.stdout" 2> "$dir.stderr"
  fi
  local params tps rss before after gen
  params=$(sed -n 's/^trainable params: \([0-9]*\).*/\1/p' "$dir.stdout")
  tps=$("$PY" bench/steady_tps.py "$dir.log" | "$PY" -c "import json,sys; print(f\"{json.load(sys.stdin)['tokens_per_second']:.1f}\")")
  rss=$(( $(cat "$dir.rss") / 1024 ))
  before=$(sed -n 's/^eval loss before training: \([0-9.]*\).*/\1/p' "$dir.stderr")
  after=$(sed -n 's/^eval loss after training: \([0-9.]*\).*/\1/p' "$dir.stderr")
  local merged="—"
  if [ -f "$dir/adapter_config.json" ]; then
    gen=$(gen_tps --model "$model" --adapter "$dir")
    case "$name" in
      LoRA*|QLoRA*|DoRA*|IA3*)
        rm -rf "$dir.merged"
        local req=(); [ "$model" = "$QMODEL" ] && req=(--requantize)
        "$BIN/adapter-merge" --model "$model" --adapter "$dir" --out "$dir.merged" "${req[@]}" --quiet
        merged=$(gen_tps --model "$dir.merged")
        rm -rf "$dir.merged" ;;
    esac
  else
    gen=$(gen_tps --model "$dir")
  fi
  echo "| $name | $params | $tps | $rss MB | $before → $after | $gen | $merged |"
}
row "LoRA r16 q,v" "$MODEL" 1e-3 --method lora --rank 16 --alpha 32
row "QLoRA r16 q,v (NF4)" "$QMODEL" 1e-3 --method lora --rank 16 --alpha 32
row "DoRA r16 q,v" "$MODEL" 1e-3 --method dora --rank 16 --alpha 32
row "IA3" "$MODEL" 1e-2 --method ia3
row "Adapter (Houlsby, 36)" "$MODEL" 1e-3 --method adapter
row "Prefix (20, MLP)" "$MODEL" 1e-2 --method prefix --num-virtual-tokens 20
row "P-Tuning v2 (20)" "$MODEL" 1e-2 --method ptuning-v2 --num-virtual-tokens 20
row "Prompt tuning (20)" "$MODEL" 3e-2 --method prompt --num-virtual-tokens 20
row "Frozen (top 2 blocks)" "$MODEL" 1e-4 --method freeze --trainable last:2
row "Full" "$MODEL" 2e-5 --method full
