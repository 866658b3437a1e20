# `make test` on a fresh machine: venv with pip, exact pins, the package, then pytest.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
STAMP   = $(VENV)/.installed

.PHONY: venv test bench clean

venv: $(STAMP)

$(STAMP): requirements-ci.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, alone: pip then takes the local CPU wheel (never a CUDA build).
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -r requirements-ci.txt
	$(PIP) install --quiet --no-deps -e .
	touch $(STAMP)

test: venv
	$(PY) -m pytest -q tests

bench: venv
	$(PY) benchmarks/loss_bench.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
