# `make demo` and `make test` each set up their own virtual environment first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test test-fast bench clean-venv

$(BIN)/.installed: requirements.txt requirements-dev.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@

demo: $(BIN)/.installed
	$(BIN)/python eval.py figures ./figures digits --n_images 49

# Three pytest-xdist workers on two cores: the third keeps both cores busy while a worker waits (for
# a subprocess to start, or for a shared fixture another worker builds); 7% faster than two here.
# tests/conftest.py builds the shared tiny teacher, pair set and student once for all workers, and
# xdist_group marks keep each module with costly module fixtures on one worker.
XDIST := -n 3 --dist loadgroup

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q $(XDIST) tests

test-fast: $(BIN)/.installed
	$(BIN)/python -m pytest -q $(XDIST) -m "not slow" tests

bench: $(BIN)/.installed
	$(BIN)/python bench/forward.py --datasets cifar10 --batches 1 64

clean-venv:
	rm -rf $(VENV)
