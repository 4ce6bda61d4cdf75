"""The reference side of bench/grpo.sh: TRL 1.16's GRPOTrainer on CPU, with the settings
grpo-train gets, on the same prompts in the same order.

  prepare        Alpaca file (JSON array of {instruction, input, output}) -> the prompt pool both
                 sides sample from: each record as one user message (instruction, plus "\\n\\n" +
                 input when there is one), those whose chat rendering (template + generation
                 prompt) is over --max-prompt-len tokens dropped. Writes {"prompt": [messages]}
                 JSONL (grpo-train reads it as is; TRL gets the same messages and applies the chat
                 template itself); prints statistics as one JSON line.
  check-prompts  the first --n prompts and the longest one, rendered by our tools and by
                 transformers: peft-generate --json's "prompt" (our chat template rendering, what
                 grpo-train feeds the model) must equal tokenizer.apply_chat_template(tokenize=
                 False) character for character, and its prompt_tokens, and peft-eval --per-token's
                 token ids of that text, must equal the ids TRL gets (the batched
                 apply_chat_template(tokenize=True) call of GRPOTrainer._tokenize_prompts). Prints
                 one JSON line; exits 1 on any difference.
  train          GRPOTrainer on those prompts; writes one JSON object to --out: per step the wall,
                 rollout and update seconds (and the parts of the rollout), the completion and
                 prompt tokens, the EOS fraction and TRL's logged metrics.

Settings (GRPOConfig): f32 on the CPU (use_cpu, bf16=False: GRPOConfig's bf16 default is True),
LoRA r 16, alpha 32, q_proj/v_proj, dropout 0 (peft_config: TRL wraps the model itself; the
reference is the policy with its adapter disabled, ref_model=None); per_device_train_batch_size
16 = 2 prompts x num_generations 8, gradient_accumulation_steps 1, steps_per_generation 1,
num_iterations 1 (so no old-policy log-prob pass, as grpo-train), max_completion_length 64,
temperature 1, top_p 1, top_k 0, generation stops at EOS <|im_end|> (asserted), beta 0.04,
loss_type dapo, epsilon 0.2, scale_rewards group, use_bias_correction_kl True (defaults),
disable_dropout True, activation checkpointing off (activation_checkpointing=False, the
transformers 5 name of gradient_checkpointing, whose GRPOConfig default is True; grpo-train
keeps activations), AdamW (TrainingArguments' default optim, adamw_torch_fused) lr 5e-6 with
linear decay over max_steps, max_grad_norm 1.0, weight decay 0, seed 42. Reward: one function,
1.0 when the decoded completion (skip_special_tokens, as TRL decodes) contains "the", else 0.0
(grpo-train: --reward 'regex:the' on its decoded completion). Prompt order: shuffle_dataset=False
on a dataset laid out in grpo-train's order (peftkit's epoch shuffle, bench_common.epoch_order,
seed 42), so both sides sample completions for the same 2 prompts at every step (bench/grpo.sh
checks the prompt tokens per step).

Instrumentation (a GRPOTrainer subclass whose overrides time and call the originals unchanged, and
a TrainerCallback; nothing of the algorithm is changed):
  training_step                  its start opens a step's work (the prompt batch is fetched
                                 before it, outside both phases);
  _generate_and_score_completions   the rollout phase: tokenization of the prompts, generate(),
                                 the reference pass with the adapter off, rewards, advantages;
                                 also the completion tokens (completion_mask: up to and including
                                 the first EOS, as grpo-train counts) and prompt tokens (prompt_mask);
  _generate_single_turn          generate() (left-padded batch of 16, KV cache), and the EOS
                                 fraction of its completions;
  _get_per_token_logps_and_entropies  inside the rollout: the reference pass; else the policy
                                 forward of the loss (its backward is not separable from outside);
  _calculate_rewards             the reward functions;
  on_step_end (callback)         the end of the step, after clip, optimizer.step, scheduler and
                                 zero_grad: update = step end - training_step start - rollout;
                                 wall = from the previous step's end (TRL's logging of the
                                 previous step and the dataloader included);
  on_log                         TRL logs a step's metrics right after its on_step_end."""
import argparse, json, math, os, subprocess, sys, tempfile, time

from bench_common import epoch_order

p = argparse.ArgumentParser()
p.add_argument("task", choices=["prepare", "check-prompts", "train"])
p.add_argument("--model", required=True)
p.add_argument("--data", help="prepare: the Alpaca JSON array")
p.add_argument("--prompts", help="check-prompts, train: the JSONL from prepare")
p.add_argument("--out", help="prepare: the JSONL for both sides; train: the result JSON")
p.add_argument("--bin", default="target/release", help="check-prompts: where peft-generate and peft-eval are")
p.add_argument("--n", type=int, default=3, help="check-prompts: how many prompts (plus the longest)")
p.add_argument("--threads", type=int, default=2)
p.add_argument("--max-prompt-len", type=int, default=128)
p.add_argument("--batch", type=int, default=2, help="prompts per step")
p.add_argument("--num-generations", type=int, default=8)
p.add_argument("--max-completion-length", type=int, default=64)
p.add_argument("--steps", type=int, default=4)
p.add_argument("--beta", type=float, default=0.04)
p.add_argument("--lr", type=float, default=5e-6)
p.add_argument("--seed", type=int, default=42)
p.add_argument("--bf16", action="store_true",
               help="train: bf16 mixed precision (GRPOConfig bf16=True: autocast, f32 weights)")
a = p.parse_args()

import torch
from transformers import AutoTokenizer

torch.set_num_threads(a.threads)
tok = AutoTokenizer.from_pretrained(a.model)


def user_message(rec):
    content = rec["instruction"] + ("\n\n" + rec["input"] if rec.get("input") else "")
    return [{"role": "user", "content": content}]


def trl_ids(prompts):
    """The ids GRPOTrainer._tokenize_prompts gets (one batched call, as TRL makes it)."""
    return tok.apply_chat_template(conversation=prompts, add_generation_prompt=True, tokenize=True,
                                   return_dict=True)["input_ids"]


if a.task == "prepare":
    recs = json.load(open(a.data, encoding="utf-8"))
    keep, dropped = [], 0
    for r in recs:
        msgs = user_message(r)
        n = len(trl_ids([msgs])[0])
        if n <= a.max_prompt_len:
            keep.append((msgs, n))
        else:
            dropped += 1
    with open(a.out, "w", encoding="utf-8") as f:
        for msgs, _ in keep:
            f.write(json.dumps({"prompt": msgs}, ensure_ascii=False) + "\n")
    lens = [n for _, n in keep]
    print(json.dumps({"records": len(recs), "prompts": len(keep), "max_prompt_len": a.max_prompt_len,
                      "dropped_long": dropped, "with_input": sum(1 for r in recs if r.get("input")),
                      "mean_prompt_len": sum(lens) / len(lens), "max_len_kept": max(lens),
                      "min_len_kept": min(lens)}))
    raise SystemExit

prompts = [json.loads(l)["prompt"] for l in open(a.prompts, encoding="utf-8") if l.strip()]

if a.task == "check-prompts":
    ids = trl_ids(prompts)
    longest = max(range(len(prompts)), key=lambda i: len(ids[i]))
    pick = sorted(set(list(range(min(a.n, len(prompts)))) + [longest]))
    with tempfile.TemporaryDirectory() as d:
        with open(f"{d}/gen.jsonl", "w") as f:
            for i in pick:
                f.write(json.dumps({"messages": prompts[i]}) + "\n")
        gen = subprocess.run([f"{a.bin}/peft-generate", "--model", a.model, "--prompts", f"{d}/gen.jsonl", "--json",
                              "--max-new-tokens", "1", "--threads", str(a.threads), "-q"],
                             capture_output=True, text=True, check=True).stdout
        ours = [json.loads(l) for l in gen.splitlines() if l.startswith("{")]
        with open(f"{d}/eval.jsonl", "w") as f:
            for o in ours:
                f.write(json.dumps({"text": o["prompt"]}) + "\n")
        ev = subprocess.run([f"{a.bin}/peft-eval", "--model", a.model, "--data", f"{d}/eval.jsonl", "--per-token",
                             "--json", "--threads", str(a.threads), "-q"], capture_output=True, text=True, check=True).stdout
        our_ids = [s["token_ids"] for s in json.loads(ev)["per_sample"]]
    rows = []
    for k, i in enumerate(pick):
        hf_text = tok.apply_chat_template(prompts[i], add_generation_prompt=True, tokenize=False)
        rows.append({"index": i, "tokens": len(ids[i]), "same_text": ours[k]["prompt"] == hf_text,
                     "same_count": ours[k]["prompt_tokens"] == len(ids[i]), "same_ids": our_ids[k] == list(ids[i]),
                     "same_as_text_tokenized": tok(hf_text, add_special_tokens=False)["input_ids"] == list(ids[i])})
    ok = len(ours) == len(pick) and all(all(v for k, v in r.items() if k.startswith("same")) for r in rows)
    print(json.dumps({"ok": ok, "checked": rows}))
    raise SystemExit(0 if ok else 1)

# ---- train ----
import trl
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

assert trl.__version__ == "1.16.0", trl.__version__
EOS = tok.convert_tokens_to_ids("<|im_end|>")
assert EOS == tok.eos_token_id, (EOS, tok.eos_token_id)

n = len(prompts)
need = a.steps * a.batch
order = [i for e in range(math.ceil(need / n)) for i in epoch_order(n, a.seed, e)][:need]
dataset = Dataset.from_list([{"prompt": prompts[i]} for i in order])
rollout_rows = a.batch * a.num_generations


class Clock(TrainerCallback):
    def __init__(self):
        self.steps, self.cur, self.in_rollout = [], None, False
        self.t_prev = None

    def on_train_begin(self, *args, **kw):
        self.t_prev = time.perf_counter()

    def on_step_end(self, *args, **kw):
        t = time.perf_counter()
        c = self.cur
        c["wall_seconds"] = t - self.t_prev
        c["update_seconds"] = t - c.pop("t_step") - c["rollout_seconds"]
        c["update_tokens"] = c["prompt_tokens"] + c["completion_tokens"]
        self.t_prev = t
        self.steps.append(c)
        self.cur = None

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and self.steps and "reward" in logs and "logged" not in self.steps[-1]:
            s = self.steps[-1]
            s["logged"] = {k: v for k, v in logs.items() if isinstance(v, (int, float))}


clock = Clock()


class TimedGRPOTrainer(GRPOTrainer):
    def training_step(self, model, inputs, num_items_in_batch):
        clock.cur = {"t_step": time.perf_counter(), "reference_seconds": 0.0, "policy_forward_seconds": 0.0}
        return super().training_step(model, inputs, num_items_in_batch)

    def _generate_and_score_completions(self, inputs):
        clock.in_rollout = True
        t = time.perf_counter()
        try:
            out = super()._generate_and_score_completions(inputs)
        finally:
            clock.in_rollout = False
        c = clock.cur
        c["rollout_seconds"] = time.perf_counter() - t
        c["rows"] = int(out["completion_mask"].shape[0])
        c["completion_tokens"] = int(out["completion_mask"].sum())
        c["prompt_tokens"] = int(out["prompt_mask"].sum())
        c["padded_width"] = int(out["prompt_ids"].shape[1] + out["completion_ids"].shape[1])
        return out

    def _generate_single_turn(self, *args, **kw):
        t = time.perf_counter()
        completion_ids, logprobs = super()._generate_single_turn(*args, **kw)
        c = clock.cur
        c["generate_seconds"] = time.perf_counter() - t
        c["eos_fraction"] = sum(1 for ids in completion_ids if ids and ids[-1] in self.eos_token_ids) / len(completion_ids)
        return completion_ids, logprobs

    def _get_per_token_logps_and_entropies(self, *args, **kw):
        t = time.perf_counter()
        r = super()._get_per_token_logps_and_entropies(*args, **kw)
        key = "reference_seconds" if clock.in_rollout else "policy_forward_seconds"
        clock.cur[key] += time.perf_counter() - t
        return r

    def _calculate_rewards(self, *args, **kw):
        t = time.perf_counter()
        r = super()._calculate_rewards(*args, **kw)
        clock.cur["reward_seconds"] = time.perf_counter() - t
        return r


def contains_the(completions, **kw):
    """1.0 when the decoded completion contains "the" (grpo-train: --reward 'regex:the')."""
    def text(c):
        if isinstance(c, list):  # conversational: [{"role": "assistant", "content": ...}]
            c = c[0]
        if isinstance(c, dict):
            c = c.get("content") or ""
        return c

    return [1.0 if "the" in text(c) else 0.0 for c in completions]


policy = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
peft_config = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                         task_type="CAUSAL_LM")
args = GRPOConfig(
    output_dir="bench/out/grpo/trl_run", use_cpu=True, bf16=a.bf16, fp16=False, activation_checkpointing=False,
    per_device_train_batch_size=rollout_rows, gradient_accumulation_steps=1, steps_per_generation=1,
    num_generations=a.num_generations, num_iterations=1, max_completion_length=a.max_completion_length,
    temperature=1.0, top_p=1.0, top_k=0, generation_kwargs={"eos_token_id": [EOS]},
    beta=a.beta, loss_type="dapo", disable_dropout=True, learning_rate=a.lr, lr_scheduler_type="linear",
    max_grad_norm=1.0, weight_decay=0.0, max_steps=a.steps, shuffle_dataset=False, seed=a.seed,
    report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, dataloader_num_workers=0,
)
trainer = TimedGRPOTrainer(model=policy, reward_funcs=contains_the, args=args, train_dataset=dataset,
                           processing_class=tok, peft_config=peft_config, callbacks=[clock])
assert trainer.eos_token_ids == [EOS], trainer.eos_token_ids
assert trainer.generation_config.eos_token_id in (EOS, [EOS]), trainer.generation_config.eos_token_id
assert trainer.ref_model is None and trainer.beta == a.beta
assert trainer.args.use_bias_correction_kl and not trainer.args.activation_checkpointing
assert not trainer.args.gradient_checkpointing and trainer.args.disable_dropout
trainable = sum(q.numel() for q in trainer.model.parameters() if q.requires_grad)
t0 = time.perf_counter()
trainer.train()
train_seconds = time.perf_counter() - t0
res = {"trl": trl.__version__, "transformers": __import__("transformers").__version__,
       "peft": __import__("peft").__version__, "torch": torch.__version__, "steps": clock.steps,
       "trainable_params": trainable, "optimizer": type(trainer.optimizer.optimizer
                                                        if hasattr(trainer.optimizer, "optimizer")
                                                        else trainer.optimizer).__name__,
       "optim": str(trainer.args.optim), "dtype": str(next(trainer.model.parameters()).dtype),
       "train_seconds": train_seconds, "prompt_order": order}
json.dump(res, open(a.out, "w"), indent=1)
print(json.dumps({k: v for k, v in res.items() if k not in ("steps", "prompt_order")}))
