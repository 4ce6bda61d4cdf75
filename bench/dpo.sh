#!/usr/bin/env bash
# dpo-train against TRL's DPOTrainer (CPU), same machine, model, pairs, order and tokens, one run.
# Policy = LoRA r16 α32 on q,v (dropout 0); reference = the base with the adapter off, its
# log-probs computed once for every pair before training (dpo-train always does; TRL with
# precompute_ref_log_probs=True), sigmoid DPO loss β 0.1, batch 2 pairs (grad accum 1), max
# length 256, f32, constant lr 5e-5, clip 1.0. Tokens/s counts the unpadded chosen + rejected
# tokens of the steps after the first $SKIP (warm-up); the reference pass is timed on its own
# (outside tokens/s on both sides); peak RSS from /usr/bin/time -v.
# Data sets from data/dpo_en_demo.json (bench/rm_reference.py prepare, as bench/rm.sh):
#   fit       pairs whose chosen and rejected both fit 256 tokens (nothing truncated or dropped)
#   truncate  pairs whose completion starts inside 256 tokens, cut to 256 (both sides truncate
#             keeping the start, TRL in its collator); MODES="fit truncate" to add it (its
#             reference pass covers 160 pairs, several minutes per side)
# Before timing, a check (untimed, on the first 2 batches of each set): dpo-train's initial
# adapter (--lr 0, 1 step: the LoRA A it draws, B = 0) is written out, and 2 steps of each side
# must give loss log 2 at step 1 (policy = reference), the same tokens per step, and (TRL
# starting from that same adapter) the same step-2 loss within 1e-3; else the script stops.
# SHARED_INIT=1 (default) also starts the timed TRL runs from dpo-train's initial adapter, so
# the two loss curves can be compared step by step; SHARED_INIT=0 leaves PEFT's own init.
# Results: bench/out/dpo/results.json and a markdown table on stdout (for docs/benchmarks.md).
set -euo pipefail
MODEL=${MODEL:-models/smollm2}
BIN=${BIN:-target/release}
VENV=${VENV:-$HOME/.cache/peftkit/venv}
THREADS=${THREADS:-2}
DATA=${DATA:-data/dpo_en_demo.json}
STEPS=${STEPS:-24}  # 2 epochs of the 24-pair fit set (12 steps each)
SKIP=${SKIP:-2}
RUNS=${RUNS:-2}
MODES=${MODES:-fit}
LR=${LR:-5e-5}
BETA=${BETA:-0.1}
SHARED_INIT=${SHARED_INIT:-1}
# Optional, on a shared machine: a pgrep -f pattern of other jobs to wait out before each timed
# run (20 s polls, 15 min at most), which also waits until the CPUs are at least 85 % idle.
WAIT_FOR=${WAIT_FOR:-}
BATCH=2
OUT=bench/out/dpo
mkdir -p "$OUT"
PY="$VENV/bin/python"
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS RAYON_NUM_THREADS=$THREADS TOKENIZERS_PARALLELISM=false
[ "$SKIP" -lt "$STEPS" ] || { echo "SKIP ($SKIP) must be below STEPS ($STEPS)" >&2; exit 2; }

# wait_idle, timed, busy_jiffies, cpu_busy, rss_mb
. "$(dirname "$0")/lib.sh"

# dpo_cmd DATA OUTDIR LOG STEPS LR: sets DPO to the dpo-train command line with the benchmark's
# settings (and clears OUTDIR and LOG).
dpo_cmd() {
  rm -rf "$2" "$3"
  DPO=("$BIN/dpo-train" --model "$MODEL" --data "$1" --method lora --rank 16 --alpha 32 --target q_proj,v_proj
    --dropout 0 --loss sigmoid --beta "$BETA" --batch "$BATCH" --max-len 256 --steps "$4" --lr "$5"
    --schedule constant --clip 1.0 --threads "$THREADS" --quiet --out "$2" --log "$3")
}
trl_init() { [ "$SHARED_INIT" = 1 ] && echo "--init $OUT/init_$1"; return 0; }

for mode in $MODES; do
  "$PY" bench/rm_reference.py prepare --model "$MODEL" --data "$DATA" --mode "$mode" --max-len 256 --batch "$BATCH" \
    --out "$OUT/pairs_$mode.json" > "$OUT/pairs_$mode.stats" 2> /dev/null
  echo "==> $mode: $(cat "$OUT/pairs_$mode.stats")" >&2
  # the check: first 2 batches of the set
  "$PY" -c 'import json, sys; json.dump(json.load(open(sys.argv[1]))[:2 * int(sys.argv[3])], open(sys.argv[2], "w"))' \
    "$OUT/pairs_$mode.json" "$OUT/check_$mode.json" "$BATCH"
  dpo_cmd "$OUT/check_$mode.json" "$OUT/init_$mode" "$OUT/init_$mode.log" 1 0
  "${DPO[@]}" > /dev/null 2> "$OUT/init_$mode.stderr"
  dpo_cmd "$OUT/check_$mode.json" "$OUT/check_ours_$mode" "$OUT/check_ours_$mode.log" 2 "$LR"
  "${DPO[@]}" > /dev/null 2> "$OUT/check_ours_$mode.stderr"
  "$PY" bench/dpo_reference.py train --model "$MODEL" --data "$OUT/check_$mode.json" --threads "$THREADS" \
    --max-len 256 --batch "$BATCH" --steps 2 --skip 1 --lr "$LR" --beta "$BETA" --init "$OUT/init_$mode" \
    > "$OUT/check_trl_$mode.json" 2> "$OUT/check_trl_$mode.stderr"
  "$PY" - "$OUT" "$mode" <<'PY'
import json, math, sys
out, mode = sys.argv[1:]
ours = [json.loads(l) for l in open(f"{out}/check_ours_{mode}.log")]
ours = [r for r in ours if "tokens_per_second" in r]
init = [json.loads(l) for l in open(f"{out}/init_{mode}.log") if "tokens_per_second" in l]
trl = json.loads(open(f"{out}/check_trl_{mode}.json").read().strip().splitlines()[-1])
ours_tokens = [b - a for a, b in zip([0] + [r["tokens"] for r in ours], [r["tokens"] for r in ours])]
l1 = (init[0]["loss"], ours[0]["loss"], trl["log"][0]["loss"])
l2 = (ours[1]["loss"], trl["log"][1]["loss"])
ok = all(abs(x - math.log(2)) < 1e-4 for x in l1) and ours_tokens == trl["step_tokens"] and abs(l2[0] - l2[1]) < 1e-3
print(f"  check {mode}: step-1 loss dpo-train {l1[1]:.6f}, TRL {l1[2]:.6f} (log 2 = {math.log(2):.6f}); step 2 "
      f"(same initial adapter) dpo-train {l2[0]:.6f}, TRL {l2[1]:.6f}; tokens per step {ours_tokens} vs "
      f"{trl['step_tokens']}: {'ok' if ok else 'MISMATCH'}", file=sys.stderr)
json.dump({"step1_loss": {"dpo_train": l1[1], "trl": l1[2]}, "step2_loss": {"dpo_train": l2[0], "trl": l2[1]},
           "step_tokens": {"dpo_train": ours_tokens, "trl": trl["step_tokens"]}, "ok": ok},
          open(f"{out}/check_{mode}.result", "w"))
sys.exit(0 if ok else 1)
PY
done

ours() { # run mode
  # PEFTKIT_PROFILE=1: the wall time of the reference pass ("dpo.reference" on stderr at exit)
  dpo_cmd "$OUT/pairs_$2.json" "$OUT/ours_$2" "$OUT/ours_$2_$1.log" "$STEPS" "$LR"
  timed "ours_$2_$1" env PEFTKIT_PROFILE=1 "${DPO[@]}" > "$OUT/ours_$2_$1.stdout" 2> "$OUT/ours_$2_$1.stderr"
  echo "  run $1 $2 dpo-train: rss $(rss_mb "$OUT/ours_$2_$1.time") MB, others' CPU share $(cat "$OUT/ours_$2_$1.others"); $(grep -m1 '^data' "$OUT/ours_$2_$1.stderr"); $(grep -m1 'dpo.reference' "$OUT/ours_$2_$1.stderr" | tr -s ' ')" >&2
}
trl() { # run mode
  timed "trl_$2_$1" "$PY" bench/dpo_reference.py train --model "$MODEL" --data "$OUT/pairs_$2.json" \
    --threads "$THREADS" --max-len 256 --batch "$BATCH" --steps "$STEPS" --skip "$SKIP" --lr "$LR" --beta "$BETA" \
    $(trl_init "$2") > "$OUT/trl_$2_$1.json" 2> "$OUT/trl_$2_$1.stderr"
  echo "  run $1 $2 TRL: rss $(rss_mb "$OUT/trl_$2_$1.time") MB, others' CPU share $(cat "$OUT/trl_$2_$1.others"); $(tail -n1 "$OUT/trl_$2_$1.json" | head -c 160)" >&2
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

"$PY" - "$OUT" "$RUNS" "$SKIP" "$MODES" "$BATCH" "$SHARED_INIT" <<'PY'
import json, math, re, sys
out, runs, skip, modes, batch, shared = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4].split(), \
    int(sys.argv[5]), sys.argv[6] == "1"

def timefile(path):
    t = open(path).read()
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", t).group(1).split(":")
    return (int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", t).group(1)) / 1024,
            sum(float(x) * 60 ** i for i, x in enumerate(reversed(wall))))

def tail(log, per_epoch):
    """final step, and the mean over the last epoch's steps (each pair once)"""
    last = log[-per_epoch:]  # the whole log when it is shorter than an epoch
    return {"final_loss": log[-1]["loss"], "final_accuracy": log[-1]["accuracy"],
            "last_epoch_loss": sum(r["loss"] for r in last) / len(last),
            "last_epoch_accuracy": sum(r["accuracy"] for r in last) / len(last),
            "last_epoch_margin": sum(r["rewards_chosen"] - r["rewards_rejected"] for r in last) / len(last),
            "step1_loss": log[0]["loss"]}

def ours(mode, run, per_epoch):
    rows = [json.loads(l) for l in open(f"{out}/ours_{mode}_{run}.log")]
    data = next(r["data"] for r in rows if "data" in r)
    steps = [r for r in rows if "tokens_per_second" in r]
    cum = [r["tokens"] for r in steps]
    # the log's tokens_per_second is cumulative from the first step's start: elapsed = tokens / tokens_per_second
    el = [r["tokens"] / r["tokens_per_second"] for r in steps]
    c0, e0 = (cum[skip - 1], el[skip - 1]) if skip else (0, 0.0)
    ref = re.search(r"dpo\.reference\s+([\d.]+) s", open(f"{out}/ours_{mode}_{run}.stderr").read())
    rss, wall = timefile(f"{out}/ours_{mode}_{run}.time")
    log = [{k: r[k] for k in ("step", "loss", "rewards_chosen", "rewards_rejected", "accuracy")} for r in steps]
    return {"tokens_per_second": (cum[-1] - c0) / (el[-1] - e0), "tokens_measured": cum[-1] - c0,
            "seconds_measured": el[-1] - e0, "reference_seconds": float(ref.group(1)) if ref else None,
            "step_tokens": [b - a for a, b in zip([0] + cum, cum)], "data": data, "log": log,
            "loss": sum(r["loss"] for r in steps) / len(steps), **tail(log, per_epoch),
            "rss_mb": rss, "wall_seconds": wall,
            "others_cpu_share": float(open(f"{out}/ours_{mode}_{run}.others").read())}

def trl(mode, run, per_epoch):
    r = json.loads(open(f"{out}/trl_{mode}_{run}.json").read().strip().splitlines()[-1])
    r.update(tail(r["log"], per_epoch))
    r["rss_mb"], r["wall_seconds"] = timefile(f"{out}/trl_{mode}_{run}.time")
    r["others_cpu_share"] = float(open(f"{out}/trl_{mode}_{run}.others").read())
    return r

res = {}
for mode in modes:
    stats = json.loads(open(f"{out}/pairs_{mode}.stats").read())
    per_epoch = stats["pairs"] // batch
    o = [ours(mode, r, per_epoch) for r in range(1, runs + 1)]
    t = [trl(mode, r, per_epoch) for r in range(1, runs + 1)]
    dl = [abs(x["loss"] - y["loss"]) for x, y in zip(o[0]["log"], t[0]["log"])]
    res[mode] = {"stats": stats, "check": json.load(open(f"{out}/check_{mode}.result")), "dpo_train": o, "trl": t,
                 "shared_init": shared, "max_abs_loss_diff_run1": max(dl),
                 "same_batches": all(x["step_tokens"] == y["step_tokens"] for x in o for y in t)}
json.dump(res, open(f"{out}/results.json", "w"), indent=2)

names = {"fit": "pairs that fit 256", "truncate": "pairs cut to 256"}
print("| task | dpo-train tok/s | TRL tok/s | speed-up | dpo-train ref. pass | TRL ref. pass | dpo-train peak RSS | TRL peak RSS |")
print("|---|---|---|---|---|---|---|---|")
for mode in modes:
    r = res[mode]
    bo = max(x["tokens_per_second"] for x in r["dpo_train"])
    bt = max(x["tokens_per_second"] for x in r["trl"])
    ro = min(x["reference_seconds"] for x in r["dpo_train"])
    rt = min(x["reference_seconds"] for x in r["trl"])
    all_o = " / ".join(f"{x['tokens_per_second']:.1f}" for x in r["dpo_train"])
    all_t = " / ".join(f"{x['tokens_per_second']:.1f}" for x in r["trl"])
    print(f"| DPO LoRA r16 q,v, 2 pairs, {names.get(mode, mode)} (f32), best of {runs} (runs: {all_o} vs {all_t}) "
          f"| {bo:.1f} | {bt:.1f} | {bo / bt:.2f}× | {ro:.1f} s | {rt:.1f} s "
          f"| {max(x['rss_mb'] for x in r['dpo_train']):.0f} MB | {max(x['rss_mb'] for x in r['trl']):.0f} MB |")
for mode in modes:
    r, s = res[mode], res[mode]["stats"]
    o, t = r["dpo_train"], r["trl"]
    f = lambda xs, k, p=4: " / ".join(f"{x[k]:.{p}f}" for x in xs)
    print(f"\n{mode}: {s['pairs']} pairs (of {s['records']}), {s['truncated']} truncated, mean sequence "
          f"{s['mean_seq_len']:.1f} tokens; measured steps {skip + 1}..{len(t[0]['step_tokens'])}: "
          f"{o[0]['tokens_measured']} tokens dpo-train, {t[0]['tokens_measured']} TRL "
          f"(TRL computed {t[0]['padded_tokens_measured']} with padding, "
          f"{100 * (t[0]['padded_tokens_measured'] / t[0]['tokens_measured'] - 1):.1f} % more); "
          f"same batches: {'yes' if r['same_batches'] else 'NO'}.")
    print(f"Reference pass ({s['pairs']} pairs, {s['tokens']} tokens, batches of {batch}): dpo-train "
          f"{f(o, 'reference_seconds', 1)} s, TRL {f(t, 'reference_seconds', 1)} s (of which forwards "
          f"{f(t, 'reference_forward_seconds', 1)} s); whole process wall time dpo-train {f(o, 'wall_seconds', 1)} s, "
          f"TRL {f(t, 'wall_seconds', 1)} s.")
    c = r["check"]
    print(f"Losses: step 1 dpo-train {f(o, 'step1_loss', 6)}, TRL {f(t, 'step1_loss', 6)} (log 2 = {math.log(2):.6f}; "
          f"pre-check step 2: {c['step2_loss']['dpo_train']:.6f} vs {c['step2_loss']['trl']:.6f}); "
          f"{'same initial adapter' if shared else 'different LoRA A draws'}, largest per-step loss difference "
          f"in run 1 {r['max_abs_loss_diff_run1']:.2e}; final step loss dpo-train {f(o, 'final_loss')}, TRL "
          f"{f(t, 'final_loss')}; mean over the last {min(len(t[0]['log']), s['pairs'] // batch)} steps (at most an epoch): loss {f(o, 'last_epoch_loss')} vs {f(t, 'last_epoch_loss')}, "
          f"reward accuracy {f(o, 'last_epoch_accuracy', 3)} vs {f(t, 'last_epoch_accuracy', 3)}, margin "
          f"{f(o, 'last_epoch_margin')} vs {f(t, 'last_epoch_margin')}; other processes' CPU share per run: "
          f"dpo-train {', '.join(str(x['others_cpu_share']) for x in o)}, TRL {', '.join(str(x['others_cpu_share']) for x in t)}")
PY
