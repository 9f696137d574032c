# The README's set-up commands: `make docs` re-executes the lesson notebooks (lesson/) at the lesson's full settings
# and renders each as an HTML page (runs/docs), `make lesson` runs the whole lesson's report, `make test` the test
# suite, `make install` only installs.
# Each makes the virtual environment $(VENV) with $(PYTHON) and installs the project into it on first use.
#   PYTHON   the interpreter that makes the venv (default python3)
#   VENV     the venv folder (default .venv; CI uses .venv-3.13 for its second Python)
#   EXTRAS   extras installed beside `test`: cuda (CUDA 13), cuda12 or tpu, e.g. `make lesson EXTRAS=cuda`
PYTHON ?= python3
VENV ?= .venv
EXTRAS ?=
PY := $(VENV)/bin/python
comma := ,
INSTALL_EXTRAS := test$(if $(EXTRAS),$(comma)$(EXTRAS))
STAMP := $(VENV)/.installed-$(subst $(comma),+,$(INSTALL_EXTRAS))

.PHONY: install docs lesson lint test benchmark clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[$(INSTALL_EXTRAS)]'
	touch $(STAMP)

install: $(STAMP)

# Each notebook's source is its jupytext percent script (lesson/*.py); executing writes the paired .ipynb with its
# outputs (kernel python3: this venv's ipykernel), then nbconvert renders it with its plots inline.
docs: $(STAMP)
	mkdir -p runs/docs
	for source in lesson/*.py; do \
	  (cd lesson && $(abspath $(VENV))/bin/jupytext --to ipynb --execute $$(basename $$source)) || exit 1; \
	  $(VENV)/bin/jupyter nbconvert --to html --output-dir runs/docs $${source%.py}.ipynb || exit 1; \
	done

lesson: $(STAMP)
	$(PY) experiments/lesson.py --out runs/lesson

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# pytest exits 5 when it collects no tests; make stops on any non-zero status, so that fails too.
test: lint
	$(PY) -m pytest -n 2

benchmark: $(STAMP)
	$(PY) experiments/benchmark.py --out runs/benchmark

clean:
	rm -rf $(VENV) runs
