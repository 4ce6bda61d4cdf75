"""The reference side of bench/ppo.sh: TRL's PPOTrainer (the "PPOv2" generation,
trl/experimental/ppo in TRL 1.0.0) on CPU, with the settings ppo-train gets, on the same prompts
in the same batches.

  prepare   LLaMA-Factory preference file -> the prompts both sides sample from: each record's
            conversation up to its last user turn, rendered with the chat template and the
            generation prompt (what ppo-train does with {"prompt": [messages]}); prompts over
            --max-prompt-len tokens dropped (as ppo-train does), the rest cut to a multiple of
            --batch (so that no rollout batch straddles an epoch). Writes the JSONL for ppo-train
            and the token ids for TRL; prints statistics as one JSON line.
  check-rm  the reward model as transformers + PEFT load it (AutoModelForSequenceClassification,
            num_labels 1, + the adapter, merged) against our rm-score on a few texts; prints one
            JSON line and exits 1 if a score differs by more than --tol.
  train     PPOTrainer on those prompts; writes one JSON object to --out: per step the rollout
            and update seconds, the tokens each phase handled, the wall time of the step.

TRL version: TRL 1.16 (the venv's) no longer ships PPO; 1.0.0 has it under trl/experimental/ppo.
bench/ppo.sh unpacks the 1.0.0 wheel into --trl-dir (default ~/.cache/peftkit/trl-1.0.0) and this
script imports trl from there (first on sys.path), leaving the venv's TRL untouched. TRL 1.0.0
runs unpatched on transformers 5.24 / peft 0.21.2 / accelerate 1.15 / torch 2.15; the only
changes made here at runtime are instrumentation and the data order, none to the algorithm:

  1. Timing hooks (wrappers that call the originals unchanged), in trl.experimental.ppo.ppo_trainer:
     - unwrap_model_for_generation: entering it starts the rollout phase of a step (right after
       the prompt batch is fetched; generation, the reference / value / reward forward passes,
       rewards and GAE follow);
     - batch_generation: its duration (the generation part of the rollout), and the response
       tokens sampled (up to and including the first EOS, as ppo-train counts them);
     - np (a proxy of numpy whose random.permutation is the original plus a clock): the first
       permutation of a step starts the update phase (the PPO epochs loop);
     - empty_cache: the call after each mini-batch of the PPO epochs loop; the
       (num_ppo_epochs x num_mini_batches)-th one after the update started ends it;
     - on_step_end (a TrainerCallback): the end of the step (wall time per step).
  2. The prompt order: TRL's own DataLoader shuffles with torch's generator; it is replaced by
     one (same batch size, same collator, drop_last) that reads the prompts in ppo-train's order
     (peftkit's xoshiro256** epoch shuffle, reproduced below), so both sides sample responses
     for the same prompts at every step.
  3. The tokenizer gets a dedicated pad token "[PAD]" (TRL's own PPO example script does this).
     SmolLM2's pad is its EOS <|im_end|>, which also occurs inside every chat prompt; TRL masks
     pad ids out of queries and responses, so with pad = EOS it would blank the prompts' turn
     ends. TRL never feeds the pad id to a model (masked_fill to 0 first), so the embedding is
     not resized. Consequence: TRL's reward model reads the score at the response's EOS token,
     ppo-train (pad = EOS, transformers' rule) at the token before a trailing EOS; this changes
     the scores, not the work done.

Models (transformers + PEFT, f32): policy = AutoModelForCausalLM + LoraConfig(r 16, alpha 32,
q_proj/v_proj, dropout 0) which PPOTrainer wraps itself (peft_config), reference = the policy
with its adapter disabled (ref_model=None, TRL's PEFT path); reward = AutoModelForSequence-
Classification(num_labels 1) + the rm-train adapter, merged; value = AutoModelForSequence-
Classification(num_labels 1) on the base, trained in full (TRL's design: a second 135M model
with its own AdamW state; ppo-train instead puts a value head on the policy's backbone)."""
import argparse, contextlib, json, math, os, sys, time

from bench_common import M64, ROLES, Rng, epoch_order








def prompt_messages(rec):
    """A LLaMA-Factory record's conversation up to its last non-assistant turn."""
    msgs = [{"role": ROLES[m["from"]], "content": m["value"]} for m in rec["conversations"]]
    while msgs and msgs[-1]["role"] == "assistant":
        msgs.pop()
    return msgs


p = argparse.ArgumentParser()
p.add_argument("task", choices=["prepare", "check-rm", "train"])
p.add_argument("--model", required=True)
p.add_argument("--data", help="prepare, check-rm: LLaMA-Factory file; train: the prompt ids from prepare")
p.add_argument("--out", help="prepare: the ppo-train prompt JSONL; train: the result JSON")
p.add_argument("--ids", help="prepare: where the token ids for TRL go")
p.add_argument("--reward-model", help="check-rm, train: the rm-train SEQ_CLS LoRA adapter")
p.add_argument("--rm-score", help="check-rm: our rm-score binary")
p.add_argument("--tol", type=float, default=1e-3)
p.add_argument("--trl-dir", default=os.path.expanduser("~/.cache/peftkit/trl-1.0.0"))
p.add_argument("--threads", type=int, default=2)
p.add_argument("--max-prompt-len", type=int, default=256)
p.add_argument("--batch", type=int, default=8)
p.add_argument("--steps", type=int, default=8)
p.add_argument("--response-length", type=int, default=48)
p.add_argument("--ppo-epochs", type=int, default=4)
p.add_argument("--mini-batches", type=int, default=1)
p.add_argument("--temperature", type=float, default=0.7)
p.add_argument("--kl-coef", type=float, default=0.05)
p.add_argument("--lr", type=float, default=1e-4)
p.add_argument("--seed", type=int, default=42)
a = p.parse_args()

import torch
from transformers import AutoTokenizer

torch.set_num_threads(a.threads)
tok = AutoTokenizer.from_pretrained(a.model)

if a.task == "prepare":
    recs = json.load(open(a.data, encoding="utf-8"))
    keep, dropped = [], 0
    for r in recs:
        msgs = prompt_messages(r)
        ids = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, add_generation_prompt=True)["input_ids"]
        if len(ids) <= a.max_prompt_len:
            keep.append((msgs, list(ids)))
        else:
            dropped += 1
    n = len(keep) - len(keep) % a.batch
    keep = keep[:n]
    with open(a.out, "w", encoding="utf-8") as f:
        for msgs, _ in keep:
            f.write(json.dumps({"prompt": msgs}, ensure_ascii=False) + "\n")
    json.dump([ids for _, ids in keep], open(a.ids, "w"))
    lens = [len(ids) for _, ids in keep]
    print(json.dumps({"records": len(recs), "prompts": n, "max_prompt_len": a.max_prompt_len,
                      "dropped_long": dropped, "cut_to_batch_multiple": len(recs) - dropped - n,
                      "mean_prompt_len": sum(lens) / n, "max_len_kept": max(lens), "min_len_kept": min(lens)}))
    raise SystemExit

from peft import PeftModel
from transformers import AutoModelForSequenceClassification


def reward_model():
    m = AutoModelForSequenceClassification.from_pretrained(a.model, num_labels=1, dtype=torch.float32)
    return PeftModel.from_pretrained(m, a.reward_model).merge_and_unload().eval()


if a.task == "check-rm":
    import subprocess, tempfile

    recs = json.load(open(a.data, encoding="utf-8")) if a.data else []
    texts = ["The quick brown fox jumps over the lazy dog. It was a sunny day in the park.",
             "Water boils at 100 degrees Celsius at sea level, and freezes at 0 degrees."]
    if recs:  # a chat rendering like those PPO scores: prompt + a response
        r = recs[0]
        texts.append(tok.apply_chat_template(prompt_messages(r) + [{"role": "assistant", "content": r["chosen"]["value"][:400]}],
                                             tokenize=False))
    rm = reward_model()
    with torch.no_grad():
        hf = [rm(input_ids=torch.tensor([tok(t)["input_ids"]])).logits[0, 0].item() for t in texts]
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    out = subprocess.run([a.rm_score, "--model", a.model, "--adapter", a.reward_model, "--data", f.name, "--json",
                          "--threads", str(a.threads)], capture_output=True, text=True, check=True).stdout
    os.unlink(f.name)
    ours = [json.loads(l)["score"] for l in out.splitlines() if l.strip().startswith("{")]
    diff = max(abs(x - y) for x, y in zip(hf, ours)) if len(ours) == len(hf) else float("inf")
    ok = diff <= a.tol
    print(json.dumps({"texts": len(texts), "transformers": hf, "rm_score": ours, "max_abs_diff": diff, "ok": ok}))
    raise SystemExit(0 if ok else 1)

# ---- train ----
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
sys.path.insert(0, a.trl_dir)
for k in [k for k in sys.modules if k == "trl" or k.startswith("trl.")]:
    del sys.modules[k]
import trl

assert trl.__version__ == "1.0.0" and trl.__file__.startswith(a.trl_dir), (trl.__version__, trl.__file__)
import numpy as np
import trl.experimental.ppo.ppo_trainer as pt
from peft import LoraConfig
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, DataCollatorWithPadding, TrainerCallback
from datasets import Dataset
from trl.experimental.ppo import PPOConfig, PPOTrainer

tok = AutoTokenizer.from_pretrained(a.model, padding_side="left")
tok.add_special_tokens({"pad_token": "[PAD]"})  # see the header, item 3
PAD, EOS = tok.pad_token_id, tok.eos_token_id
assert PAD != EOS

prompts = json.load(open(a.data))
n = len(prompts)
assert n % a.batch == 0, "prepare keeps a multiple of --batch prompts"
epochs = math.ceil(a.steps * a.batch / n)
order = [i for e in range(epochs) for i in epoch_order(n, a.seed, e)]
rows = [{"input_ids": prompts[i]} for i in order]


class Clock(TrainerCallback):
    """Per-step marks; see the header, item 1."""

    def __init__(self, k):
        self.k = k  # empty_cache calls in one step's PPO epochs loop
        self.steps, self.cur = [], None
        self.train_start = None

    def on_train_begin(self, *args, **kw):
        self.train_start = time.perf_counter()

    def rollout_start(self):
        self.cur = {"t_rollout": time.perf_counter(), "t_update": None, "t_update_end": None, "caches": 0}

    def update_start(self):
        if self.cur is not None and self.cur["t_update"] is None:
            self.cur["t_update"] = time.perf_counter()

    def cache(self):
        c = self.cur
        if c is not None and c["t_update"] is not None and c["t_update_end"] is None:
            c["caches"] += 1
            if c["caches"] == self.k:
                c["t_update_end"] = time.perf_counter()

    def on_step_end(self, *args, **kw):
        t = time.perf_counter()
        c = self.cur
        prev = self.steps[-1]["t_end"] if self.steps else self.train_start
        s = {"t_end": t, "wall_seconds": t - prev,
             "rollout_seconds": c["t_update"] - c["t_rollout"],
             "update_seconds": c["t_update_end"] - c["t_update"],
             "generate_seconds": c["generate_seconds"],
             "response_tokens": c["response_tokens"], "query_tokens": c["query_tokens"],
             "generated_width": c["generated_width"], "padded_width": c["padded_width"],
             "eos_fraction": c["eos_fraction"], "score_mean": c.get("score_mean"), "kl": c.get("kl")}
        s["update_tokens"] = a.ppo_epochs * (c["query_tokens"] + c["response_tokens"])
        s["update_padded_tokens"] = a.ppo_epochs * c["rows"] * c["padded_width"]
        s["rollout_tokens_per_second"] = s["response_tokens"] / s["rollout_seconds"]
        s["update_tokens_per_second"] = s["update_tokens"] / s["update_seconds"]
        self.steps.append(s)
        self.cur = None

    def on_log(self, args, state, control, logs=None, **kw):
        # TRL logs a step's metrics just before its on_step_end
        if logs and self.cur is not None:
            self.cur["score_mean"] = logs.get("objective/scores")
            self.cur["kl"] = logs.get("objective/kl")


clock = Clock(a.ppo_epochs * a.mini_batches)

_unwrap = pt.unwrap_model_for_generation


@contextlib.contextmanager
def unwrap_model_for_generation(*args, **kw):
    clock.rollout_start()
    with _unwrap(*args, **kw) as m:
        yield m


_batch_generation = pt.batch_generation


def batch_generation(model, queries, *args, **kw):
    t = time.perf_counter()
    query_responses, logitss = _batch_generation(model, queries, *args, **kw)
    c = clock.cur
    c["generate_seconds"] = time.perf_counter() - t
    resp = query_responses[:, queries.shape[1]:]
    is_eos = resp == EOS
    has = is_eos.any(1)
    first = torch.where(has, is_eos.int().argmax(1) + 1, torch.full_like(has, resp.shape[1], dtype=torch.long))
    c["response_tokens"] = int(first.sum())
    c["query_tokens"] = int((queries != PAD).sum())
    c["rows"] = queries.shape[0]
    c["generated_width"] = resp.shape[1]
    c["padded_width"] = query_responses.shape[1]
    c["eos_fraction"] = float(has.float().mean())
    return query_responses, logitss


class _Random:
    def __getattr__(self, name):
        return getattr(np.random, name)

    @staticmethod
    def permutation(*args, **kw):
        clock.update_start()
        return np.random.permutation(*args, **kw)


class _Np:
    random = _Random()

    def __getattr__(self, name):
        return getattr(np, name)


_empty_cache = pt.empty_cache


def empty_cache():
    clock.cache()
    _empty_cache()


pt.unwrap_model_for_generation = unwrap_model_for_generation
pt.batch_generation = batch_generation
pt.np = _Np()
pt.empty_cache = empty_cache

policy = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
value = AutoModelForSequenceClassification.from_pretrained(a.model, num_labels=1, dtype=torch.float32)
rm = reward_model()
peft_config = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                         task_type="CAUSAL_LM")
args = PPOConfig(
    output_dir="bench/out/ppo/trl_run", use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
    per_device_train_batch_size=a.batch, gradient_accumulation_steps=1, num_mini_batches=a.mini_batches,
    num_ppo_epochs=a.ppo_epochs, response_length=a.response_length, temperature=a.temperature,
    learning_rate=a.lr, kl_coef=a.kl_coef, kl_estimator="k1", stop_token="eos", missing_eos_penalty=None,
    local_rollout_forward_batch_size=a.batch, total_episodes=a.batch * a.steps, num_sample_generations=0,
    report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, seed=a.seed,
    dataloader_num_workers=0,
)
trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=None, reward_model=rm,
                     train_dataset=Dataset.from_list(rows[:n]), value_model=value, peft_config=peft_config,
                     callbacks=[clock])
# see the header, item 2: the prompts in ppo-train's order
trainer.dataloader = DataLoader(rows, batch_size=a.batch, shuffle=False, collate_fn=DataCollatorWithPadding(tok),
                                drop_last=True)
trainable = {"policy": sum(q.numel() for q in trainer.model.policy.parameters() if q.requires_grad),
             "value": sum(q.numel() for q in trainer.model.value_model.parameters() if q.requires_grad)}
t0 = time.perf_counter()
trainer.train()
res = {"trl": trl.__version__, "steps": clock.steps, "trainable_params": trainable,
       "train_seconds": time.perf_counter() - t0, "prompt_batches": [order[i * a.batch:(i + 1) * a.batch] for i in range(a.steps)]}
json.dump(res, open(a.out, "w"), indent=1)
print(json.dumps({k: v for k, v in res.items() if k != "prompt_batches"})[:400])
