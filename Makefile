# The README's two set-up commands: `make lesson` runs the whole lesson, `make test` the test suite.
# Each makes the virtual environment .venv and installs the project into it on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: lesson lint test benchmark clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

lesson: $(STAMP)
	$(PY) experiments/lesson.py --out runs/lesson

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -n 2

benchmark: $(STAMP)
	$(PY) experiments/benchmark.py --out runs/benchmark

clean:
	rm -rf $(VENV) runs
