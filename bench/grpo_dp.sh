#!/usr/bin/env bash
# grpo-train as one process against the same job as N data-parallel processes (docs/distributed.md)
# on the same CPU cores: 1 process × $THREADS threads, then $PROCS processes × ($THREADS / $PROCS)
# threads over TCP, started the way torchrun starts them. The job is bench/grpo.sh's:
# SmolLM2-135M-Instruct (f32), LoRA r16 α32 on q,v, β 0.04 (the reference pass runs), 2 prompts ×
# 8 completions of at most 64 tokens per step, loss dapo, Alpaca prompts as user messages.
# Reported per run, over the steps after the first (warm-up): completion tokens/s (completion
# tokens / (rollout + update seconds) of rank 0's log: the ranks wait for each other at the
# reward gather and the gradient sum, so rank 0's step is the job's step), rollout and update
# seconds per step. Checked: the first step's completions are the same in both runs (its reward,
# completion length and loss: each completion samples from a generator of its own, so the
# processes together sample what one process samples from the same policy); reported: the steps
# until the runs part (after an update the two adapters agree to rounding only, since the ranks'
# gradient sums group the additions differently, and a sampled token sooner or later falls on the
# other side of its draw). Results: bench/out/grpo-dp/results.json and a markdown table.
# Environment: MODEL BIN THREADS PROCS DATA STEPS. About 3 minutes on 2 cores.
set -euo pipefail
MODEL=${MODEL:-models/smollm2}
BIN=${BIN:-target/release}
THREADS=${THREADS:-2}
PROCS=${PROCS:-2}
DATA=${DATA:-data/alpaca_en_demo.json}
STEPS=${STEPS:-6}
OUT=bench/out/grpo-dp
[ -x "$BIN/grpo-train" ] || { echo "$BIN/grpo-train is missing: make build" >&2; exit 2; }
[ -f "$MODEL/config.json" ] || { echo "$MODEL is missing: make model" >&2; exit 2; }
[ -f "$DATA" ] || { echo "$DATA is missing: make data" >&2; exit 2; }
(( THREADS % PROCS == 0 )) || { echo "THREADS ($THREADS) must be a multiple of PROCS ($PROCS)" >&2; exit 2; }
rm -rf "$OUT" && mkdir -p "$OUT"
python3 - "$DATA" "$OUT/prompts.jsonl" <<'PY'
import json, sys
records = json.load(open(sys.argv[1]))
with open(sys.argv[2], "w") as f:
    for r in records:
        text = r["instruction"] + ("\n\n" + r["input"] if r.get("input") else "")
        f.write(json.dumps({"prompt": [{"role": "user", "content": text}]}) + "\n")
PY
common=(--model "$MODEL" --prompts "$OUT/prompts.jsonl" --reward 'regex:the' --target q_proj,v_proj
  --rank 16 --alpha 32 --num-generations 8 --batch 2 --max-completion-length 64 --beta 0.04
  --max-prompt-len 128 --steps "$STEPS" --eval-prompts 0 --seed 42 --quiet)
echo "==> 1 process × $THREADS threads"
"$BIN/grpo-train" "${common[@]}" --threads "$THREADS" --out "$OUT/single" --log "$OUT/single.jsonl"
echo "==> $PROCS processes × $((THREADS / PROCS)) threads (TCP)"
port=$((29600 + RANDOM % 200))
pids=()
for ((r = 0; r < PROCS; r++)); do
  RANK=$r WORLD_SIZE=$PROCS LOCAL_RANK=$r LOCAL_WORLD_SIZE=$PROCS MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
    "$BIN/grpo-train" "${common[@]}" --threads $((THREADS / PROCS)) --out "$OUT/multi" --log "$OUT/multi.jsonl" &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
python3 - "$OUT" "$THREADS" "$PROCS" <<'PY'
import json, sys
out, threads, procs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def steps(name):
    return [r for r in map(json.loads, open(f"{out}/{name}.jsonl")) if "loss" in r]
def summary(rows):
    rows = rows[1:]  # warm-up
    secs = sum(r["rollout_seconds"] + r["update_seconds"] for r in rows)
    toks = sum(r["response_length"] * 16 for r in rows)
    return {"completion_tokens_per_s": toks / secs,
            "rollout_s_per_step": sum(r["rollout_seconds"] for r in rows) / len(rows),
            "update_s_per_step": sum(r["update_seconds"] for r in rows) / len(rows)}
a, b = steps("single"), steps("multi")
assert len(a) == len(b)
same = [(x["reward"], x["response_length"]) == (y["reward"], y["response_length"]) for x, y in zip(a, b)]
assert same[0] and abs(a[0]["loss"] - b[0]["loss"]) <= 1e-5 * max(1.0, abs(a[0]["loss"])), (a[0], b[0])
res = {"single": summary(a), "multi": summary(b), "threads": threads, "processes": procs,
       "steps_with_the_same_samples": next((i for i, s in enumerate(same) if not s), len(same))}
json.dump(res, open(f"{out}/results.json", "w"), indent=1)
print(f"| run | completion tokens/s | rollout s/step | update s/step |\n|---|---|---|---|")
for k, label in (("single", f"1 process × {threads} threads"), ("multi", f"{procs} processes × {threads // procs} threads")):
    s = res[k]
    print(f"| {label} | {s['completion_tokens_per_s']:.1f} | {s['rollout_s_per_step']:.2f} | {s['update_s_per_step']:.2f} |")
print(f"the first {res['steps_with_the_same_samples']} of {len(a)} steps sampled the same completions")
PY
