"""The reference side of `make bench`: transformers on CPU, same model folder, same data, same
thread count. Prints one JSON object. Run one task per process so peak RSS is per task."""
import argparse, json, resource, time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

p = argparse.ArgumentParser()
p.add_argument("task", choices=["eval", "generate", "generate-batch", "train", "train-bf16", "qlora-train", "qlora-train-bf16",
                              "train-full", "train-frozen"])
p.add_argument("--model", required=True)
p.add_argument("--data")
p.add_argument("--threads", type=int, default=2)
p.add_argument("--max-len", type=int, default=256)
p.add_argument("--new-tokens", type=int, default=128)
p.add_argument("--steps", type=int, default=4)
a = p.parse_args()
torch.set_num_threads(a.threads)
tok = AutoTokenizer.from_pretrained(a.model)
if a.task in ("qlora-train", "qlora-train-bf16"):
    # QLoRA recipe on CPU: NF4 + double quantization (bitsandbytes' CPU backend), f32 compute, or
    # the paper's bf16 compute with the rest of the model in bf16.
    from transformers import BitsAndBytesConfig
    dt = torch.bfloat16 if a.task == "qlora-train-bf16" else torch.float32
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=dt)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dt, quantization_config=bnb,
                                                 device_map="cpu").eval()
elif a.task == "train-bf16":
    # plain PyTorch bf16: bf16 weights and matmuls (PEFT keeps the LoRA tensors f32)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16).eval()
else:
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()

if a.task == "eval":
    texts = [json.loads(l)["text"] for l in open(a.data, encoding="utf-8")]
    ids = torch.tensor([tok(t)["input_ids"][: a.max_len] for t in texts])
    with torch.no_grad():
        model(ids[:1, :8])  # warm-up
        t = time.perf_counter()
        loss = model(ids, labels=ids).loss.item()
        dt = time.perf_counter() - t
    res = {"tokens": ids.numel(), "seconds": dt, "tokens_per_second": ids.numel() / dt, "loss": loss}
elif a.task in ("train", "train-bf16", "qlora-train", "qlora-train-bf16", "train-full", "train-frozen"):
    texts = [json.loads(l)["text"] for l in open(a.data, encoding="utf-8")][:4]
    ids = torch.tensor([tok(t)["input_ids"][: a.max_len] for t in texts])
    model.train()
    if a.task == "train-full":
        lr = 2e-5  # every parameter trains (the tied embedding and head included)
    elif a.task == "train-frozen":
        # the top two blocks train (peft-train --method freeze --trainable last:2); the rest
        # is frozen, so autograd stops below the lowest trainable block
        top = {f"layers.{i}." for i in range(model.config.num_hidden_layers - 2, model.config.num_hidden_layers)}
        for n, p_ in model.named_parameters():
            p_.requires_grad = any(t in n for t in top)
        lr = 1e-4
    else:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM"))
        lr = 2e-4
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    times = []
    for step in range(a.steps):
        t = time.perf_counter()
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t)
    dt = sum(times[1:]) / max(1, len(times) - 1)  # first step is warm-up
    res = {"tokens": ids.numel(), "seconds_per_step": dt, "tokens_per_second": ids.numel() / dt, "loss": loss.item()}
elif a.task == "generate-batch":
    # every prompt of --data ({"messages": [...]} lines) in one left-padded batch, greedy
    chats = [json.loads(l)["messages"] for l in open(a.data, encoding="utf-8")]
    texts = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in chats]
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        model.generate(**enc, max_new_tokens=4, do_sample=False)  # warm-up
        t = time.perf_counter()
        out = model.generate(**enc, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens,
                             do_sample=False)
        dt = time.perf_counter() - t
    n = (out.shape[1] - enc.input_ids.shape[1]) * out.shape[0]
    res = {"tokens": n, "sequences": out.shape[0], "seconds": dt, "tokens_per_second": n / dt}
else:
    msgs = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]
    prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up
        t = time.perf_counter()
        out = model.generate(ids, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, do_sample=False)
        dt = time.perf_counter() - t
    n = out.shape[1] - ids.shape[1]
    res = {"tokens": n, "seconds": dt, "tokens_per_second": n / dt}
res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(res))
