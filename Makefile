# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench serve clean

# torch first, pinned to the CPU wheel (any looser torch requirement would pull gigabytes of CUDA packages)
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[server,dev]'
	touch $(STAMP)

# the examples extra (matplotlib) draws out/demo.png; the terminal charts need nothing more
$(VENV)/.examples: $(STAMP)
	$(PY) -m pip install -q -e '.[examples]'
	touch $@

demo: $(STAMP) $(VENV)/.examples
	$(PY) -m examples.demo

lint: $(STAMP)
	$(VENV)/bin/ruff check hpcai_async tests bench examples scripts
	$(VENV)/bin/ruff format --check hpcai_async tests bench examples scripts
	$(VENV)/bin/mypy

# the official SDK's own venv (.official/, cached) is built before pytest: a cold build outlasts a test's timeout
# with the examples extra, so the PNG test runs too (without matplotlib it would be skipped)
test: $(STAMP) $(VENV)/.examples lint
	$(PY) -m tests.official_env
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m bench

serve: $(STAMP)
	$(VENV)/bin/hpcai-async serve

clean:
	rm -rf $(VENV) .official .pytest_cache .mypy_cache .ruff_cache
