# `make bench`: the seed comparison (ResNet18-GN, batch 128, every engine). `make test`: the test suite.
# Both create .venv in the repository root and install what they need into it (a C compiler builds the
# optional streaming extension; `make test` requires it, so that its tests cannot be skipped unnoticed).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: bench test lint venv clean

$(STAMP): pyproject.toml setup.py src/psgrad/_memory/_cstream.c
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install --quiet -e ".[all,test]"
	touch $(STAMP)

venv: $(STAMP)

bench: $(STAMP)
	$(VENV)/bin/psgrad bench

test: $(STAMP)
	PSGRAD_REQUIRE_EXTENSION=1 HYPOTHESIS_PROFILE=ci $(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests

clean:
	rm -rf $(VENV) results
