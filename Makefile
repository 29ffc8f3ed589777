# One-command entry points. Each creates .venv if missing and installs the project into it.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test quickstart bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

quickstart: $(STAMP)
	$(VENV)/bin/chartvlm quickstart --config configs/quickstart.yaml

bench: $(STAMP)
	$(VENV)/bin/chartvlm bench train
	$(VENV)/bin/chartvlm bench eval
	$(VENV)/bin/chartvlm bench serve

clean:
	rm -rf output .cache
