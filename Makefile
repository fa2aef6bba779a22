# The two commands of the README: everything else is set up by them.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
STAMP_TORCH := $(VENV)/.installed-torch
STAMP_TPU := $(VENV)/.installed-tpu
PYTEST_ARGS ?=

.PHONY: demo test venv clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): $(BIN)/python requirements.txt requirements-dev.txt pyproject.toml
	$(BIN)/python -m pip install -q -r requirements.txt -r requirements-dev.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $@

$(STAMP_TORCH): $(STAMP) requirements-torch.txt
	$(BIN)/python -m pip install -q -r requirements-torch.txt
	touch $@

$(STAMP_TPU): $(STAMP) requirements-tpu.txt
	$(BIN)/python -m pip install -q -r requirements-tpu.txt
	touch $@

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m retina_jax.main --config experiments/smoke/shapes_demo.py --workdir workdirs/demo

test: $(STAMP_TORCH) $(STAMP_TPU)
	$(BIN)/python -m pytest -n 2 --dist loadfile --durations=30 $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) workdirs
