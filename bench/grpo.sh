#!/usr/bin/env bash
# grpo-train against TRL 1.16's GRPOTrainer on CPU, same machine, model, prompts, prompt order and
# settings, one script run. SmolLM2-135M-Instruct (f32), policy LoRA r16 α32 on q,v (dropout 0),
# reference = the policy with the adapter off (β 0.04, so the reference pass runs on both sides),
# 2 prompts per step × 8 generations = 16 completions of at most 64 tokens (temperature 1, top-p 1,
# top-k 0, stop at EOS <|im_end|>), loss dapo, ε 0.2, group-scaled advantages, KL bias correction
# on (TRL's use_bias_correction_kl default), 1 iteration (no old-policy pass), 1 micro-batch of 16
# (TRL: per_device_train_batch_size 16, steps_per_generation 1, gradient_accumulation_steps 1),
# AdamW lr 5e-6 with linear decay over $STEPS, max grad norm 1.0, dropout disabled; TRL with
# activation (gradient) checkpointing off: GRPOConfig's default is on, grpo-train keeps
# activations. Reward: one verifiable function, 1.0 when the decoded completion contains "the"
# (grpo-train --reward 'regex:the'; TRL a Python function on the decoded completion text).
# Eval off on grpo-train (--eval-prompts 0), no checkpoints while timing, logging every step.
# Per side, over the steps after the first $SKIP (warm-up):
#   completion tokens/s  completion tokens sampled (up to and including EOS; 16 per step) /
#                        wall seconds: the headline, since the two samplers draw different
#                        completions and so different lengths (mean lengths reported)
#   wall s/step          grpo-train: rollout + update seconds of its log (nothing else runs in
#                        its step); TRL: from one step's end to the next (its logging and the
#                        dataloader included)
#   rollout s/step       generation + the reference pass (adapter off) + rewards + advantages;
#                        TRL: _generate_and_score_completions, split into generate(), the
#                        reference pass and the reward functions
#   update s/step        the policy forward, backward, clipping and AdamW step; TRL: from
#                        training_step's start to on_step_end, minus the rollout inside it
#   rollout tokens/s     completion tokens / rollout seconds
#   update tokens/s      prompt + completion tokens (unpadded) / update seconds
#   peak RSS             /usr/bin/time -v of the whole process
# Prompts: data/alpaca_en_demo.json, each record as one user message (instruction, plus "\n\n" +
# input when there is one), chat template + generation prompt, those over 128 tokens dropped
# (bench/grpo_reference.py prepare); grpo-train reads them as {"prompt": [messages]} JSONL, TRL
# gets the same messages (it applies the chat template itself) laid out in grpo-train's order
# (peftkit's epoch shuffle, seed 42) with shuffle_dataset=False. Checked before timing: for a few
# prompts (and the longest) our rendering (peft-generate --json) equals transformers' chat
# template text, and our token ids (peft-eval --per-token) equal the ids TRL tokenizes; after
# timing: the prompt tokens of every step are equal on both sides (same prompts, same order).
# Results: bench/out/grpo/results.json and a markdown table on stdout.
#
# DTYPE=bf16: both sides in bf16 mixed precision instead (grpo-train --compute-dtype bf16, TRL
# GRPOConfig bf16=True: autocast over f32 weights; its default), results in bench/out/grpo-bf16.
# Environment: MODEL BIN VENV THREADS DATA STEPS SKIP RUNS WAIT_FOR DTYPE (defaults below). About
# 5 minutes on 2 Zen 5 cores with the defaults (297 s measured). Never builds: $BIN must hold
# grpo-train, peft-generate and peft-eval.
set -euo pipefail
MODEL=${MODEL:-models/smollm2}
BIN=${BIN:-target/release}
VENV=${VENV:-$HOME/.cache/peftkit/venv}
THREADS=${THREADS:-2}
DATA=${DATA:-data/alpaca_en_demo.json}
STEPS=${STEPS:-5}
SKIP=${SKIP:-1}
RUNS=${RUNS:-2}
# Optional, on a shared machine: a pgrep -f pattern of other jobs to wait out before each timed
# run (20 s polls, 15 min at most), which also waits until the CPUs are at least 85 % idle.
WAIT_FOR=${WAIT_FOR:-}
# f32, or bf16: grpo-train --compute-dtype bf16 against TRL's bf16 mixed precision (GRPOConfig
# bf16=True, its own default: autocast with f32 weights); results in bench/out/grpo-bf16.
DTYPE=${DTYPE:-f32}
case "$DTYPE" in f32) OUT=bench/out/grpo ;; bf16) OUT=bench/out/grpo-bf16 ;;
  *) echo "DTYPE must be f32 or bf16" >&2; exit 2 ;; esac
mkdir -p "$OUT"
PY="$VENV/bin/python"
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS RAYON_NUM_THREADS=$THREADS TOKENIZERS_PARALLELISM=false
# Settings both sides get.
BATCH=2 GENS=8 MAXLEN=64 PROMPTLEN=128 BETA=0.04 LR=5e-6 SEED=42

[ "$STEPS" -gt "$SKIP" ] || { echo "STEPS ($STEPS) must be larger than SKIP ($SKIP)" >&2; exit 2; }
for b in grpo-train peft-generate peft-eval; do
  [ -x "$BIN/$b" ] || { echo "missing $BIN/$b: build first (make build, or set BIN)" >&2; exit 2; }
done
start=$SECONDS

# --- dependencies of the reference side (TRL 1.16: GRPOTrainer as benchmarked) ---
if [ ! -x "$PY" ]; then
  echo "==> creating the venv $VENV" >&2
  python3 -m venv "$VENV"
fi
if ! "$PY" -c "import torch, transformers, peft, accelerate, datasets, trl" 2> /dev/null; then
  echo "==> installing the reference stack into $VENV" >&2
  "$VENV/bin/pip" install -q torch transformers peft accelerate datasets safetensors numpy trl==1.16.0
fi
trl_version=$("$PY" -c "import trl; print(trl.__version__)" 2> /dev/null)
[ "$trl_version" = 1.16.0 ] || { echo "$VENV has TRL $trl_version; this benchmark is written against TRL 1.16.0" >&2; exit 2; }

# --- the prompts, and the check that both sides feed the model the same tokens ---
"$PY" bench/grpo_reference.py prepare --model "$MODEL" --data "$DATA" --max-prompt-len "$PROMPTLEN" \
  --out "$OUT/prompts.jsonl" > "$OUT/prompts.stats" 2> /dev/null
echo "==> prompts: $(cat "$OUT/prompts.stats")" >&2
if ! "$PY" bench/grpo_reference.py check-prompts --model "$MODEL" --prompts "$OUT/prompts.jsonl" --bin "$BIN" \
     --threads "$THREADS" > "$OUT/prompt_check.json" 2> "$OUT/prompt_check.stderr"; then
  echo "prompt check FAILED: our chat rendering / token ids differ from transformers' (or the check broke):" >&2
  cat "$OUT/prompt_check.json" >&2; tail -n 5 "$OUT/prompt_check.stderr" >&2
  exit 1
fi
echo "==> prompt rendering and ids, ours vs transformers: $(head -c 200 "$OUT/prompt_check.json")" >&2

# wait_idle, timed, busy_jiffies, cpu_busy, rss_mb, measure_quiet
. "$(dirname "$0")/lib.sh"

ours() { # run
  rm -rf "$OUT/ours_run" "$OUT/ours_$1.log"
  timed "ours_$1" "$BIN/grpo-train" --model "$MODEL" --prompts "$OUT/prompts.jsonl" --out "$OUT/ours_run" \
    --batch "$BATCH" --grad-accum 1 --num-generations "$GENS" --max-completion-length "$MAXLEN" \
    --max-prompt-len "$PROMPTLEN" --temperature 1 --top-p 1 --top-k 0 --beta "$BETA" --loss-type dapo \
    --num-iterations 1 --lr "$LR" --schedule linear --clip 1.0 --weight-decay 0 --rank 16 --alpha 32 \
    --target q_proj,v_proj --dropout 0 --reward 'regex:the' --eval-prompts 0 --save-every 1000000 \
    --steps "$STEPS" --seed "$SEED" --threads "$THREADS" --compute-dtype "$DTYPE" --log "$OUT/ours_$1.log" \
    > "$OUT/ours_$1.stdout" 2> "$OUT/ours_$1.stderr"
  echo "  run $1 grpo-train: rss $(rss_mb "$OUT/ours_$1.time") MB, others' CPU share $(cat "$OUT/ours_$1.others"); $(grep -m1 '^prompts' "$OUT/ours_$1.stderr")" >&2
}
trl() { # run
  timed "trl_$1" "$PY" bench/grpo_reference.py train --model "$MODEL" --prompts "$OUT/prompts.jsonl" \
    --threads "$THREADS" --batch "$BATCH" --num-generations "$GENS" --max-completion-length "$MAXLEN" \
    --steps "$STEPS" --beta "$BETA" --lr "$LR" --seed "$SEED" --out "$OUT/trl_$1.json" $([ "$DTYPE" = bf16 ] && echo --bf16) \
    > "$OUT/trl_$1.stdout" 2> "$OUT/trl_$1.stderr"
  echo "  run $1 TRL: rss $(rss_mb "$OUT/trl_$1.time") MB, others' CPU share $(cat "$OUT/trl_$1.others"); $(tail -n1 "$OUT/trl_$1.stdout" | head -c 120)" >&2
}
# With WAIT_FOR set, a run during which other processes took over 5 % of the CPUs is repeated
# (twice at most).
measure() { measure_quiet "$1_$2" "$@"; } # side run

for run in $(seq "$RUNS"); do
  measure ours "$run"
  measure trl "$run"
done

"$PY" - "$OUT" "$RUNS" "$SKIP" "$STEPS" "$((BATCH * GENS))" "$((SECONDS - start))" "$DTYPE" <<'PY'
import json, re, sys
out, runs, skip, steps, rows, script_s = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
dtype = sys.argv[7]

def time_v(path):
    t = open(path).read()
    el = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", t).group(1).split(":")
    return (int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", t).group(1)) / 1024,
            sum(float(x) * 60 ** i for i, x in enumerate(reversed(el))))

def others(name):
    return float(open(f"{out}/{name}.others").read())

def summary(m, comp, prompt, rs, us, wall):
    n = len(m)
    return {"completion_tokens_per_second": comp / wall, "wall_seconds_per_step": wall / n,
            "rollout_seconds_per_step": rs / n, "update_seconds_per_step": us / n,
            "rollout_tokens_per_second": comp / rs, "update_tokens_per_second": (comp + prompt) / us,
            "completion_tokens_measured": comp, "prompt_tokens_measured": prompt,
            "mean_completion_length": comp / (rows * n)}

def ours(run):
    recs = [json.loads(l) for l in open(f"{out}/ours_{run}.log")]
    st = [r for r in recs if "rollout_seconds" in r]
    assert len(st) == steps, f"grpo-train logged {len(st)} steps, expected {steps}"
    for r in st:  # 16 completions per step: their tokens, and the prompt tokens of the 16 rows
        r["completion_tokens"] = round(r["response_length"] * rows)
        r["prompt_tokens"] = round(r["update_tokens_per_second"] * r["update_seconds"]) - r["completion_tokens"]
    m = st[skip:]
    rs, us = sum(r["rollout_seconds"] for r in m), sum(r["update_seconds"] for r in m)
    res = summary(m, sum(r["completion_tokens"] for r in m), sum(r["prompt_tokens"] for r in m), rs, us, rs + us)
    rss, el = time_v(f"{out}/ours_{run}.time")
    prompts = re.search(r"^prompts: .*", open(f"{out}/ours_{run}.stderr").read(), re.M)
    res.update({"eos_fraction": 1 - sum(r["truncated_fraction"] for r in m) / len(m),
                "mean_reward": sum(r["reward"] for r in m) / len(m), "mean_kl": sum(r["kl"] for r in m) / len(m),
                "prompts_line": prompts.group(0) if prompts else None, "rss_mb": rss, "process_seconds": el,
                "others_cpu_share": others(f"ours_{run}"), "steps": st})
    return res

def trl(run):
    r = json.load(open(f"{out}/trl_{run}.json"))
    st = r["steps"]
    assert len(st) == steps, f"TRL ran {len(st)} steps, expected {steps}"
    m = st[skip:]
    rs, us = sum(s["rollout_seconds"] for s in m), sum(s["update_seconds"] for s in m)
    res = summary(m, sum(s["completion_tokens"] for s in m), sum(s["prompt_tokens"] for s in m), rs, us,
                  sum(s["wall_seconds"] for s in m))
    rss, el = time_v(f"{out}/trl_{run}.time")
    per = lambda k: sum(s[k] for s in m) / len(m)
    res.update({"rollout_plus_update_seconds_per_step": (rs + us) / len(m),
                "generate_seconds_per_step": per("generate_seconds"),
                "reference_seconds_per_step": per("reference_seconds"),
                "reward_seconds_per_step": per("reward_seconds"),
                "policy_forward_seconds_per_step": per("policy_forward_seconds"),
                "padded_update_tokens_measured": sum(s["rows"] * s["padded_width"] for s in m),
                "eos_fraction": per("eos_fraction"),
                "mean_reward": sum(s.get("logged", {}).get("reward", float("nan")) for s in m) / len(m),
                "mean_kl": sum(s.get("logged", {}).get("kl", float("nan")) for s in m) / len(m),
                "trainable_params": r["trainable_params"], "optimizer": r["optimizer"], "optim": r["optim"],
                "versions": {k: r[k] for k in ("trl", "transformers", "peft", "torch")},
                "rss_mb": rss, "process_seconds": el, "others_cpu_share": others(f"trl_{run}"), "steps": st})
    return res

stats = json.loads(open(f"{out}/prompts.stats").read())
check = json.loads(open(f"{out}/prompt_check.json").read())
o = [ours(r) for r in range(1, runs + 1)]
t = [trl(r) for r in range(1, runs + 1)]
expect = f"prompts: {stats['prompts']} from {stats['prompts']} records; 0 dropped"
same_pool = all(x["prompts_line"] and x["prompts_line"].startswith(expect) for x in o)
# Same prompts in the same order: the prompt tokens of every step (all steps) equal on both sides.
same_batches = all([s["prompt_tokens"] for s in x["steps"]] == [s["prompt_tokens"] for s in y["steps"]]
                   for x in o for y in t)
res = {"settings": {"steps": steps, "skip": skip, "runs": runs, "prompts_per_step": rows // 8, "num_generations": 8,
                    "max_completion_length": 64, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "beta": 0.04,
                    "loss_type": "dapo", "lr": 5e-6, "max_grad_norm": 1.0, "lora": "r16 alpha32 q_proj,v_proj"},
       "prompts": stats, "prompt_check": check, "same_prompt_pool": same_pool, "same_prompt_batches": same_batches,
       "script_seconds": script_s, "grpo_train": o, "trl": t}
json.dump(res, open(f"{out}/results.json", "w"), indent=1)

runs_of = lambda side, key, fmt: " / ".join(fmt.format(x[key]) for x in side)
best = lambda side, key, f=max: f(x[key] for x in side)

def row(label, key, fmt, f=max, ratio="speed"):
    bo, bt = best(o, key, f), best(t, key, f)
    listed = f" (runs {runs_of(o, key, fmt)} vs {runs_of(t, key, fmt)})" if runs > 1 else ""
    r = {"speed": f"{bo / bt:.2f}×", "time": f"{bt / bo:.2f}×", "ratio": f"{bo / bt:.2f}×", "none": "—"}[ratio]
    print(f"| {label}{listed} | {fmt.format(bo)} | {fmt.format(bt)} | {r} |")

print(f"GRPO, SmolLM2-135M-Instruct ({'f32' if dtype == 'f32' else 'bf16 compute, f32 weights'}), LoRA r16 α32 q,v, {rows // 8} prompts × 8 completions ≤ 64 tokens, β 0.04, "
      f"steps {skip + 1}..{steps} of {steps}" + (f", best of {runs}" if runs > 1 else "") + "\n")
print("| metric | grpo-train | TRL 1.16 GRPOTrainer | grpo-train vs TRL |")
print("|---|---|---|---|")
row("completion tokens/s (completion tokens / wall s)", "completion_tokens_per_second", "{:.1f}")
row("wall s/step", "wall_seconds_per_step", "{:.2f}", min, "time")
row("rollout s/step (generation + reference pass + rewards)", "rollout_seconds_per_step", "{:.2f}", min, "time")
row("update s/step (forward + backward + clip + AdamW)", "update_seconds_per_step", "{:.2f}", min, "time")
row("rollout tokens/s (completion tokens / rollout s)", "rollout_tokens_per_second", "{:.1f}")
row("update tokens/s (prompt + completion tokens / update s)", "update_tokens_per_second", "{:.1f}")
row("mean completion length (tokens, EOS included)", "mean_completion_length", "{:.1f}", max, "none")
row("peak RSS (MB)", "rss_mb", "{:.0f}", min, "ratio")
row("process wall time (load, all steps, save; s)", "process_seconds", "{:.1f}", min, "time")
x, y = o[0], t[0]
print(f"\nprompts: {stats['prompts']} of {stats['records']} records ({stats['dropped_long']} over 128 tokens), mean "
      f"{stats['mean_prompt_len']:.1f} tokens; rendering and ids equal to transformers' on {len(check['checked'])} "
      f"prompts: {'yes' if check['ok'] else 'NO'}; same prompt pool: {'yes' if same_pool else 'NO'}; same prompts "
      f"per step (prompt tokens of every step equal): {'yes' if same_batches else 'NO'}. "
      f"Run 1: completions ending in EOS {100 * x['eos_fraction']:.0f} % vs {100 * y['eos_fraction']:.0f} %, mean "
      f"reward {x['mean_reward']:.3f} vs {y['mean_reward']:.3f}; TRL's rollout {y['rollout_seconds_per_step']:.2f} s = "
      f"generate() {y['generate_seconds_per_step']:.2f} + reference pass {y['reference_seconds_per_step']:.2f} + rewards "
      f"{y['reward_seconds_per_step']:.3f} + rest; its update {y['update_seconds_per_step']:.2f} s includes the policy "
      f"forward {y['policy_forward_seconds_per_step']:.2f} s over {y['padded_update_tokens_measured']} padded tokens "
      f"({y['completion_tokens_measured'] + y['prompt_tokens_measured']} real); TRL optimizer {y['optim']}; "
      f"other processes' CPU share per run: grpo-train {', '.join(str(a['others_cpu_share']) for a in o)}, TRL "
      f"{', '.join(str(b['others_cpu_share']) for b in t)}; whole script {script_s} s.")
busy = [f"{side} run {i + 1} ({r['others_cpu_share']:.0%})" for side, rs in (("grpo-train", o), ("TRL", t))
        for i, r in enumerate(rs) if r["others_cpu_share"] > 0.05]
if busy:
    print(f"\nWARNING: other processes took over 5 % of the CPUs during {', '.join(busy)}: those numbers are not "
          f"a clean measurement; rerun with WAIT_FOR set on a quiet machine.")
if not (same_pool and same_batches and check["ok"]):
    print("\nWARNING: the two sides did not get the same prompts (see results.json)")
PY
