#!/usr/bin/env bash
# make demo: SmolLM2-135M-Instruct on the CPU — answer a question, quantize the model to 4-bit
# NF4 (the bitsandbytes layout transformers loads), QLoRA instruction tuning on that 4-bit base
# with a slice of alpaca_en_demo (eval loss before/after), the same prompt answered with and
# without the adapter, the adapter inspected and merged into one plain model, and a short
# reward-model run on dpo_en_demo with its held-out accuracy.
set -euo pipefail
MODEL=${MODEL:-models/smollm2}
BIN=${BIN:-target/release}
DATA=${DATA:-data}
RUNS=${RUNS:-runs}
# The tools refuse a --log/--plot path whose folder is missing (they check before training, not
# after it), so a fresh clone needs the runs folder made here.
mkdir -p "$RUNS"
STEPS=${DEMO_STEPS:-24}
PYTHON=${PYTHON:-python3}
Q="What is the capital of France?"

echo "==> $Q"
answer=$("$BIN/peft-generate" --model "$MODEL" --chat --prompt "$Q" --max-new-tokens 32)
echo "$answer"
if ! grep -q "Paris" <<<"$answer"; then
  echo "error: demo: the answer does not mention Paris" >&2
  exit 1
fi

QMODEL=${QMODEL:-$MODEL-nf4}
echo "==> 4-bit NF4 quantization (double quantization, block 64) into $QMODEL"
if [ ! -f "$QMODEL/config.json" ]; then
  "$BIN/quantize-nf4" --model "$MODEL" --out "$QMODEL"
fi
answer=$("$BIN/peft-generate" --model "$QMODEL" --chat --prompt "$Q" --max-new-tokens 32)
echo "4-bit model: $answer"

echo "==> QLoRA instruction tuning on the 4-bit base (r 16 on q,v; $STEPS steps of 4 x <=256 tokens; 5% held out)"
"$PYTHON" -c "import json,sys; d=json.load(open('$DATA/alpaca_en_demo.json')); json.dump(d[:400], open('$DATA/alpaca_demo_400.json','w'))"
"$BIN/peft-train" --model "$QMODEL" --data "$DATA/alpaca_demo_400.json" --format alpaca \
  --method lora --rank 16 --alpha 32 --lr 1e-3 --schedule cosine --warmup 2 \
  --steps "$STEPS" --batch 4 --max-len 256 --val-split 0.05 --seed 1 \
  --out "$RUNS/demo-lora" --log "$RUNS/demo-lora.jsonl" --plot "$RUNS/demo-lora.png"

PROMPT=$("$PYTHON" -c "print('Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\nGive three tips for staying healthy.\n\n### Response:')")
echo "==> the same prompt without and with the adapter"
printf '%s\n%s\n' \
  "$("$PYTHON" -c "import json,sys; print(json.dumps({'prompt': sys.argv[1], 'adapter': None}))" "$PROMPT")" \
  "$("$PYTHON" -c "import json,sys; print(json.dumps({'prompt': sys.argv[1], 'adapter': 'demo'}))" "$PROMPT")" \
  > "$RUNS/demo-prompts.jsonl"
"$BIN/peft-generate" --model "$QMODEL" --adapter demo="$RUNS/demo-lora" --prompts "$RUNS/demo-prompts.jsonl" \
  --max-new-tokens 48 --json | "$PYTHON" -c "
import json, sys
for line in sys.stdin:
    r = json.loads(line)
    print('--- ' + ('base model' if r['adapter'] is None else 'with adapter ' + r['adapter']))
    print(r['text'].strip())
"

echo "==> what the adapter holds, checked against its base (adapter-inspect)"
"$BIN/adapter-inspect" "$RUNS/demo-lora" --base "$QMODEL" | head -20

echo "==> for llama.cpp / Ollama: the 4-bit base (decoded exactly) and the adapter as GGUF files (model-export)"
"$BIN/model-export" --model "$QMODEL" --out "$RUNS/demo-base.gguf" --type q8_0
"$BIN/model-export" --model "$QMODEL" --adapter "$RUNS/demo-lora" --out "$RUNS/demo-lora.gguf"
echo "   run them with: llama-cli -m $RUNS/demo-base.gguf --lora $RUNS/demo-lora.gguf"

echo "==> QLoRA-correct merge: dequantized NF4 weights + ΔW, one plain model (adapter-merge)"
"$BIN/adapter-merge" --model "$QMODEL" --adapter "$RUNS/demo-lora" --out "$RUNS/demo-merged"
"$BIN/peft-generate" --model "$RUNS/demo-merged" --prompt "$PROMPT" --max-new-tokens 48 | sed 's/^/merged model: /' | head -8

RM_STEPS=${DEMO_RM_STEPS:-16}
echo "==> reward model on dpo_en_demo (LoRA r 16 + score head; $RM_STEPS steps of 4 pairs x <=384 tokens; 10% held out)"
"$BIN/rm-train" --model "$MODEL" --data "$DATA/dpo_en_demo.json" --method lora --rank 16 --alpha 32 \
  --lr 1e-3 --steps "$RM_STEPS" --batch 4 --max-len 384 --val-split 0.1 --seed 1 \
  --out "$RUNS/demo-rm" --log "$RUNS/demo-rm.jsonl"

PPO_STEPS=${DEMO_PPO_STEPS:-6}
echo "==> RLHF with PPO against that reward model ($PPO_STEPS steps of 4 prompts x <=32 sampled tokens; LoRA policy, reference = adapter off)"
"$BIN/ppo-train" --model "$MODEL" --reward-model "$RUNS/demo-rm" --prompts "$DATA/dpo_en_demo.json" \
  --batch 4 --response-length 32 --max-prompt-len 160 --steps "$PPO_STEPS" --lr 5e-4 --eval-prompts 16 \
  --seed 1 --out "$RUNS/demo-ppo" --log "$RUNS/demo-ppo.jsonl"
echo "   (score = the demo reward model's mean score of 16 sampled answers, KL = to the base model; the demo"
echo "    reward model saw only 16 steps, so its scores are weak and a few PPO steps move them little)"
"$BIN/peft-generate" --model "$MODEL" --adapter "$RUNS/demo-ppo" --prompt "$PROMPT" --max-new-tokens 48 \
  | sed 's/^/PPO policy: /' | head -8
