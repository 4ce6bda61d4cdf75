#!/usr/bin/env python3
"""Regenerate the committed seed corpora in fuzz/corpus/<target>/ (standard library only).

Seeds are small: tiny valid files of each format built here, plus small files copied or cut out
of tests/fixtures. Run from anywhere: python3 fuzz/seeds.py
Regression seeds (inputs that crashed a target, named regression-*) are committed by hand and
are not touched by this script.
"""
import json, os, struct, shutil, glob

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FX = os.path.join(ROOT, "tests", "fixtures")
CORPUS = os.path.join(HERE, "corpus")


def out(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# ---------------------------------------------------------------- safetensors
def st_read(path):
    b = open(path, "rb").read()
    n = struct.unpack_from("<Q", b)[0]
    hdr = json.loads(b[8:8 + n])
    data = b[8 + n:]
    tensors = {}
    for k, v in hdr.items():
        if k == "__metadata__":
            continue
        s, e = v["data_offsets"]
        tensors[k] = (v["dtype"], v["shape"], data[s:e])
    return tensors, hdr.get("__metadata__")


def st_write(tensors, metadata=None):
    hdr = {}
    if metadata:
        hdr["__metadata__"] = metadata
    off = 0
    blob = b""
    for name, (dt, shape, raw) in tensors:
        hdr[name] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + len(raw)]}
        off += len(raw)
        blob += raw
    h = json.dumps(hdr, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + blob


def f32(vals):
    return b"".join(struct.pack("<f", v) for v in vals)


def f16(vals):
    return b"".join(struct.pack("<e", v) for v in vals)


def safetensors_seeds():
    t = "safetensors_header"
    out(t, "dtypes.safetensors", st_write([
        ("a.f32", ("F32", [2, 3], f32([0.5, -1, 2, 3, 4, 5]))),
        ("b.f16", ("F16", [4], f16([1, 2, -3, 0.25]))),
        ("c.bf16", ("BF16", [2], b"\x80\x3f\x00\x40")),
        ("d.f64", ("F64", [1], struct.pack("<d", 1.5))),
        ("e.i32", ("I32", [2], struct.pack("<ii", 1, -2))),
        ("f.u8", ("U8", [3], b"abc")),
        ("g.empty", ("F32", [0], b"")),
    ], {"format": "pt"}))
    p = "base_model.model.model.layers.0.self_attn."
    lora = []
    for m in ["q_proj", "v_proj"]:
        lora.append((p + m + ".lora_A.weight", ("F32", [2, 8], f32([i / 7 for i in range(16)]))))
        lora.append((p + m + ".lora_B.weight", ("F32", [8, 2], f32([i / 5 - 1 for i in range(16)]))))
    out(t, "lora_adapter.safetensors", st_write(lora, {"format": "pt"}))
    ia3 = [(p.replace("self_attn.", "mlp.") + "down_proj.ia3_l", ("F32", [1, 8], f32([1.0] * 8))),
           (p + "k_proj.ia3_l", ("F32", [8, 1], f32([0.5] * 8)))]
    out(t, "ia3_adapter.safetensors", st_write(ia3, {"format": "pt"}))
    out(t, "prompt_adapter.safetensors", st_write([("prompt_embeddings", ("F32", [2, 4], f32(range(8))))]))
    # The smallest 4-bit weight of the bitsandbytes fixture, with all its parts.
    for src, name in [("nf4/gpt2-bnb/model.safetensors", "nf4_weight.safetensors"),
                      ("qlora/llama_gqa-fp4/model.safetensors", "fp4_weight.safetensors")]:
        path = os.path.join(FX, src)
        if not os.path.exists(path):
            continue
        ts, _ = st_read(path)
        states = [k for k in ts if ".quant_state.bitsandbytes__" in k]
        w = min((k.split(".quant_state.")[0] for k in states), key=lambda w: len(ts[w][2]))
        parts = [(k, ts[k]) for k in sorted(ts) if k == w or k.startswith(w + ".")]
        out(t, name, st_write(parts))
        out("quant_state", name.replace(".safetensors", ".json"),
            ts[[k for k in states if k.startswith(w + ".")][0]][2])
    out(t, "header_only.safetensors", st_write([]))
    out(t, "truncated.safetensors", st_write(lora)[:200])


# ---------------------------------------------------------------- GGUF
GGUF_T = {"u8": 0, "i8": 1, "u16": 2, "i16": 3, "u32": 4, "i32": 5, "f32": 6, "bool": 7,
          "str": 8, "arr": 9, "u64": 10, "i64": 11, "f64": 12}
FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def gstr(s):
    s = s.encode()
    return struct.pack("<Q", len(s)) + s


def gval(ty, v):
    if ty == 8:
        return gstr(v)
    if ty == 9:
        et, items = v
        return struct.pack("<IQ", et, len(items)) + b"".join(gval(et, x) for x in items)
    return struct.pack(FMT[ty], v)


BLOCK = {0: (1, 4), 1: (1, 2), 30: (1, 2), 28: (1, 8), 2: (32, 18), 3: (32, 20), 6: (32, 22),
         7: (32, 24), 8: (32, 34), 10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176),
         14: (256, 210), 15: (256, 292)}


def gguf(kvs, tensors, align=32):
    """kvs: [(key, type, value)]; tensors: [(name, dims (ggml order), type id, raw bytes)]."""
    b = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs))
    for k, ty, v in kvs:
        b += gstr(k) + struct.pack("<I", ty) + gval(ty, v)
    off = 0
    offs = []
    for name, dims, ty, raw in tensors:
        offs.append(off)
        off += len(raw)
        off += -off % align
    for (name, dims, ty, raw), o in zip(tensors, offs):
        b += gstr(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        b += struct.pack("<IQ", ty, o)
    b += b"\0" * (-len(b) % align)
    for (name, dims, ty, raw), o in zip(tensors, offs):
        b += raw + b"\0" * (-len(raw) % align)
    return b


def pattern(n, seed=1):
    x = seed
    outb = bytearray()
    for _ in range(n):
        x = (x * 1103515245 + 12345) & 0x7FFFFFFF
        outb.append((x >> 16) & 0xFF)
    return bytes(outb)


def gguf_tensor(ty, dims, seed):
    bs, bb = BLOCK[ty]
    n = 1
    for d in dims:
        n *= d
    if ty == 0:
        return f32([((i * 7 + seed) % 13 - 6) / 8 for i in range(n)])
    if ty == 1:
        return f16([((i * 5 + seed) % 11 - 5) / 8 for i in range(n)])
    raw = bytearray(pattern(n // bs * bb, seed))
    # keep the f16 scales of block types small and finite
    for blk in range(n // bs):
        base = blk * bb
        for at in ([0, 2] if ty in (3, 7) else [0]) if bs == 32 else ([bb - 4, bb - 2] if ty in (10, 12, 13) else [bb - 2]):
            raw[base + at:base + at + 2] = struct.pack("<e", 0.01)
    return bytes(raw)


def tiny_llama(arch="llama", tok_model="gpt2", ty=0, h=8, ffn=16, heads=2, kv_heads=1, extra=()):
    vocab = 12
    tokens = ["<unk>", "<s>", "</s>", "a", "b", "c", "ab", "bc", "abc", "\u0120a", " ", "\n"]
    kvs = [("general.architecture", 8, arch), ("general.name", 8, "fuzz-seed"),
           (f"{arch}.block_count", 4, 1), (f"{arch}.context_length", 4, 64),
           (f"{arch}.embedding_length", 4, h), (f"{arch}.feed_forward_length", 4, ffn),
           (f"{arch}.attention.head_count", 4, heads), (f"{arch}.attention.head_count_kv", 4, kv_heads),
           (f"{arch}.attention.layer_norm_rms_epsilon", 6, 1e-5), (f"{arch}.rope.freq_base", 6, 10000.0),
           ("tokenizer.ggml.model", 8, tok_model), ("tokenizer.ggml.pre", 8, "default"),
           ("tokenizer.ggml.tokens", 9, (8, tokens)),
           ("tokenizer.ggml.token_type", 9, (5, [2, 3, 3] + [1] * (vocab - 3))),
           ("tokenizer.ggml.bos_token_id", 4, 1), ("tokenizer.ggml.eos_token_id", 4, 2),
           ("tokenizer.ggml.add_bos_token", 7, True),
           ("tokenizer.chat_template", 8, "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")]
    kvs += list(extra)
    if tok_model == "gpt2":
        kvs.append(("tokenizer.ggml.merges", 9, (8, ["a b", "b c", "ab c"])))
    else:
        kvs.append(("tokenizer.ggml.scores", 9, (6, [0.0, 0.0, 0.0, -1, -2, -3, -1.5, -2.5, -0.5, -4, -5, -6])))
    kv = h // 2
    shapes = [("token_embd.weight", [h, vocab]), ("blk.0.attn_norm.weight", [h]),
              ("blk.0.attn_q.weight", [h, h]), ("blk.0.attn_k.weight", [h, kv]),
              ("blk.0.attn_v.weight", [h, kv]), ("blk.0.attn_output.weight", [h, h]),
              ("blk.0.ffn_gate.weight", [h, ffn]), ("blk.0.ffn_up.weight", [h, ffn]),
              ("blk.0.ffn_down.weight", [ffn, h]), ("blk.0.ffn_norm.weight", [h]),
              ("output_norm.weight", [h])]
    tensors = []
    for i, (n, d) in enumerate(shapes):
        t = ty if len(d) == 2 else 0
        tensors.append((n, d, t, gguf_tensor(t, d, i)))
    return gguf(kvs, tensors)


def gguf_seeds():
    t = "gguf_reader"
    out(t, "llama_f32_gpt2tok.gguf", tiny_llama())
    out(t, "qwen2_f16_spm.gguf", tiny_llama("qwen2", "llama", 1))
    out(t, "llama_q8_0.gguf", tiny_llama(ty=8, h=32, ffn=32))
    blocks = [(f"t{ty}", [256, 1], ty, gguf_tensor(ty, [256, 1], ty)) for ty in sorted(BLOCK)]
    out(t, "all_block_types.gguf", gguf([("general.architecture", 8, "none"), ("general.alignment", 4, 32)], blocks))
    out(t, "metadata_types.gguf", gguf(
        [("u8", 0, 1), ("i8", 1, -1), ("u16", 2, 2), ("i16", 3, -2), ("u32", 4, 3), ("i32", 5, -3),
         ("f32", 6, 0.5), ("bool", 7, True), ("str", 8, "x"), ("u64", 10, 4), ("i64", 11, -4), ("f64", 12, 0.25),
         ("arr", 9, (9, [(4, [1, 2]), (8, ["a"])]))], []))


# ---------------------------------------------------------------- JSON readers
def quant_state_seeds():
    t = "quant_state"
    out(t, "nf4_double.json", '{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [64, 256], '
        '"nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 2.617828369140625}')
    out(t, "fp4_plain.json", '{"quant_type": "fp4", "blocksize": 64, "dtype": "float32", "shape": [8, 16]}')
    out(t, "nf4_small_nested.json", '{"quant_type": "nf4", "blocksize": 32, "dtype": "float16", "shape": [3, 7], '
        '"nested_blocksize": 2, "nested_dtype": "float32", "nested_offset": 0.03125}')


def adapter_config_seeds():
    t = "adapter_config"
    seen = set()
    for p in sorted(glob.glob(os.path.join(FX, "**", "adapter_config.json"), recursive=True)):
        data = open(p, "rb").read()
        if data in seen or len(data) > 4096:
            continue
        seen.add(data)
        rel = os.path.relpath(os.path.dirname(p), FX).replace(os.sep, "_")
        out(t, rel + ".json", data)
    out(t, "bottleneck.json", json.dumps({"peft_type": "BOTTLENECK", "adapter_size": 4, "variant": "houlsby",
                                          "target_modules": ["mlp"]}))


def data_seeds():
    t = "data_lines"
    # byte 0: reader/format (bits 0-2), extension (bits 3-4: jsonl, json, txt), flags; byte 1: max_len-2
    files = {"text.jsonl": 1, "alpaca.json": 2 | 8, "prompt_completion.jsonl": 3,
             "messages.jsonl": 4, "sharegpt.jsonl": 5}
    for name, sel in files.items():
        data = open(os.path.join(FX, "data", name), "rb").read()
        out(t, name, bytes([sel, 62]) + data)
        out(t, "auto_" + name, bytes([0 | (sel & 8) | 0x20, 20]) + data)
    out(t, "plain.txt", bytes([0 | 16, 30]) + b"hello world\nsecond line\n\n")
    out(t, "pc_messages.jsonl", bytes([3 | 0x40, 40]) + json.dumps(
        {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "yo"}]}).encode() + b"\n")
    out(t, "pairs.jsonl", bytes([6 | 0x40, 40]) + b"\n".join(json.dumps(r).encode() for r in [
        {"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5", "margin": 1.0},
        {"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
         "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "go"}], "margin": 0.5},
        {"conversations": [{"from": "human", "value": "hi"}], "chosen": {"from": "gpt", "value": "a"},
         "rejected": {"from": "gpt", "value": "b"}, "margin": 2, "ref_chosen_logps": -1.5, "ref_rejected_logps": -2.0},
    ]) + b"\n")
    out(t, "prompts.jsonl", bytes([7, 30]) + b'{"prompt": "Tell me a story"}\n{"prompt": [{"role": "user", "content": "hi"}]}\n"bare"\n')
    out(t, "prompts.txt", bytes([7 | 16, 10]) + b"one prompt\nanother prompt\n")


if __name__ == "__main__":
    for d in ["safetensors_header", "gguf_reader", "quant_state", "adapter_config", "data_lines"]:
        for f in glob.glob(os.path.join(CORPUS, d, "*")):
            if not os.path.basename(f).startswith("regression-"):
                os.remove(f)
    safetensors_seeds()
    gguf_seeds()
    quant_state_seeds()
    adapter_config_seeds()
    data_seeds()
