#!/usr/bin/env bash
# quantize-nf4 against bitsandbytes' CPU quantize_4bit on the same model and machine:
# throughput (GB/s of input) and peak RSS (/usr/bin/time -v), best of $RUNS runs each, then a
# byte-for-byte check of our output against bitsandbytes. Prints a markdown table row.
#
#   bash bench/quantize.sh            # MODEL=models/smollm2 BIN=target/release THREADS=2
set -euo pipefail
MODEL=${MODEL:-models/smollm2}
BIN=${BIN:-target/release}
VENV=${VENV:-$HOME/.cache/peftkit/venv}
PY=${PY:-$VENV/bin/python}
THREADS=${THREADS:-2}
RUNS=${RUNS:-3}
OUT=${OUT:-bench/out/quantize}
mkdir -p "$OUT"

rss_kb() { sed -n 's/.*Maximum resident set size (kbytes): //p' "$1"; }

best_ours=""
for i in $(seq "$RUNS"); do
  RAYON_NUM_THREADS=$THREADS /usr/bin/time -v -o "$OUT/ours.time" \
    "$BIN/quantize-nf4" --model "$MODEL" --out "$OUT/q" --json --quiet > "$OUT/ours.json"
  s=$("$PY" -c "import json; print(json.load(open('$OUT/ours.json'))['seconds'])")
  echo "  quantize-nf4 run $i: ${s}s, peak RSS $(( $(rss_kb "$OUT/ours.time") / 1024 )) MB" >&2
  if [ -z "$best_ours" ] || "$PY" -c "import sys; sys.exit(0 if $s < $best_ours else 1)"; then
    best_ours=$s; cp "$OUT/ours.json" "$OUT/ours.best.json"; cp "$OUT/ours.time" "$OUT/ours.best.time"
  fi
done

best_bnb=""
for i in $(seq "$RUNS"); do
  /usr/bin/time -v -o "$OUT/bnb.time" \
    "$PY" bench/quantize_bench.py --model "$MODEL" --threads "$THREADS" > "$OUT/bnb.json"
  s=$("$PY" -c "import json; print(json.load(open('$OUT/bnb.json'))['seconds'])")
  echo "  bitsandbytes run $i: ${s}s, peak RSS $(( $(rss_kb "$OUT/bnb.time") / 1024 )) MB" >&2
  if [ -z "$best_bnb" ] || "$PY" -c "import sys; sys.exit(0 if $s < $best_bnb else 1)"; then
    best_bnb=$s; cp "$OUT/bnb.json" "$OUT/bnb.best.json"; cp "$OUT/bnb.time" "$OUT/bnb.best.time"
  fi
done

"$PY" bench/quantize_bench.py --model "$MODEL" --threads "$THREADS" --compare "$OUT/q" > "$OUT/compare.json"

"$PY" - "$OUT" "$MODEL" <<'PY'
import json, re, sys
out, model = sys.argv[1], sys.argv[2]
ours = json.load(open(f"{out}/ours.best.json"))
bnb = json.load(open(f"{out}/bnb.best.json"))
cmp = json.load(open(f"{out}/compare.json"))
rss = lambda n: int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", open(f"{out}/{n}.best.time").read()).group(1)) / 1024
print("| task | quantize-nf4 | bitsandbytes quantize_4bit | speed-up | quantize-nf4 peak RSS | bitsandbytes peak RSS | bit-exact |")
print("|---|---|---|---|---|---|---|")
exact = "yes" if not cmp["mismatches"] else f"NO ({len(cmp['mismatches'])}+ tensors differ)"
print(
    f"| {model}: {bnb['tensors']} linear weights, nf4, blocksize 64, double quant, {bnb['threads']} threads "
    f"| {ours['gb_per_s']:.2f} GB/s ({ours['seconds']:.2f} s, {ours['bytes_in'] / 1e6:.0f} MB in, read + quantize + write) "
    f"| {bnb['gb_per_s']:.2f} GB/s ({bnb['seconds']:.2f} s, {bnb['bytes_in'] / 1e6:.0f} MB, quantize calls only) "
    f"| {bnb['seconds'] / ours['seconds']:.1f}x | {rss('ours'):.0f} MB | {rss('bnb'):.0f} MB | {exact} ({cmp['compared']} weights) |"
)
PY
