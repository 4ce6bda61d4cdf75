#!/usr/bin/env bash
# model-export against llama.cpp's own convert_hf_to_gguf.py (llama-cpp-python 0.3.36's sdist,
# fetched and sha256-checked by tests/fixtures/generate_gguf_export.py) on the same model and
# machine: wall time and peak RSS (/usr/bin/time -v), best of $RUNS runs each, for each type,
# then a byte-for-byte comparison of the two files. Prints a markdown table.
#
#   bash bench/export.sh            # MODEL=models/smollm2 BIN=target/release TYPES="f16 q8_0"
set -euo pipefail
MODEL=${MODEL:-models/smollm2}
BIN=${BIN:-target/release}
VENV=${VENV:-$HOME/.cache/peftkit/venv}
PY=${PY:-$VENV/bin/python}
RUNS=${RUNS:-3}
TYPES=${TYPES:-f16 q8_0}
OUT=${OUT:-bench/out/export}
mkdir -p "$OUT"

# The converter needs sentencepiece (it imports it before choosing a vocabulary path).
"$PY" -c "import sentencepiece" 2>/dev/null || "$PY" -m pip install -q sentencepiece
LCPP=$("$PY" - <<'PY'
import importlib.util
spec = importlib.util.spec_from_file_location("gen", "tests/fixtures/generate_gguf_export.py")
gen = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gen)
print(gen.fetch_converter())
PY
)

rss_mb() { echo $(( $(sed -n 's/.*Maximum resident set size (kbytes): //p' "$1") / 1024 )); }
secs() { sed -n 's/.*Elapsed (wall clock) time (h:mm:ss or m:ss): //p' "$1" | awk -F: '{ if (NF == 3) print $1 * 3600 + $2 * 60 + $3; else print $1 * 60 + $2 }'; }

# best_of NAME CMD...: runs CMD $RUNS times, keeps the fastest run's time file as $OUT/NAME.time
best_of() {
  local name=$1; shift
  local best=""
  for i in $(seq "$RUNS"); do
    /usr/bin/time -v -o "$OUT/$name.run.time" "$@" > /dev/null 2> "$OUT/$name.log"
    local s; s=$(secs "$OUT/$name.run.time")
    echo "  $name run $i: ${s}s, peak RSS $(rss_mb "$OUT/$name.run.time") MB" >&2
    if [ -z "$best" ] || awk "BEGIN { exit !($s < $best) }"; then
      best=$s; cp "$OUT/$name.run.time" "$OUT/$name.time"
    fi
  done
}

echo "| $MODEL → GGUF | model-export | convert_hf_to_gguf.py | speed-up | model-export peak RSS | converter peak RSS | byte-identical |"
echo "|---|---:|---:|---:|---:|---:|---|"
for t in $TYPES; do
  rm -f "$OUT/ours.$t.gguf" "$OUT/theirs.$t.gguf"
  best_of "ours.$t" "$BIN/model-export" --model "$MODEL" --out "$OUT/ours.$t.gguf" --type "$t" --quiet
  best_of "theirs.$t" env PYTHONPATH="$LCPP/gguf-py" "$PY" "$LCPP/convert_hf_to_gguf.py" "$MODEL" \
    --outfile "$OUT/theirs.$t.gguf" --outtype "$t"
  same=no; cmp -s "$OUT/ours.$t.gguf" "$OUT/theirs.$t.gguf" && same=yes
  o=$(secs "$OUT/ours.$t.time"); c=$(secs "$OUT/theirs.$t.time")
  echo "| --type $t ($(( $(stat -c %s "$OUT/ours.$t.gguf") / 1000000 )) MB) | ${o} s | ${c} s | $(awk "BEGIN { printf \"%.1fx\", $c / $o }") | $(rss_mb "$OUT/ours.$t.time") MB | $(rss_mb "$OUT/theirs.$t.time") MB | $same |"
done
