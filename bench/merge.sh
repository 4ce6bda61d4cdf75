#!/usr/bin/env bash
# adapter-merge against PEFT's merge_and_unload() + save_pretrained() on the same model, adapter
# and machine: time and peak RSS (/usr/bin/time -v), best of $RUNS runs each, then every tensor of
# our output against PEFT's. Three tasks with one PEFT LoRA adapter (r 16, alpha 32, all-linear,
# random lora_B), made once per run of this script:
#   f32 base                      adapter-merge             vs  merge_and_unload
#   NF4 base, plain (f32) output  adapter-merge             vs  model.dequantize() + merge_and_unload
#   NF4 base, 4-bit output        adapter-merge --requantize vs merge_and_unload (Linear4bit.merge)
# Prints a markdown table.
#
#   bash bench/merge.sh          # MODEL=models/smollm2 MODEL_NF4=$MODEL-nf4 BIN=target/release THREADS=2
#   PEFT_NF4=0 bash bench/merge.sh   # skip the two PEFT 4-bit runs (about 40-50 s each)
set -euo pipefail
MODEL=${MODEL:-models/smollm2}
MODEL_NF4=${MODEL_NF4:-$MODEL-nf4}
BIN=${BIN:-target/release}
VENV=${VENV:-$HOME/.cache/peftkit/venv}
PY=${PY:-$VENV/bin/python}
THREADS=${THREADS:-2}
RUNS=${RUNS:-3}
PEFT_NF4=${PEFT_NF4:-1}
OUT=${OUT:-bench/out/merge}
mkdir -p "$OUT"

# The 4-bit base: made by quantize-nf4 if there is none (make bench only fetches the f32 model).
if [ ! -f "$MODEL_NF4/config.json" ]; then
  MODEL_NF4=$OUT/model-nf4
  rm -rf "$MODEL_NF4"
  "$BIN/quantize-nf4" --model "$MODEL" --out "$MODEL_NF4" --quiet
fi

echo "  making the LoRA adapter (PEFT, r 16, alpha 32, all-linear, lora_B ~ N(0, 0.02^2))" >&2
rm -rf "$OUT/adapter"
"$PY" bench/merge_bench.py --make-adapter "$OUT/adapter" --model "$MODEL" --threads "$THREADS" \
  > "$OUT/adapter.json" 2> "$OUT/adapter.err"
"$PY" bench/merge_bench.py --largest "$MODEL" > "$OUT/largest.json"
"$PY" bench/merge_bench.py --largest "$MODEL_NF4" > "$OUT/largest-nf4.json"

rss_kb() { sed -n 's/.*Maximum resident set size (kbytes): //p' "$1"; }
seconds() { "$PY" -c "import json; print(json.load(open('$1'))['seconds'])"; }

# best_of NAME OUTDIR CMD...: run CMD $RUNS times (OUTDIR removed first), keep the fastest run's
# JSON (stdout) and time -v report as NAME.best.*; NAME.rss_max is the highest peak RSS of all runs.
best_of() {
  local name=$1 dir=$2; shift 2
  local best="" max_rss=0 i s r
  for i in $(seq "$RUNS"); do
    rm -rf "$dir"
    RAYON_NUM_THREADS=$THREADS /usr/bin/time -v -o "$OUT/$name.time" "$@" > "$OUT/$name.json" 2> "$OUT/$name.err" \
      || { cat "$OUT/$name.err" "$OUT/$name.time" >&2; return 1; }
    s=$(seconds "$OUT/$name.json"); r=$(rss_kb "$OUT/$name.time")
    if [ "$r" -gt "$max_rss" ]; then max_rss=$r; fi
    echo "  $name run $i: ${s}s, peak RSS $(( r / 1024 )) MiB" >&2
    if [ -z "$best" ] || "$PY" -c "import sys; sys.exit(0 if $s < $best else 1)"; then
      best=$s; cp "$OUT/$name.json" "$OUT/$name.best.json"; cp "$OUT/$name.time" "$OUT/$name.best.time"
    fi
  done
  echo "$max_rss" > "$OUT/$name.rss_max"
}

AM="$BIN/adapter-merge"
best_of ours     "$OUT/ours"     "$AM" --model "$MODEL"     --adapter "$OUT/adapter" --out "$OUT/ours"     --json --quiet
best_of ours_nf4 "$OUT/ours_nf4" "$AM" --model "$MODEL_NF4" --adapter "$OUT/adapter" --out "$OUT/ours_nf4" --json --quiet
best_of ours_rq  "$OUT/ours_rq"  "$AM" --model "$MODEL_NF4" --adapter "$OUT/adapter" --out "$OUT/ours_rq"  --json --quiet --requantize

PB=(bench/merge_bench.py --adapter "$OUT/adapter" --threads "$THREADS")
best_of peft "$OUT/peft" "$PY" "${PB[@]}" --model "$MODEL" --peft "$OUT/peft"
"$PY" bench/merge_bench.py --compare "$OUT/ours" --against "$OUT/peft" > "$OUT/compare.json"
rm -f "$OUT"/peft_nf4.best.* "$OUT"/peft_rq.best.* "$OUT"/compare_nf4.json "$OUT"/compare_rq.json
if [ "$PEFT_NF4" = 1 ]; then
  best_of peft_nf4 "$OUT/peft_nf4" "$PY" "${PB[@]}" --model "$MODEL_NF4" --peft "$OUT/peft_nf4" --dequantize
  best_of peft_rq  "$OUT/peft_rq"  "$PY" "${PB[@]}" --model "$MODEL_NF4" --peft "$OUT/peft_rq"
  "$PY" bench/merge_bench.py --compare "$OUT/ours_nf4" --against "$OUT/peft_nf4" > "$OUT/compare_nf4.json"
  "$PY" bench/merge_bench.py --compare "$OUT/ours_rq"  --against "$OUT/peft_rq"  > "$OUT/compare_rq.json"
fi

"$PY" - "$OUT" "$MODEL" "$MODEL_NF4" "$THREADS" "$RUNS" <<'PY'
import json, os, re, sys
out, model, model_nf4, threads, runs = sys.argv[1:]
load = lambda n: json.load(open(f"{out}/{n}")) if os.path.exists(f"{out}/{n}") else None
MB = 1e6  # decimal megabytes throughout (time -v reports KiB)
def rss(n):
    return int(open(f"{out}/{n}.rss_max").read()) * 1024 / MB
def wall(n):
    m = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)",
                  open(f"{out}/{n}.best.time").read())
    h, mi, s = m.groups()
    return int(h or 0) * 3600 + int(mi) * 60 + float(s)
adapter = load("adapter.json")
largest = {"f32": load("largest.json"), "nf4": load("largest-nf4.json")}

def diff(c, byte_check):
    if c is None:
        return "—"
    bad = c["mismatches"] or c["only_ours"] or c["only_reference"]
    s = f"{c['max_abs_diff']:.1e}" if c["max_abs_diff"] else "0 (bit-exact)"
    if byte_check:
        s += f"; 4-bit parts {c['byte_equal']}/{c['byte_tensors']} byte-identical"
    s += f" ({c['compared']} tensors)"
    if c["notes"]:
        s += "; " + "; ".join(c["notes"])
    return ("MISMATCH: " + "; ".join((c["mismatches"] + c["only_ours"] + c["only_reference"])[:3]) + "; " + s) if bad else s

print(f"Adapter: LoRA r {adapter['r']}, alpha {adapter['lora_alpha']}, all-linear "
      f"({adapter['modules']} modules, {adapter['params'] / 1e6:.2f} M params), lora_B ~ N(0, 0.02²), "
      f"seed {adapter['seed']}. Best of {runs} runs, {threads} threads; peak RSS = highest of the runs; "
      f"MB = 10⁶ bytes. Largest tensor: {largest['f32']['largest_tensor']} "
      f"{largest['f32']['largest_tensor_bytes'] / MB:.1f} MB.")
print()
print("| task | adapter-merge time | PEFT time | speed-up | our peak RSS | PEFT peak RSS | RSS / largest tensor (ours) | max \\|Δ\\| |")
print("|---|---|---|---|---|---|---|---|")
rows = [
    (f"{model} (f32) + LoRA → f32", "ours", "peft", "f32", "compare.json", False,
     "merge_and_unload"),
    (f"{model_nf4} (NF4) + LoRA → plain f32", "ours_nf4", "peft_nf4", "nf4", "compare_nf4.json", False,
     "model.dequantize() + merge_and_unload"),
    (f"{model_nf4} (NF4) + LoRA → NF4 (`--requantize`)", "ours_rq", "peft_rq", "nf4", "compare_rq.json", True,
     "merge_and_unload (Linear4bit.merge re-quantizes)"),
]
for task, o, p, kind, cmp_file, byte_check, how in rows:
    ours = load(f"{o}.best.json")
    ow = wall(o)
    ratio = rss(o) * MB / largest[kind]["largest_tensor_bytes"]
    ours_s = f"{ours['seconds']:.2f} s ({ow:.2f} s process)"
    peft = load(f"{p}.best.json")
    if peft:
        pw = wall(p)
        dq = f" + dequantize {peft['dequantize_seconds']:.1f}" if peft.get("dequantized") else ""
        peft_s = (f"{peft['seconds']:.2f} s: {how}; load {peft['load_base_seconds']:.1f}{dq} + adapter "
                  f"{peft['load_adapter_seconds']:.1f}, merge {peft['merge_seconds']:.1f}, save "
                  f"{peft['save_seconds']:.1f} ({pw:.1f} s process, imports {peft['import_seconds']:.1f} s)")
        speed = f"{peft['seconds'] / ours['seconds']:.1f}× ({pw / ow:.1f}× process)"
        peft_rss = f"{rss(p):.0f} MB"
    else:
        peft_s, speed, peft_rss = "not run (PEFT_NF4=0)", "—", "—"
    print(f"| {task} | {ours_s} | {peft_s} | {speed} | {rss(o):.0f} MB | {peft_rss} | {ratio:.2f}× | "
          f"{diff(load(cmp_file), byte_check)} |")
PY
