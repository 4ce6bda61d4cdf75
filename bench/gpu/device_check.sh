#!/usr/bin/env bash
# The GPU device check (issue 11), one script for one short GPU lease (< 8 minutes on an H200):
#   1. every kernel against the CPU path, with its speed against the roofline it is bound by,
#      and NCCL on one rank summing the engine's memory;
#   2. a training step of every method of the GPU engine against the CPU engine on the
#      committed tiny models (Llama GQA, untied head, llama3 RoPE, Qwen2 biases, GPT-2), then
#      evaluation and generation (run after 3, as it decides no target);
#   3. LoRA and QLoRA training tokens/s and peak GPU memory on a random 1B-class Llama, ours
#      (gpu-check --bench; QLoRA once more with the flash attention kernels, the fused 4-bit
#      GEMM, and AdamW on the host instead of the device; LoRA without gradient checkpointing)
#      side by side with PyTorch + PEFT (+ bitsandbytes) on the same model; then QLoRA with
#      flash attention profiled, phase by phase;
#   4. peft-train --device cuda:0 end to end on that model (data, steps, adapter output);
#   5. peft-eval and peft-generate with that adapter (one prompt, then 16 with --batch 16 and
#      --batch 1), and dpo-train on a tiny model, on the GPU;
#   6. on tiny models: rm-train, rm-score, ppo-train, grpo-train (one process, then two
#      data-parallel ranks sharing the GPU); GPT-2 LoRA; full fine-tuning with AdamW on the
#      device and on the host;
#   7. full fine-tuning's speed on the 1B-class model with AdamW on the device (states in device
#      memory, then paged) and on the host.
#
# Needs: the binaries built with `make build-cuda` (target/cuda/release, or packed in
# .gpu/bin.tar.xz by prepare.sh, unpacked here when target/cuda/release has none), python3 with torch,
# transformers and peft; bitsandbytes from .gpu/whl-slim if it is missing; the tokenizer files
# in .gpu/tok. Results go to $OUT (or bench/out/gpu): JSON files and log.txt.
# Usage: bash bench/gpu/device_check.sh [SECONDS_BUDGET]
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-bench/out/gpu}
mkdir -p "$OUT"
BUDGET=${1:-420}
START=$(date +%s)
BIN=${BIN:-target/cuda/release}
if [ ! -x "$BIN/gpu-check" ] && [ -f .gpu/bin.tar.xz ]; then
    mkdir -p /tmp/peftkit-bin && tar -xJf .gpu/bin.tar.xz -C /tmp/peftkit-bin && BIN=/tmp/peftkit-bin
fi
MODEL=${MODEL:-/tmp/llama1b}
BATCH=${BATCH:-4}
SEQ=${SEQ:-1024}
STEPS=${STEPS:-8}
exec > >(tee -a "$OUT/log.txt") 2>&1

# SECTIONS: any of check model ours hf engine train tools more fullft (default all).
SECTIONS=${SECTIONS:-check model ours hf engine train tools more fullft}
want() { case " $SECTIONS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
left() { echo $((BUDGET - ($(date +%s) - START))); }
section() { echo; echo "=== $1 (t=$(( $(date +%s) - START ))s, $(left)s left)"; }
# run SECONDS CMD...: with a time limit that never passes the budget
run() {
    local t=$1; shift
    local l; l=$(left)
    if [ "$l" -lt 20 ]; then echo "skipped (budget spent): $*"; return 99; fi
    [ "$t" -gt "$l" ] && t=$l
    timeout "$t" "$@"; local rc=$?
    echo "[rc=$rc] $1"
    return $rc
}

section "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
# CUDA libraries: the toolkit's and the ones PyTorch's wheels bring (nvrtc, cublas).
LIBS=$(python3 - <<'EOF'
import glob, os, site
dirs = set()
for sp in site.getsitepackages() + [site.getusersitepackages()]:
    for pat in ("nvidia/*/lib", "nvidia/*/lib64"):
        dirs.update(glob.glob(os.path.join(sp, pat)))
for d in glob.glob("/usr/local/cuda*/lib64") + glob.glob("/usr/local/cuda*/targets/x86_64-linux/lib"):
    dirs.add(d)
print(":".join(sorted(dirs)))
EOF
)
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$LIBS:/usr/local/nvidia/lib64:/usr/lib/x86_64-linux-gnu"
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
if ! python3 -c "import bitsandbytes" 2>/dev/null; then
    python3 -c "import zipfile,glob; zipfile.ZipFile(glob.glob('.gpu/whl-slim/bitsandbytes-*.whl')[0]).extractall('/tmp/bnb')" \
        && export PYTHONPATH="/tmp/bnb${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 -c "import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__)" || echo "no bitsandbytes: the QLoRA reference will be skipped"

F=tests/fixtures/models
# Ordered so that what decides issue 11's targets comes first (a lease may end early, and the
# budget skips what is left): the kernels against their roofline, ours and PyTorch's QLoRA,
# then the variants and the slower correctness runs.
want check && section "1. kernels against the CPU path and their roofline; NCCL on one rank" && run 90 "$BIN/gpu-check" --json "$OUT/check.json"

want model && section "make the 1B-class model" && { [ -f "$MODEL/model.safetensors" ] || run 150 python3 bench/gpu/make_model.py --out "$MODEL" --tokenizer-dir .gpu/tok; }

want ours && section "3a. ours: LoRA and QLoRA training, ${BATCH}x${SEQ}" && run 200 "$BIN/gpu-check" --no-kernels --bench "$MODEL" --method lora,qlora --batch "$BATCH" --seq "$SEQ" \
    --steps "$STEPS" --json "$OUT/ours.json"

want hf && section "3c. PyTorch + PEFT + bitsandbytes QLoRA" && run 150 python3 bench/gpu/hf_reference.py --model "$MODEL" --method qlora --batch "$BATCH" --seq "$SEQ" \
    --steps "$STEPS" --json "$OUT/hf_qlora.json"

want ours && section "3a'. ours: QLoRA with flash attention (PEFTKIT_GPU_ATTENTION=flash)" && PEFTKIT_GPU_ATTENTION=flash run 120 "$BIN/gpu-check" --no-kernels --bench "$MODEL" --method qlora --batch "$BATCH" --seq "$SEQ" \
    --steps "$STEPS" --json "$OUT/ours_flash.json"

want ours && section "3a5. ours: LoRA without gradient checkpointing (PEFTKIT_GPU_CHECKPOINTING=off), as PyTorch's 3b" && PEFTKIT_GPU_CHECKPOINTING=off run 120 "$BIN/gpu-check" --no-kernels --bench "$MODEL" --method lora --batch "$BATCH" --seq "$SEQ" \
    --steps "$STEPS" --json "$OUT/ours_nockpt.json"

want hf && section "3b. PyTorch + PEFT LoRA" && run 150 python3 bench/gpu/hf_reference.py --model "$MODEL" --method lora --batch "$BATCH" --seq "$SEQ" \
    --steps "$STEPS" --json "$OUT/hf_lora.json"

want ours && section "3a''. ours: QLoRA with the fused 4-bit GEMM (PEFTKIT_GPU_Q4_GEMM=fused)" && PEFTKIT_GPU_Q4_GEMM=fused run 120 "$BIN/gpu-check" --no-kernels --bench "$MODEL" --method qlora --batch "$BATCH" --seq "$SEQ" \
    --steps "$STEPS" --json "$OUT/ours_fused.json"

want ours && section "3a'''. ours: QLoRA with AdamW on the host (PEFTKIT_GPU_OPTIMIZER=host, the default before 2026-12-07)" && PEFTKIT_GPU_OPTIMIZER=host run 120 "$BIN/gpu-check" --no-kernels --bench "$MODEL" --method qlora --batch "$BATCH" --seq "$SEQ" \
    --steps "$STEPS" --json "$OUT/ours_hostopt.json"

want hf && section "3b'. PyTorch + PEFT LoRA with gradient checkpointing (as ours)" && run 150 python3 bench/gpu/hf_reference.py --model "$MODEL" --method lora --grad-checkpointing --batch "$BATCH" \
    --seq "$SEQ" --steps "$STEPS" --json "$OUT/hf_lora_gc.json"

want ours && section "3a6. ours: where a QLoRA step with flash attention goes (PEFTKIT_GPU_PROFILE=1: synchronises at each phase, so slower)" && PEFTKIT_GPU_PROFILE=1 PEFTKIT_GPU_ATTENTION=flash run 90 "$BIN/gpu-check" --no-kernels --bench "$MODEL" --method qlora --batch "$BATCH" --seq "$SEQ" \
    --steps 3 --warmup 1 --json "$OUT/ours_flash_profile.json"

want engine && section "2. a training step of every method against the CPU engine; evaluation and generation" && run 150 "$BIN/gpu-check" --no-kernels --engine "$F/llama_gqa,$F/llama_untied,$F/llama3_rope,$F/qwen2,$F/gpt2" --json "$OUT/engine.json"

want train && section "4. peft-train --device cuda:0 end to end" && rm -rf /tmp/gpu-run && run 120 "$BIN/peft-train" --model "$MODEL" --data tests/fixtures/data/alpaca.json --method lora \
    --out /tmp/gpu-run --steps 6 --batch 4 --lr 1e-3 --device cuda:0 --log "$OUT/train.jsonl" \
    && ls -la /tmp/gpu-run && cp /tmp/gpu-run/adapter_config.json "$OUT/" 2>/dev/null

want tools && section "5. peft-eval, peft-generate and dpo-train --device cuda:0 end to end" && {
    run 60 "$BIN/peft-eval" --model "$MODEL" --adapter /tmp/gpu-run --data tests/fixtures/data/text.jsonl --device cuda:0 --json \
        > "$OUT/eval.json" && cat "$OUT/eval.json"
    run 60 "$BIN/peft-generate" --model "$MODEL" --adapter /tmp/gpu-run --prompt "Once upon a time" --max-new-tokens 64 \
        --device cuda:0 --json | tee "$OUT/generate.jsonl"
    # --batch on the GPU: 16 prompts stepped together against one at a time
    python3 -c "import json
for i in range(16): print(json.dumps({'prompt': f'Story {i}: once upon a time'}))" > /tmp/gen16.jsonl
    for b in 16 1; do
        run 60 "$BIN/peft-generate" --model "$MODEL" --prompts /tmp/gen16.jsonl --max-new-tokens 64 --ignore-eos \
            --batch $b --device cuda:0 --json --quiet > "$OUT/generate_batch$b.jsonl" || true
    done
    python3 - "$OUT" <<'EOF'
import json, os, sys
for b in (16, 1):
    p = os.path.join(sys.argv[1], f"generate_batch{b}.jsonl")
    rows = [json.loads(l) for l in open(p)] if os.path.exists(p) else []
    if rows:
        toks = sum(len(r["token_ids"]) for r in rows)
        secs = sum(max(len(r["token_ids"]) / r["tokens_per_second"] for r in rows[i:i + b])
                   for i in range(0, len(rows), b))
        print(f"peft-generate --batch {b}: {len(rows)} answers, {toks / secs:.1f} tokens/s")
EOF
    python3 -c "import json
for i in range(24): print(json.dumps({'prompt': f'q{i} say:', 'chosen': ' yes yes', 'rejected': ' no no'}))" > /tmp/pairs.jsonl
    rm -rf /tmp/gpu-dpo
    run 90 "$BIN/dpo-train" --model tests/fixtures/models/llama_gqa --data /tmp/pairs.jsonl --out /tmp/gpu-dpo --steps 4 --batch 4 \
        --device cuda:0 --log "$OUT/dpo.jsonl"
}

want more && section "6. rm-train, rm-score, ppo-train, GPT-2 and full fine-tuning on tiny models --device cuda:0" && {
    [ -f /tmp/pairs.jsonl ] || python3 -c "import json
for i in range(24): print(json.dumps({'prompt': f'q{i} say:', 'chosen': ' yes yes', 'rejected': ' no no'}))" > /tmp/pairs.jsonl
    rm -rf /tmp/gpu-rm /tmp/gpu-ppo /tmp/gpu-gpt2 /tmp/gpu-full-dev /tmp/gpu-full-host
    run 60 "$BIN/rm-train" --model "$F/llama_gqa" --data /tmp/pairs.jsonl --out /tmp/gpu-rm --steps 6 --batch 4 --lr 3e-3 \
        --device cuda:0 --log "$OUT/rm.jsonl"
    run 30 "$BIN/rm-score" --model "$F/llama_gqa" --adapter /tmp/gpu-rm --data /tmp/pairs.jsonl --device cuda:0
    run 90 "$BIN/ppo-train" --model "$F/llama_gqa" --reward-model /tmp/gpu-rm --prompts /tmp/pairs.jsonl --out /tmp/gpu-ppo \
        --steps 3 --batch 4 --response-length 12 --eval-prompts 4 --device cuda:0 --log "$OUT/ppo.jsonl"
    rm -rf /tmp/gpu-grpo /tmp/gpu-grpo2
    run 60 "$BIN/grpo-train" --model "$F/llama_gqa" --prompts /tmp/pairs.jsonl --reward 'regex: yes' --out /tmp/gpu-grpo \
        --steps 3 --batch 2 --num-generations 4 --max-completion-length 8 --device cuda:0 --log "$OUT/grpo.jsonl"
    # two data-parallel ranks sharing the GPU (TCP), as torchrun would start them
    for r in 0 1; do
        CUDA_VISIBLE_DEVICES=0 RANK=$r WORLD_SIZE=2 LOCAL_RANK=$r MASTER_ADDR=127.0.0.1 MASTER_PORT=29517 \
            timeout 60 "$BIN/grpo-train" --model "$F/llama_gqa" --prompts /tmp/pairs.jsonl --reward 'regex: yes' \
            --out /tmp/gpu-grpo2 --steps 3 --batch 2 --num-generations 4 --max-completion-length 8 --device cuda:0 \
            --log "$OUT/grpo_dp.jsonl" &
    done
    wait
    run 60 "$BIN/peft-train" --model "$F/gpt2" --data tests/fixtures/data/alpaca.json --target c_attn,c_proj,c_fc \
        --out /tmp/gpu-gpt2 --steps 4 --batch 2 --device cuda:0 --log "$OUT/gpt2.jsonl"
    run 60 "$BIN/peft-train" --model "$F/llama_gqa" --data tests/fixtures/data/alpaca.json --method full --lr 1e-4 \
        --out /tmp/gpu-full-dev --steps 4 --batch 2 --device cuda:0 --log "$OUT/full_device.jsonl"
    PEFTKIT_GPU_OPTIMIZER=host run 60 "$BIN/peft-train" --model "$F/llama_gqa" --data tests/fixtures/data/alpaca.json \
        --method full --lr 1e-4 --out /tmp/gpu-full-host --steps 4 --batch 2 --device cuda:0 --log "$OUT/full_host.jsonl"
    python3 - "$OUT" <<'EOF'
import json, os, sys
out = sys.argv[1]
def losses(n):
    p = os.path.join(out, n)
    return [r["loss"] for r in map(json.loads, open(p)) if "loss" in r] if os.path.exists(p) else []
d, h = losses("full_device.jsonl"), losses("full_host.jsonl")
print("full fine-tuning losses, AdamW on the device:", d)
print("full fine-tuning losses, AdamW on the host:  ", h)
if d and h:
    print("largest relative difference:", max(abs(a - b) / abs(b) for a, b in zip(d, h)))
EOF
}

want fullft && section "7. full fine-tuning of the 1B-class model: AdamW on the device, paged, and on the host" && for opt in device paged host; do
    rm -rf /tmp/gpu-full1b
    # (The per-step speeds are in the log before the 16 GB final checkpoint is written: the
    # time limit may cut that writing short, which loses nothing here.)
    PEFTKIT_GPU_OPTIMIZER=$opt run 60 "$BIN/peft-train" --model "$MODEL" --data tests/fixtures/data/alpaca.json --method full \
        --lr 1e-5 --out /tmp/gpu-full1b --steps 4 --batch 4 --device cuda:0 --log "$OUT/full1b_$opt.jsonl"
    python3 -c "import json; r=[json.loads(l) for l in open('$OUT/full1b_$opt.jsonl') if 'tokens_per_second' in l]; print('$opt tokens/s per step', [round(x['tokens_per_second']) for x in r])" || true
done

section "summary"
python3 - "$OUT" <<'EOF'
import json, os, sys
out = sys.argv[1]
def load(n):
    p = os.path.join(out, n)
    return json.load(open(p)) if os.path.exists(p) else None
ours = load("ours.json") or {}
rows = {r["method"]: r for r in ours.get("bench", [])}
flash = {r["method"]: r for r in (load("ours_flash.json") or {}).get("bench", [])}
fused = {r["method"]: r for r in (load("ours_fused.json") or {}).get("bench", [])}
hostopt = {r["method"]: r for r in (load("ours_hostopt.json") or {}).get("bench", [])}
nockpt = {r["method"]: r for r in (load("ours_nockpt.json") or {}).get("bench", [])}
for m, name, ref, mine in (("lora", "lora", load("hf_lora.json"), rows), ("lora", "lora vs checkpointed", load("hf_lora_gc.json"), rows),
                           ("lora", "lora, both without checkpointing", load("hf_lora.json"), nockpt),
                           ("qlora", "qlora", load("hf_qlora.json"), rows), ("qlora", "qlora, flash attention", load("hf_qlora.json"), flash),
                           ("qlora", "qlora, fused 4-bit GEMM", load("hf_qlora.json"), fused),
                           ("qlora", "qlora, AdamW on the host", load("hf_qlora.json"), hostopt)):
    o = mine.get(m)
    if not o:
        continue
    line = f"{name}: ours {o['tokens_per_second']:.0f} tok/s, peak {o['peak_allocated_bytes']/1e9:.2f} GB"
    if ref and ref.get("tokens_per_s"):
        hp = (ref.get("train_peak_allocated_mib") or 0) * 2**20
        line += f" | PyTorch {ref['tokens_per_s']:.0f} tok/s, peak {hp/1e9:.2f} GB"
        line += f" | speed {o['tokens_per_second']/ref['tokens_per_s']:.2f}x"
        if hp:
            line += f", memory {o['peak_allocated_bytes']/hp:.2f}x"
    print(line)
# Issue 11's targets: QLoRA >= 2x PEFT + bitsandbytes at <= 0.5x its peak memory; kernels at
# >= 60% of the roofline they are bound by.
ref = load("hf_qlora.json") or {}
if ref.get("tokens_per_s"):
    hp = (ref.get("train_peak_allocated_mib") or 0) * 2**20
    for name, mine in (("default", rows), ("flash attention", flash), ("fused 4-bit GEMM", fused), ("AdamW on the host", hostopt)):
        o = mine.get("qlora")
        if not o or not hp:
            continue
        sp, mem = o["tokens_per_second"] / ref["tokens_per_s"], o["peak_allocated_bytes"] / hp
        ok = sp >= 2.0 and mem <= 0.5
        print(f"TARGET qlora ({name}): {sp:.2f}x speed, {mem:.2f}x memory: {'met' if ok else 'not met'}")
prof = ((load("ours_flash_profile.json") or {}).get("bench") or [{}])[0].get("profile_ms_per_step")
if prof:
    print("QLoRA step with flash attention, ms per phase:", ", ".join(f"{k} {v:.1f}" for k, v in prof.items()))
check = load("check.json") or {}
if "nccl" in check:
    print("NCCL, one rank, in place on the engine's memory:", check["nccl"])
engine = load("engine.json")
if engine:
    bad = [f"{r.get('model')} {r.get('case', 'eval/generation')}" for r in engine.get("engine", [])
           if r.get("pass") is False or any(c.get("pass") is False for c in (r.get("checks") or []) if isinstance(c, dict))]
    print("engine against the CPU:", "all passed" if not bad else "FAILED: " + ", ".join(bad))
for k in (check.get("kernels") or {}).get("kernels", []):
    f = k.get("roofline_fraction")
    if isinstance(f, (int, float)) and f == f:
        print(f"TARGET kernel {k['check']}: {100 * f:.0f}% of its roofline ({k.get('ms') or 0:.3f} ms): {'met' if f >= 0.6 else 'below 60%'}")
EOF
echo "done in $(( $(date +%s) - START )) s"
