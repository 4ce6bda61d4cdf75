"""The reference side of bench/rm.sh: TRL's RewardTrainer (LoRA + score head, pairwise loss) on
CPU, with the settings rm-train gets, on the same pairs in the same batches.

  prepare  LLaMA-Factory preference file -> the subset both sides train on (same records, same
           format, so rm-train reads it unchanged); prints token statistics as one JSON line.
           --mode fit: pairs whose chosen and rejected both fit --max-len (TRL's own filter
           then drops nothing); --mode truncate: pairs whose completion starts within
           --max-len, to be truncated to --max-len (rm-train's default; TRL gets them
           pre-tokenized and cut the same way, since it would drop them).
  train    RewardTrainer on that file; prints one JSON line: steady-state tokens/s over the
           steps after --skip (unpadded chosen+rejected tokens, as rm-train counts them), the
           tokens of each step, and the padded tokens TRL actually computed on.

Batches: rm-train shuffles each epoch with its own generator (xoshiro256**, shared/core/src/
rng.rs; epoch_order in train/trainer.rs), reproduced here, and TRL reads the rows in that order
(train_sampling_strategy="sequential"), so both sides see the same pairs in the same batches.
The pair count is a multiple of the batch so that no batch straddles an epoch."""
import argparse, json, time

from bench_common import M64, ROLES, Rng, conversational, epoch_order, messages  # noqa: F401












def tokenize(tok, rec):
    """What TRL's tokenize_fn does with an explicit prompt: the chat template over prompt +
    completion; also the prompt's length up to the assistant header (where labels start)."""
    c = conversational(rec)
    ids = lambda m: tok.apply_chat_template(m, tokenize=True, return_dict=True)["input_ids"]
    p = tok.apply_chat_template(c["prompt"], tokenize=True, return_dict=True, add_generation_prompt=True)["input_ids"]
    return ids(c["prompt"] + c["chosen"]), ids(c["prompt"] + c["rejected"]), len(p)


p = argparse.ArgumentParser()
p.add_argument("task", choices=["prepare", "train"])
p.add_argument("--model", required=True)
p.add_argument("--data", required=True)
p.add_argument("--mode", choices=["fit", "truncate"], default="fit")
p.add_argument("--out", help="prepare: the subset file")
p.add_argument("--threads", type=int, default=2)
p.add_argument("--max-len", type=int, default=256)
p.add_argument("--batch", type=int, default=4)
p.add_argument("--steps", type=int, default=14)
p.add_argument("--skip", type=int, default=2, help="warm-up steps left out of tokens/s")
p.add_argument("--seed", type=int, default=42)
p.add_argument("--lr", type=float, default=1e-4)
a = p.parse_args()

import torch
from transformers import AutoTokenizer

torch.set_num_threads(a.threads)
tok = AutoTokenizer.from_pretrained(a.model)

if a.task == "prepare":
    recs = json.load(open(a.data, encoding="utf-8"))
    keep, lens = [], []
    for r in recs:
        c, j, plen = tokenize(tok, r)
        if a.mode == "fit":
            ok = len(c) <= a.max_len and len(j) <= a.max_len
        else:  # the completion must start well inside max-len, else rm-train drops the pair
            ok = plen + 8 <= a.max_len
        if ok:
            keep.append(r)
            lens.append((min(len(c), a.max_len), min(len(j), a.max_len), len(c) > a.max_len or len(j) > a.max_len))
    n = len(keep) - len(keep) % a.batch
    keep, lens = keep[:n], lens[:n]
    json.dump(keep, open(a.out, "w", encoding="utf-8"), ensure_ascii=False, indent=1)
    tokens = sum(c + j for c, j, _ in lens)
    print(json.dumps({"mode": a.mode, "records": len(recs), "pairs": n, "truncated": sum(t for *_, t in lens),
                      "tokens": tokens, "mean_seq_len": tokens / (2 * n) if n else 0,
                      "max_seq_len": max(max(c, j) for c, j, _ in lens)}))
    raise SystemExit

from datasets import Dataset
from peft import LoraConfig
from transformers import TrainerCallback
from trl import RewardConfig, RewardTrainer

recs = json.load(open(a.data, encoding="utf-8"))
n = len(recs)
assert n % a.batch == 0, "prepare keeps a multiple of --batch pairs"
per_epoch = n // a.batch
order = [i for e in range(-(-a.steps // per_epoch)) for i in epoch_order(n, a.seed, e)]
if a.mode == "fit":
    # TRL's own path: conversational records, tokenized and length-filtered by the trainer
    rows = [conversational(recs[i]) for i in order]
else:
    # pre-tokenized (TRL's processed-dataset path), cut like rm-train's truncation
    cache = {}
    rows = []
    for i in order:
        if i not in cache:
            c, j, _ = tokenize(tok, recs[i])
            cache[i] = {"chosen_ids": c[: a.max_len], "rejected_ids": j[: a.max_len]}
        rows.append(cache[i])
ds = Dataset.from_list(rows)

args = RewardConfig(
    output_dir="bench/out/rm_trl", use_cpu=True, bf16=False, fp16=False,
    gradient_checkpointing=False,  # TRL's default is True; rm-train recomputes nothing
    per_device_train_batch_size=a.batch, gradient_accumulation_steps=1, max_steps=a.steps,
    learning_rate=a.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
    max_length=a.max_len, train_sampling_strategy="sequential", dataloader_num_workers=0,
    logging_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True, seed=a.seed,
    model_init_kwargs={"dtype": torch.float32},
)
peft_config = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                         task_type="SEQ_CLS")


class Padded(RewardTrainer):
    padded = 0

    def compute_loss(self, model, inputs, *rest, **kw):
        Padded.padded += inputs["input_ids"].numel()
        return super().compute_loss(model, inputs, *rest, **kw)


class Clock(TrainerCallback):
    def __init__(self):
        self.t, self.tokens, self.padded = [], [], []

    def on_train_begin(self, *args, **kw):
        self.t0 = time.perf_counter()

    def on_step_end(self, *args, **kw):
        self.t.append(time.perf_counter())
        self.tokens.append(trainer._total_train_tokens)
        self.padded.append(Padded.padded)


clock = Clock()
trainer = Padded(model=a.model, args=args, train_dataset=ds, processing_class=tok, peft_config=peft_config,
                 callbacks=[clock])
assert len(trainer.train_dataset) == len(ds), "TRL dropped pairs: prepare should have filtered them"
trainable = sum(q.numel() for q in trainer.model.parameters() if q.requires_grad)
out = trainer.train()
k = a.skip
tps = (clock.tokens[-1] - clock.tokens[k - 1]) / (clock.t[-1] - clock.t[k - 1])
steps = [b - a_ for a_, b in zip([0] + clock.tokens, clock.tokens)]
padded = [b - a_ for a_, b in zip([0] + clock.padded, clock.padded)]
res = {
    "tokens_per_second": tps,
    "tokens_measured": clock.tokens[-1] - clock.tokens[k - 1],
    "padded_tokens_measured": clock.padded[-1] - clock.padded[k - 1],
    "seconds_measured": clock.t[-1] - clock.t[k - 1],
    "step_tokens": steps,
    "step_padded_tokens": padded,
    "trainable_params": trainable,
    "loss": out.training_loss,
    "steps": len(clock.t),
}
print(json.dumps(res))
