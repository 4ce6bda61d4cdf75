"""The reference side of bench/dpo.sh: TRL's DPOTrainer (LoRA, sigmoid loss, reference log-probs
precomputed once before training) on CPU, with the settings dpo-train gets, on the same pairs in
the same batches. The pair files come from bench/rm_reference.py prepare.

  train  DPOTrainer on a pair file; prints one JSON line: steady-state tokens/s over the steps
         after --skip (unpadded chosen+rejected tokens, as dpo-train counts them), the tokens of
         each step (and the padded tokens TRL computed on), the reference pass's seconds, and
         per step the loss, mean implicit rewards β(π − ρ) of chosen and rejected, and the reward
         accuracy (dpo-train's log columns).

What both sides do: the policy is the base + LoRA (B = 0 at the start, so step 1's loss is
log 2); the reference is the base with the adapter off, its log-probs summed over the completion
tokens computed once for every pair before training, in batches of --batch pairs
(dpo-train: always; TRL: precompute_ref_log_probs=True, precompute_ref_batch_size unset, so it
uses the train batch). The reference pass is outside the tokens/s window on both sides (TRL runs
it in DPOTrainer.__init__, dpo-train before its step clock starts) and reported on its own.

Batches: dpo-train shuffles each epoch with its own generator (xoshiro256**, shared/core/src/
rng.rs; epoch_order in train/trainer.rs), reproduced here; TRL gets the unique pairs once (so its
reference pass covers the same pairs as dpo-train's, once each) and a sampler that yields them in
dpo-train's order, epoch after epoch. The pair count is a multiple of the batch so that no batch
straddles an epoch.

--init DIR: start TRL's LoRA from dpo-train's initial adapter (a PEFT adapter folder written by
a `dpo-train --lr 0 --steps 1` run with the same seed: lora_A as dpo-train draws it, lora_B = 0)
instead of PEFT's own random lora_A, so that both sides follow the same trajectory and their
per-step losses can be compared (they differ only by float rounding). It changes no work done."""
import argparse, json, time

from bench_common import M64, ROLES, Rng, conversational, epoch_order, messages












p = argparse.ArgumentParser()
p.add_argument("task", choices=["train"])
p.add_argument("--model", required=True)
p.add_argument("--data", required=True, help="a pair file from bench/rm_reference.py prepare")
p.add_argument("--threads", type=int, default=2)
p.add_argument("--max-len", type=int, default=256)
p.add_argument("--batch", type=int, default=2, help="pairs per step")
p.add_argument("--steps", type=int, default=24)
p.add_argument("--skip", type=int, default=2, help="warm-up steps left out of tokens/s")
p.add_argument("--seed", type=int, default=42)
p.add_argument("--lr", type=float, default=5e-5)
p.add_argument("--beta", type=float, default=0.1)
p.add_argument("--init", help="dpo-train's initial adapter folder (see above)")
a = p.parse_args()

import os

os.environ["TQDM_DISABLE"] = "1"  # the reference pass's progress bar
import torch

torch.set_num_threads(a.threads)

import datasets
from datasets import Dataset
from peft import LoraConfig, set_peft_model_state_dict
from safetensors.torch import load_file
from torch.utils.data import Sampler
from transformers import AutoTokenizer, TrainerCallback
from trl import DPOConfig, DPOTrainer

datasets.disable_progress_bars()
tok = AutoTokenizer.from_pretrained(a.model)
recs = json.load(open(a.data, encoding="utf-8"))
n = len(recs)
assert n % a.batch == 0, "prepare keeps a multiple of --batch pairs"
per_epoch = n // a.batch
order = [i for e in range(-(-a.steps // per_epoch)) for i in epoch_order(n, a.seed, e)]
ds = Dataset.from_list([conversational(r) for r in recs])


class Order(Sampler):
    """dpo-train's pair order over as many epochs as the steps need."""

    def __iter__(self):
        return iter(order)

    def __len__(self):
        return len(order)


args = DPOConfig(
    output_dir="bench/out/dpo_trl", use_cpu=True, bf16=False, fp16=False,
    gradient_checkpointing=False,  # TRL's default is True; dpo-train recomputes nothing
    per_device_train_batch_size=a.batch, gradient_accumulation_steps=1, max_steps=a.steps,
    learning_rate=a.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
    max_length=a.max_len, truncation_mode="keep_start", loss_type=["sigmoid"], beta=a.beta,
    precompute_ref_log_probs=True, dataloader_num_workers=0,
    logging_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True, seed=a.seed,
    model_init_kwargs={"dtype": torch.float32},
)
peft_config = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                         task_type="CAUSAL_LM")


class Timed(DPOTrainer):
    padded = 0
    ref_seconds = 0.0  # the whole precompute (forwards, then TRL's caching of the column)
    ref_forward_seconds = 0.0  # the reference forwards alone
    ref_batches = 0
    step_log = []  # per step: loss, rewards, accuracy (TRL's final log clears its _metrics)

    def _precompute_ref_logps(self, *args, **kw):
        t0 = time.perf_counter()
        try:
            return super()._precompute_ref_logps(*args, **kw)
        finally:
            Timed.ref_seconds += time.perf_counter() - t0

    def compute_ref_log_probs(self, *args, **kw):
        t0 = time.perf_counter()
        try:
            return super().compute_ref_log_probs(*args, **kw)
        finally:
            Timed.ref_forward_seconds += time.perf_counter() - t0
            Timed.ref_batches += 1

    def _get_train_sampler(self, train_dataset=None):
        return Order()

    def compute_loss(self, model, inputs, *rest, **kw):
        Timed.padded += inputs["input_ids"].numel()
        loss = super().compute_loss(model, inputs, *rest, **kw)
        m = self._metrics["train"]
        Timed.step_log.append({"step": len(Timed.step_log) + 1, "loss": (loss[0] if isinstance(loss, tuple) else loss).item(),
                          "rewards_chosen": m["rewards/chosen"][-1], "rewards_rejected": m["rewards/rejected"][-1],
                          "accuracy": m["rewards/accuracies"][-1]})
        return loss


class Clock(TrainerCallback):
    def __init__(self):
        self.t, self.tokens, self.padded = [], [], []

    def on_train_begin(self, *args, **kw):
        self.t0 = time.perf_counter()

    def on_step_end(self, *args, **kw):
        self.t.append(time.perf_counter())
        self.tokens.append(trainer._total_train_tokens)
        self.padded.append(Timed.padded)


clock = Clock()
t_init = time.perf_counter()
trainer = Timed(model=a.model, args=args, train_dataset=ds, processing_class=tok, peft_config=peft_config,
                callbacks=[clock])
init_seconds = time.perf_counter() - t_init
assert len(trainer.train_dataset) == n, "TRL dropped pairs: prepare should have filtered them"
assert Timed.ref_batches == per_epoch, f"reference pass ran {Timed.ref_batches} batches, not {per_epoch}"
if a.init:
    sd = load_file(f"{a.init}/adapter_model.safetensors")
    res = set_peft_model_state_dict(trainer.model, sd)
    assert not res.unexpected_keys, f"adapter keys not in the model: {res.unexpected_keys[:4]}"
    lora = {k for k, _ in trainer.model.named_parameters() if "lora_" in k}
    assert len(sd) == len(lora), f"{len(sd)} tensors in {a.init}, {len(lora)} LoRA tensors in the model"
trainable = sum(q.numel() for q in trainer.model.parameters() if q.requires_grad)
out = trainer.train()

assert len(Timed.step_log) == len(clock.t) == a.steps
k = a.skip
t_k, tok_k, pad_k = (clock.t[k - 1], clock.tokens[k - 1], clock.padded[k - 1]) if k else (clock.t0, 0, 0)
tps = (clock.tokens[-1] - tok_k) / (clock.t[-1] - t_k)
steps = [b - a_ for a_, b in zip([0] + clock.tokens, clock.tokens)]
padded = [b - a_ for a_, b in zip([0] + clock.padded, clock.padded)]
res = {
    "tokens_per_second": tps,
    "tokens_measured": clock.tokens[-1] - tok_k,
    "padded_tokens_measured": clock.padded[-1] - pad_k,
    "seconds_measured": clock.t[-1] - t_k,
    "reference_seconds": Timed.ref_seconds,
    "reference_forward_seconds": Timed.ref_forward_seconds,
    "init_seconds": init_seconds,
    "step_tokens": steps,
    "step_padded_tokens": padded,
    "trainable_params": trainable,
    "shared_init": bool(a.init),
    "log": Timed.step_log,
    "loss": out.training_loss,
    "steps": len(clock.t),
}
print(json.dumps(res))
