# `make demo` and `make test` each set up their own virtual environment first: demo installs
# requirements.txt alone (TensorFlow; no PyTorch), test adds requirements-dev.txt.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test test-fast bench clean-venv

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(BIN)/.installed-run: requirements.txt | $(BIN)/python
	$(BIN)/pip install -q -r requirements.txt
	touch $@

$(BIN)/.installed-dev: requirements.txt requirements-dev.txt | $(BIN)/python
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@ $(BIN)/.installed-run

demo: $(BIN)/.installed-run
	$(BIN)/python eval.py figures ./figures digits --n_images 49

# Three pytest-xdist workers on two cores: the third keeps both cores busy while a worker waits (for
# a subprocess to start, or for a shared fixture another worker builds); 7% faster than two here.
# tests/conftest.py builds the shared tiny teacher, pair set and student once for all workers, and
# xdist_group marks keep each module with costly module fixtures on one worker.
XDIST := -n 3 --dist loadgroup

test: $(BIN)/.installed-dev
	$(BIN)/python -m pytest -q $(XDIST) tests

test-fast: $(BIN)/.installed-dev
	$(BIN)/python -m pytest -q $(XDIST) -m "not slow" tests

bench: $(BIN)/.installed-dev
	$(BIN)/python bench/forward.py --datasets cifar10 --batches 1 64

clean-venv:
	rm -rf $(VENV)
