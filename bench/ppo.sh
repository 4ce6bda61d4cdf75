#!/usr/bin/env bash
# ppo-train against TRL's PPOTrainer (PPOv2, trl/experimental/ppo of TRL 1.0.0) on CPU, same
# machine, model, prompts and settings, one run. SmolLM2-135M (f32), policy LoRA r16 α32 on
# q,v (dropout 0), reference = the policy with the adapter off, reward = the rm-train LoRA
# SEQ_CLS adapter $RM on the same base, 8 prompts per step, 48-token responses (temperature 0.7,
# stop at EOS), 4 PPO epochs over 1 mini-batch, AdamW lr 1e-4 (linear decay), KL k1 β 0.05.
# Value model: ppo-train puts a value head on the policy's backbone; TRL trains a separate
# AutoModelForSequenceClassification in full (its design; bench/ppo_reference.py header).
# Per side, over the steps after the first $SKIP (warm-up):
#   rollout tokens/s  response tokens sampled (up to and including EOS) / seconds of the rollout
#                     phase (generation + the log-prob / reference / value / reward passes, GAE)
#   update tokens/s   query + response tokens (unpadded) × PPO epochs / seconds of the update phase
#   wall s/step       ppo-train: rollout + update seconds (nothing else runs in its step);
#                     TRL: from one step's end to the next (its per-step bookkeeping included)
#   peak RSS          /usr/bin/time -v of the whole process (policy, reference, reward and value
#                     resident)
# Prompts: data/dpo_en_demo.json's conversations up to the last user turn, chat template +
# generation prompt, those over 256 tokens dropped, cut to a multiple of 8 (bench/ppo_reference.py
# prepare); ppo-train reads them as {"prompt": [messages]} JSONL, TRL gets the same token ids in
# ppo-train's batch order. Results: bench/out/ppo/results.json and a markdown table on stdout.
#
# Environment: MODEL BIN VENV THREADS DATA RM STEPS SKIP RUNS WAIT_FOR TRL_DIR (defaults below).
# Never builds: $BIN must hold ppo-train and rm-score (and rm-train when $RM is missing).
set -euo pipefail
MODEL=${MODEL:-models/smollm2}
BIN=${BIN:-target/release}
VENV=${VENV:-$HOME/.cache/peftkit/venv}
THREADS=${THREADS:-2}
DATA=${DATA:-data/dpo_en_demo.json}
RM=${RM:-runs/demo-rm}
STEPS=${STEPS:-8}
SKIP=${SKIP:-1}
RUNS=${RUNS:-2}
# TRL 1.0.0, unpacked from its wheel (the venv keeps its own TRL; 1.16 has no PPO any more).
TRL_DIR=${TRL_DIR:-$HOME/.cache/peftkit/trl-1.0.0}
# Optional, on a shared machine: a pgrep -f pattern of other jobs to wait out before each timed
# run (20 s polls, 15 min at most), which also waits until the CPUs are at least 85 % idle.
WAIT_FOR=${WAIT_FOR:-}
OUT=bench/out/ppo
mkdir -p "$OUT"
PY="$VENV/bin/python"
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS RAYON_NUM_THREADS=$THREADS TOKENIZERS_PARALLELISM=false
export TRL_EXPERIMENTAL_SILENCE=1

[ "$STEPS" -gt "$SKIP" ] || { echo "STEPS ($STEPS) must be larger than SKIP ($SKIP)" >&2; exit 2; }
for b in ppo-train rm-score; do
  [ -x "$BIN/$b" ] || { echo "missing $BIN/$b: build first (make build, or set BIN)" >&2; exit 2; }
done

# --- dependencies of the reference side ---
if [ ! -x "$PY" ]; then
  echo "==> creating the venv $VENV" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch transformers peft trl accelerate datasets pandas safetensors numpy
fi
if ! "$PY" -c "import torch, transformers, peft, accelerate, datasets, pandas" 2> /dev/null; then
  echo "==> installing the reference stack into $VENV" >&2
  "$VENV/bin/pip" install -q torch transformers peft accelerate datasets pandas safetensors numpy
fi
if [ ! -f "$TRL_DIR/trl/experimental/ppo/ppo_trainer.py" ]; then
  echo "==> fetching TRL 1.0.0 into $TRL_DIR (the venv's TRL is left alone)" >&2
  tmp=$(mktemp -d)
  "$VENV/bin/pip" download -q --no-deps trl==1.0.0 -d "$tmp"
  mkdir -p "$TRL_DIR"
  "$PY" -m zipfile -e "$tmp"/trl-1.0.0-py3-none-any.whl "$TRL_DIR"
  rm -rf "$tmp"
fi

# --- the reward model: rm-train's LoRA SEQ_CLS adapter on the same base ---
if [ ! -f "$RM/adapter_model.safetensors" ]; then
  [ -x "$BIN/rm-train" ] || { echo "missing $RM and $BIN/rm-train to create it" >&2; exit 2; }
  echo "==> training the reward adapter $RM" >&2
  "$BIN/rm-train" --model "$MODEL" --data "$DATA" --method lora --rank 16 --alpha 32 --lr 1e-3 --steps 16 \
    --batch 4 --max-len 384 --seed 1 --threads "$THREADS" --quiet --out "$RM" > "$OUT/rm_train.log" 2>&1
fi

# --- the prompts, and the reward model as both sides load it ---
"$PY" bench/ppo_reference.py prepare --model "$MODEL" --data "$DATA" --max-prompt-len 256 --batch 8 \
  --out "$OUT/prompts.jsonl" --ids "$OUT/prompt_ids.json" > "$OUT/prompts.stats" 2> /dev/null
echo "==> prompts: $(cat "$OUT/prompts.stats")" >&2
if ! "$PY" bench/ppo_reference.py check-rm --model "$MODEL" --reward-model "$RM" --data "$DATA" \
     --rm-score "$BIN/rm-score" --threads "$THREADS" > "$OUT/rm_check.json" 2> "$OUT/rm_check.stderr"; then
  echo "reward model check FAILED: rm-score and transformers + PEFT disagree (or the check broke):" >&2
  cat "$OUT/rm_check.json" >&2; tail -n 5 "$OUT/rm_check.stderr" >&2
  exit 1
fi
echo "==> reward model: rm-score vs transformers + PEFT (merged) $(cat "$OUT/rm_check.json" | head -c 300)" >&2

# wait_idle, timed, busy_jiffies, cpu_busy, rss_mb
. "$(dirname "$0")/lib.sh"

ours() { # run
  rm -rf "$OUT/ours_run" "$OUT/ours_$1.log"
  timed "ours_$1" "$BIN/ppo-train" --model "$MODEL" --reward-model "$RM" --prompts "$OUT/prompts.jsonl" \
    --out "$OUT/ours_run" --batch 8 --response-length 48 --steps "$STEPS" --max-prompt-len 256 --eval-prompts 0 \
    --lr 1e-4 --rank 16 --alpha 32 --target q_proj,v_proj --seed 42 --threads "$THREADS" \
    --log "$OUT/ours_$1.log" --quiet > "$OUT/ours_$1.stdout" 2> "$OUT/ours_$1.stderr"
  echo "  run $1 ppo-train: rss $(rss_mb "$OUT/ours_$1.time") MB, others' CPU share $(cat "$OUT/ours_$1.others"); $(grep -m1 '^prompts' "$OUT/ours_$1.stderr")" >&2
}
trl() { # run
  timed "trl_$1" "$PY" bench/ppo_reference.py train --model "$MODEL" --data "$OUT/prompt_ids.json" \
    --reward-model "$RM" --trl-dir "$TRL_DIR" --threads "$THREADS" --batch 8 --response-length 48 \
    --steps "$STEPS" --ppo-epochs 4 --mini-batches 1 --temperature 0.7 --kl-coef 0.05 --lr 1e-4 --seed 42 \
    --out "$OUT/trl_$1.json" > "$OUT/trl_$1.stdout" 2> "$OUT/trl_$1.stderr"
  echo "  run $1 TRL: rss $(rss_mb "$OUT/trl_$1.time") MB, others' CPU share $(cat "$OUT/trl_$1.others"); $(tail -n1 "$OUT/trl_$1.stdout" | head -c 120)" >&2
}
# With WAIT_FOR set, a run during which other processes took over 5 % of the CPUs is repeated
# (twice at most).
measure() { measure_quiet "$1_$2" "$@"; } # side run

for run in $(seq "$RUNS"); do
  measure ours "$run"
  measure trl "$run"
done

"$PY" - "$OUT" "$RUNS" "$SKIP" "$STEPS" <<'PY'
import json, re, sys
out, runs, skip, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])

def rss(path):
    return int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", open(path).read()).group(1)) / 1024

def others(name):
    return float(open(f"{out}/{name}.others").read())

def ours(run):
    rows = [json.loads(l) for l in open(f"{out}/ours_{run}.log")]
    st = [r for r in rows if "rollout_seconds" in r]
    assert len(st) == steps, f"ppo-train logged {len(st)} steps, expected {steps}"
    m = st[skip:]
    rtok = [r["rollout_tokens_per_second"] * r["rollout_seconds"] for r in m]
    utok = [r["update_tokens_per_second"] * r["update_seconds"] for r in m]
    rs, us = sum(r["rollout_seconds"] for r in m), sum(r["update_seconds"] for r in m)
    prompts = re.search(r"^prompts: .*", open(f"{out}/ours_{run}.stderr").read(), re.M)
    return {"rollout_tokens_per_second": sum(rtok) / rs, "update_tokens_per_second": sum(utok) / us,
            "wall_seconds_per_step": (rs + us) / len(m), "rollout_seconds_per_step": rs / len(m),
            "update_seconds_per_step": us / len(m), "response_tokens_measured": round(sum(rtok)),
            "update_tokens_measured": round(sum(utok)),
            "mean_response_length": sum(r["response_length"] for r in m) / len(m),
            "mean_score": sum(r["score_mean"] for r in m) / len(m),
            "eos_fraction": sum(r["eos_fraction"] for r in m) / len(m),
            "prompts_line": prompts.group(0) if prompts else None,
            "rss_mb": rss(f"{out}/ours_{run}.time"), "others_cpu_share": others(f"ours_{run}"), "steps": st}

def trl(run):
    r = json.load(open(f"{out}/trl_{run}.json"))
    st = r["steps"]
    assert len(st) == steps, f"TRL ran {len(st)} steps, expected {steps}"
    m = st[skip:]
    rs, us = sum(s["rollout_seconds"] for s in m), sum(s["update_seconds"] for s in m)
    rtok, utok = sum(s["response_tokens"] for s in m), sum(s["update_tokens"] for s in m)
    return {"rollout_tokens_per_second": rtok / rs, "update_tokens_per_second": utok / us,
            "wall_seconds_per_step": sum(s["wall_seconds"] for s in m) / len(m),
            "rollout_plus_update_seconds_per_step": (rs + us) / len(m),
            "rollout_seconds_per_step": rs / len(m), "update_seconds_per_step": us / len(m),
            "generate_seconds_per_step": sum(s["generate_seconds"] for s in m) / len(m),
            "response_tokens_measured": rtok, "update_tokens_measured": utok,
            "update_padded_tokens_measured": sum(s["update_padded_tokens"] for s in m),
            "update_padded_tokens_per_second": sum(s["update_padded_tokens"] for s in m) / us,
            "mean_response_length": rtok / (8 * len(m)),
            "mean_score": sum(s.get("score_mean") or 0 for s in m) / len(m),
            "eos_fraction": sum(s["eos_fraction"] for s in m) / len(m),
            "trainable_params": r["trainable_params"], "trl_version": r["trl"],
            "rss_mb": rss(f"{out}/trl_{run}.time"), "others_cpu_share": others(f"trl_{run}"), "steps": st}

stats = json.loads(open(f"{out}/prompts.stats").read())
rmc = json.loads(open(f"{out}/rm_check.json").read())
o = [ours(r) for r in range(1, runs + 1)]
t = [trl(r) for r in range(1, runs + 1)]
expect = f"prompts: {stats['prompts']} from {stats['prompts']} records; 0 dropped"
same_prompts = all(x["prompts_line"] and x["prompts_line"].startswith(expect) for x in o)
# Same prompt batches: ppo-train's query tokens per step (update tokens / epochs − response tokens)
# must equal the unpadded query tokens TRL got at that step (ids and order both).
def query_tokens(s):
    return round(s["update_tokens_per_second"] * s["update_seconds"] / 4 - s["rollout_tokens_per_second"] * s["rollout_seconds"])
same_batches = all([query_tokens(s) for s in x["steps"]] == [s["query_tokens"] for s in y["steps"]] for x in o for y in t)
res = {"settings": {"steps": steps, "skip": skip, "runs": runs, "batch": 8, "response_length": 48,
                    "ppo_epochs": 4, "mini_batches": 1, "temperature": 0.7, "kl_coef": 0.05, "lr": 1e-4},
       "prompts": stats, "same_prompt_set": same_prompts, "same_prompt_batches": same_batches, "rm_check": rmc, "ppo_train": o, "trl": t}
json.dump(res, open(f"{out}/results.json", "w"), indent=1)

def runs_of(side, key, fmt):
    return " / ".join(fmt.format(x[key]) for x in side)

best = lambda side, key, f=max: f(x[key] for x in side)
bo_r, bt_r = best(o, "rollout_tokens_per_second"), best(t, "rollout_tokens_per_second")
bo_u, bt_u = best(o, "update_tokens_per_second"), best(t, "update_tokens_per_second")
bo_w, bt_w = best(o, "wall_seconds_per_step", min), best(t, "wall_seconds_per_step", min)
ro, rt = best(o, "rss_mb"), best(t, "rss_mb")
print(f"PPO, SmolLM2-135M (f32), LoRA r16 α32 q,v, 8 prompts × 48 tokens, 4 PPO epochs, steps {skip + 1}..{steps} "
      f"of {steps}, best of {runs} (every run listed: ppo-train vs TRL)\n")
print("| metric | ppo-train | TRL 1.0.0 PPOTrainer | speed-up (RSS: ratio) |")
print("|---|---|---|---|")
print(f"| rollout tokens/s (runs {runs_of(o, 'rollout_tokens_per_second', '{:.1f}')} vs "
      f"{runs_of(t, 'rollout_tokens_per_second', '{:.1f}')}) | {bo_r:.1f} | {bt_r:.1f} | {bo_r / bt_r:.2f}× |")
print(f"| update tokens/s (runs {runs_of(o, 'update_tokens_per_second', '{:.1f}')} vs "
      f"{runs_of(t, 'update_tokens_per_second', '{:.1f}')}) | {bo_u:.1f} | {bt_u:.1f} | {bo_u / bt_u:.2f}× |")
print(f"| wall s/step (runs {runs_of(o, 'wall_seconds_per_step', '{:.1f}')} vs "
      f"{runs_of(t, 'wall_seconds_per_step', '{:.1f}')}) | {bo_w:.1f} | {bt_w:.1f} | {bt_w / bo_w:.2f}× |")
print(f"| peak RSS (policy, reference, reward, value resident) | {ro:.0f} MB | {rt:.0f} MB | {ro / rt:.2f}× |")
x, y = o[0], t[0]
print(f"\nprompts: {stats['prompts']} of {stats['records']} records ({stats['dropped_long']} over 256 tokens, "
      f"{stats['cut_to_batch_multiple']} cut to a multiple of 8), mean {stats['mean_prompt_len']:.1f} tokens; same "
      f"prompt set on both sides: {'yes' if same_prompts else 'NO (ppo-train: ' + str(x['prompts_line']) + ')'}, same "
      f"prompt batches (query tokens of every step equal): {'yes' if same_batches else 'NO'}; "
      f"reward model: rm-score vs transformers + PEFT max |Δscore| {rmc['max_abs_diff']:.2g} on {rmc['texts']} texts. "
      f"Run 1: mean response length {x['mean_response_length']:.1f} vs {y['mean_response_length']:.1f} tokens "
      f"(EOS in {100 * x['eos_fraction']:.0f} % vs {100 * y['eos_fraction']:.0f} %); seconds per step rollout "
      f"{x['rollout_seconds_per_step']:.1f} vs {y['rollout_seconds_per_step']:.1f} (TRL's generate() "
      f"{y['generate_seconds_per_step']:.1f} of it), update {x['update_seconds_per_step']:.1f} vs "
      f"{y['update_seconds_per_step']:.1f}; TRL's update computed {y['update_padded_tokens_measured']} padded tokens "
      f"for {y['update_tokens_measured']} real ones ({y['update_padded_tokens_per_second']:.1f} padded tokens/s); "
      f"TRL trains {y['trainable_params']['policy']:,} policy + {y['trainable_params']['value']:,} value-model "
      f"parameters, ppo-train the LoRA + a value head; other processes' CPU share per run: ppo-train "
      f"{', '.join(str(x_['others_cpu_share']) for x_ in o)}, TRL {', '.join(str(y_['others_cpu_share']) for y_ in t)}")
busy = [f"{side} run {i + 1} ({r['others_cpu_share']:.0%})" for side, rs in (("ppo-train", o), ("TRL", t))
        for i, r in enumerate(rs) if r["others_cpu_share"] > 0.05]
if busy:
    print(f"\nWARNING: other processes took over 5 % of the CPUs during {', '.join(busy)}: those numbers are not "
          f"a clean measurement; rerun with WAIT_FOR set on a quiet machine.")
PY
