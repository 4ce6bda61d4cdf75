#!/usr/bin/env bash
# rm-train against TRL's RewardTrainer (CPU), same machine, model, pairs and batches, one run.
# Reward model = LoRA r16 α32 on q,v (dropout 0) + score head, pairwise loss, batch 4 pairs,
# max length 256, f32, constant lr 1e-4, clip 1.0. Tokens/s counts the unpadded chosen +
# rejected tokens of the steps after the first $SKIP (warm-up); peak RSS from /usr/bin/time -v.
# Two data sets from data/dpo_en_demo.json (bench/rm_reference.py prepare):
#   fit       pairs whose chosen and rejected both fit 256 tokens (nothing truncated or dropped)
#   truncate  pairs whose completion starts inside 256 tokens, cut to 256 (rm-train's default;
#             TRL, which would drop them, gets the same token ids pre-tokenized and cut)
# Results: bench/out/rm/results.json and a markdown table on stdout (for docs/benchmarks.md).
set -euo pipefail
MODEL=${MODEL:-models/smollm2}
BIN=${BIN:-target/release}
VENV=${VENV:-$HOME/.cache/peftkit/venv}
THREADS=${THREADS:-2}
DATA=${DATA:-data/dpo_en_demo.json}
STEPS=${STEPS:-14}
SKIP=${SKIP:-2}
RUNS=${RUNS:-2}
MODES=${MODES:-fit truncate}
# Optional, on a shared machine: a pgrep -f pattern of other jobs to wait out before each timed
# run (20 s polls, 15 min at most), which also waits until the CPUs are at least 85 % idle.
WAIT_FOR=${WAIT_FOR:-}
OUT=bench/out/rm
mkdir -p "$OUT"
PY="$VENV/bin/python"
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS RAYON_NUM_THREADS=$THREADS TOKENIZERS_PARALLELISM=false

# wait_idle, timed, busy_jiffies, cpu_busy, rss_mb
. "$(dirname "$0")/lib.sh"

for mode in $MODES; do
  "$PY" bench/rm_reference.py prepare --model "$MODEL" --data "$DATA" --mode "$mode" --max-len 256 --batch 4 \
    --out "$OUT/pairs_$mode.json" > "$OUT/pairs_$mode.stats" 2> /dev/null
  echo "==> $mode: $(cat "$OUT/pairs_$mode.stats")" >&2
done

ours() { # run mode
  rm -rf "$OUT/ours_$2" "$OUT/ours_$2_$1.log"
  timed "ours_$2_$1" "$BIN/rm-train" --model "$MODEL" --data "$OUT/pairs_$2.json" \
    --method lora --rank 16 --alpha 32 --target q_proj,v_proj --dropout 0 --batch 4 --max-len 256 \
    --steps "$STEPS" --lr 1e-4 --schedule constant --clip 1.0 --threads "$THREADS" --quiet \
    --out "$OUT/ours_$2" --log "$OUT/ours_$2_$1.log" > "$OUT/ours_$2_$1.stdout" 2> "$OUT/ours_$2_$1.stderr"
  echo "  run $1 $2 rm-train: rss $(rss_mb "$OUT/ours_$2_$1.time") MB, others' CPU share $(cat "$OUT/ours_$2_$1.others"); $(grep -m1 '^data' "$OUT/ours_$2_$1.stderr")" >&2
}
trl() { # run mode
  timed "trl_$2_$1" "$PY" bench/rm_reference.py train --model "$MODEL" --data "$OUT/pairs_$2.json" --mode "$2" \
    --threads "$THREADS" --max-len 256 --batch 4 --steps "$STEPS" --skip "$SKIP" --lr 1e-4 \
    > "$OUT/trl_$2_$1.json" 2> "$OUT/trl_$2_$1.stderr"
  echo "  run $1 $2 TRL: rss $(rss_mb "$OUT/trl_$2_$1.time") MB, others' CPU share $(cat "$OUT/trl_$2_$1.others"); $(tail -n1 "$OUT/trl_$2_$1.json" | head -c 120)" >&2
}
# With WAIT_FOR set, a run during which other processes took over 5 % of the CPUs is repeated
# (twice at most).
measure() { measure_quiet "$1_$3_$2" "$@"; } # side run mode

for run in $(seq "$RUNS"); do
  for mode in $MODES; do
    measure ours "$run" "$mode"
    measure trl "$run" "$mode"
  done
done

"$PY" - "$OUT" "$RUNS" "$SKIP" "$MODES" <<'PY'
import json, re, sys
out, runs, skip, modes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4].split()

def rss(path):
    return int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", open(path).read()).group(1)) / 1024

def ours(mode, run):
    rows = [json.loads(l) for l in open(f"{out}/ours_{mode}_{run}.log")]
    data = next(r["data"] for r in rows if "data" in r)
    steps = [r for r in rows if "tokens_per_second" in r]
    cum = [r["tokens"] for r in steps]
    # the log's tokens_per_second is cumulative: elapsed = tokens / tokens_per_second
    el = [r["tokens"] / r["tokens_per_second"] for r in steps]
    return {"tokens_per_second": (cum[-1] - cum[skip - 1]) / (el[-1] - el[skip - 1]),
            "tokens_measured": cum[-1] - cum[skip - 1], "seconds_measured": el[-1] - el[skip - 1],
            "step_tokens": [b - a for a, b in zip([0] + cum, cum)], "data": data,
            "loss": sum(r["loss"] for r in steps) / len(steps), "rss_mb": rss(f"{out}/ours_{mode}_{run}.time"),
            "others_cpu_share": float(open(f"{out}/ours_{mode}_{run}.others").read())}

def trl(mode, run):
    r = json.loads(open(f"{out}/trl_{mode}_{run}.json").read().strip().splitlines()[-1])
    r["rss_mb"] = rss(f"{out}/trl_{mode}_{run}.time")
    r["others_cpu_share"] = float(open(f"{out}/trl_{mode}_{run}.others").read())
    return r

res = {}
for mode in modes:
    o = [ours(mode, r) for r in range(1, runs + 1)]
    t = [trl(mode, r) for r in range(1, runs + 1)]
    res[mode] = {"stats": json.loads(open(f"{out}/pairs_{mode}.stats").read()), "rm_train": o, "trl": t,
                 "same_batches": all(x["step_tokens"] == y["step_tokens"] for x in o for y in t)}
json.dump(res, open(f"{out}/results.json", "w"), indent=2)

names = {"fit": "pairs that fit 256", "truncate": "pairs cut to 256"}
print(f"| task | rm-train tok/s | TRL tok/s | speed-up | rm-train peak RSS | TRL peak RSS |")
print("|---|---|---|---|---|---|")
for mode in modes:
    r = res[mode]
    bo = max(x["tokens_per_second"] for x in r["rm_train"])
    bt = max(x["tokens_per_second"] for x in r["trl"])
    all_o = " / ".join(f"{x['tokens_per_second']:.1f}" for x in r["rm_train"])
    all_t = " / ".join(f"{x['tokens_per_second']:.1f}" for x in r["trl"])
    print(f"| RM LoRA r16 q,v + score, 4 pairs, {names.get(mode, mode)} (f32), best of {runs} (runs: {all_o} vs {all_t}) "
          f"| {bo:.1f} | {bt:.1f} | {bo / bt:.2f}× | {max(x['rss_mb'] for x in r['rm_train']):.0f} MB "
          f"| {max(x['rss_mb'] for x in r['trl']):.0f} MB |")
for mode in modes:
    r, s = res[mode], res[mode]["stats"]
    t = r["trl"][0]
    print(f"\n{mode}: {s['pairs']} pairs (of {s['records']}), {s['truncated']} truncated, mean sequence "
          f"{s['mean_seq_len']:.1f} tokens; measured steps {skip + 1}..{len(t['step_tokens'])}: "
          f"{r['rm_train'][0]['tokens_measured']} tokens rm-train, {t['tokens_measured']} TRL "
          f"(TRL computed {t['padded_tokens_measured']} with padding, "
          f"{100 * (t['padded_tokens_measured'] / t['tokens_measured'] - 1):.1f} % more); "
          f"same batches: {'yes' if r['same_batches'] else 'NO'}; mean training loss rm-train "
          f"{r['rm_train'][0]['loss']:.4f}, TRL {t['loss']:.4f} (score heads start from different random draws); other processes' CPU share per run: "
          f"rm-train {', '.join(str(x['others_cpu_share']) for x in r['rm_train'])}, "
          f"TRL {', '.join(str(x['others_cpu_share']) for x in r['trl'])}")
PY
