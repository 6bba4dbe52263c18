# `make test` and `make demo` work from a fresh clone: they create .venv first if missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test demo clean

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements.txt
	$(PY) -m pip install --no-deps -e .
	touch $(STAMP)

NOTEBOOKS := distillation.ipynb visualization.ipynb benchmarking.ipynb

# CI=1 switches the notebooks' parameters to their small offline configuration (digits);
# they share runs/ci-digits, which starts empty so that results are never stale.
test: install
	rm -rf runs/ci-digits
	CI=1 $(PY) -m pytest tests $(NOTEBOOKS) --nbval-lax

demo: install
	$(PY) -m mtt demo --out demo

clean:
	rm -rf $(VENV) .pytest_cache
