"""HF PEFT reference for the GPU benchmark: LoRA on a bf16 base, or QLoRA (bitsandbytes NF4 +
double quantization, bf16 compute), trained with AdamW on random token ids. Prints one JSON line.

    python hf_reference.py --model DIR --method lora|qlora [--batch 4] [--seq 1024] [--steps 8]
        [--warmup 2] [--rank 16] [--targets q_proj,v_proj|all-linear]
        [--grad-checkpointing | --no-grad-checkpointing] [--json OUT.json]

Recipes (PEFT's defaults, on purpose):
  lora   base weights bf16; get_peft_model's autocast_adapter_dtype=True keeps the LoRA A/B
         weights (and so their grads and AdamW state) in f32; no torch.autocast.
  qlora  BitsAndBytesConfig(nf4, double quant, compute bf16), then
         peft.prepare_model_for_kbit_training, which casts every remaining bf16 parameter
         (embeddings/tied lm_head, RMSNorms) to f32 and turns gradient checkpointing on,
         then LoRA as above.
Gradient checkpointing: off by default for lora, on for qlora (PEFT's default); either flag
overrides. When on, it is non-reentrant (use_reentrant=False) for both methods.
Timing: `--warmup` untimed steps, then `--steps` timed steps, each bracketed by
torch.cuda.synchronize(). Memory: "load_peak_*" is the peak up to the start of training
(model load, quantization, PEFT wrapping); then the peak counters are reset and
"train_peak_*" is the peak over warm-up + timed steps. Both include the resident model.
"""
import argparse, json, os, platform, resource, sys, time

import torch


def versions():
    v = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for mod in ("transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            v[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001 - report, don't fail
            v[mod] = None if isinstance(e, ImportError) else f"import error: {e!r}"[:200]
    return v


def mib(n):
    return round(n / 2**20, 1)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--method", required=True, choices=["lora", "qlora"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=8, help="timed steps (after warm-up)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=None, help="lora_alpha; default 2*rank")
    p.add_argument("--targets", default="q_proj,v_proj", help="comma list of module names, or all-linear")
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="default: off for lora, on for qlora")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--json", help="also write the result here")
    a = p.parse_args()
    if a.steps < 1 or a.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")

    dev = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = dev.type == "cuda"
    if cuda and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    gc_on = a.grad_checkpointing if a.grad_checkpointing is not None else (a.method == "qlora")
    gc_kwargs = {"use_reentrant": False}
    res = {"method": a.method, "model": os.path.abspath(a.model), "device": str(dev),
           "gpu": torch.cuda.get_device_name(dev) if cuda else None, "batch": a.batch, "seq": a.seq,
           "warmup": a.warmup, "steps": a.steps, "rank": a.rank, "targets": a.targets,
           "grad_checkpointing": gc_on, "lr": a.lr, "seed": a.seed, "versions": versions()}

    def emit(code=0):
        if not cuda:
            res["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        line = json.dumps(res)
        print(line, flush=True)
        if a.json:
            with open(a.json, "w") as f:
                f.write(line + "\n")
        sys.exit(code)

    import transformers
    from transformers import AutoModelForCausalLM
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    torch.manual_seed(a.seed)
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    t_load = time.perf_counter()
    if a.method == "qlora":
        if res["versions"]["bitsandbytes"] is None or str(res["versions"]["bitsandbytes"]).startswith("import error"):
            res["error"] = f"qlora needs bitsandbytes (got {res['versions']['bitsandbytes']})"
            emit(2)
        if res["versions"]["accelerate"] is None:
            res["error"] = "qlora needs accelerate (transformers' bitsandbytes loader requires it)"
            emit(2)
        from transformers import BitsAndBytesConfig
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.bfloat16)
        dm = {"": dev.index} if cuda else "cpu"
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16, quantization_config=bnb,
                                                     device_map=dm)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc_on,
                                                gradient_checkpointing_kwargs=gc_kwargs)
        n4 = sum(1 for m in model.modules() if type(m).__name__ == "Linear4bit")
        if n4 == 0:
            res["error"] = "qlora: no bitsandbytes Linear4bit modules after loading"
            emit(2)
        res["linear4bit_modules"] = n4
    else:
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16).to(dev)
        for prm in model.parameters():
            prm.requires_grad_(False)
        if gc_on:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
    model.config.use_cache = False
    targets = "all-linear" if a.targets == "all-linear" else [t.strip() for t in a.targets.split(",") if t.strip()]
    lcfg = LoraConfig(r=a.rank, lora_alpha=a.alpha if a.alpha is not None else 2 * a.rank, lora_dropout=0.0,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lcfg)  # autocast_adapter_dtype=True (default): LoRA weights in f32
    model.train()
    trainable = [q for q in model.parameters() if q.requires_grad]
    res["trainable_params"] = sum(q.numel() for q in trainable)
    res["total_params"] = sum(q.numel() for q in model.parameters())
    res["lora_param_dtypes"] = sorted({str(q.dtype) for q in trainable})
    res["param_dtypes"] = {str(k): n for k, n in _dtype_hist(model).items()}
    res["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    base = model.get_base_model()
    gc_attr = "is_activation_checkpointing" if hasattr(type(base), "is_activation_checkpointing") \
        else "is_gradient_checkpointing"  # renamed in transformers 5.2x; old name warns there
    res["gc_active"] = bool(getattr(base, gc_attr, False))
    vocab = model.config.get_text_config().vocab_size if hasattr(model.config, "get_text_config") \
        else model.config.vocab_size
    opt = torch.optim.AdamW(trainable, lr=a.lr)
    if cuda:
        torch.cuda.synchronize(dev)
        res["load_s"] = round(time.perf_counter() - t_load, 2)
        res["model_allocated_mib"] = mib(torch.cuda.memory_allocated(dev))
        res["load_peak_allocated_mib"] = mib(torch.cuda.max_memory_allocated(dev))
        res["load_peak_reserved_mib"] = mib(torch.cuda.max_memory_reserved(dev))
        torch.cuda.reset_peak_memory_stats(dev)
    else:
        res["load_s"] = round(time.perf_counter() - t_load, 2)

    g = torch.Generator().manual_seed(a.seed)
    n_total = a.warmup + a.steps
    data = torch.randint(0, vocab, (n_total, a.batch, a.seq), generator=g).to(dev)

    def sync():
        if cuda:
            torch.cuda.synchronize(dev)

    losses, times = [], []
    try:
        for step in range(n_total):
            ids = data[step]
            sync()
            t = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            times.append(time.perf_counter() - t)
            losses.append(loss.detach())
    except torch.cuda.OutOfMemoryError as e:
        res["error"] = f"CUDA out of memory at step {len(times)}: {str(e).splitlines()[0][:300]}"
        res["train_peak_allocated_mib"] = mib(torch.cuda.max_memory_allocated(dev))
        res["train_peak_reserved_mib"] = mib(torch.cuda.max_memory_reserved(dev))
        emit(3)

    losses = [round(x.float().item(), 5) for x in losses]
    timed = times[a.warmup:]
    tokens = a.batch * a.seq * a.steps
    res.update({
        "tokens_timed": tokens, "seconds_timed": round(sum(timed), 4),
        "tokens_per_s": round(tokens / sum(timed), 1),
        "step_s": [round(t, 4) for t in times], "warmup_step_s": [round(t, 4) for t in times[:a.warmup]],
        "loss_first": losses[0], "loss_last": losses[-1], "losses": losses,
    })
    if cuda:
        res["train_peak_allocated_mib"] = mib(torch.cuda.max_memory_allocated(dev))
        res["train_peak_reserved_mib"] = mib(torch.cuda.max_memory_reserved(dev))
    if not all(x == x and abs(x) != float("inf") for x in losses):
        res["error"] = "non-finite loss"
        emit(4)
    emit(0)


def _dtype_hist(model):
    h = {}
    for q in model.parameters():
        h[q.dtype] = h.get(q.dtype, 0) + q.numel()
    return h


if __name__ == "__main__":
    main()
