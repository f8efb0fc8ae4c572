# The two commands of the README: `make demo` (set up, then run the main job on the embedded tiny model)
# and `make test` (set up, then run the test suite). Both create .venv with Python 3.12 and the pinned
# versions of constraints.txt; nothing needs a model hub.

PYTHON ?= $(shell for p in python3.12 $$HOME/.pyenv/versions/3.12*/bin/python3.12; do \
	$$p -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && echo $$p && break; done)
VENV := .venv
# setuptools reports an editable install of a package-dir mapping (kernels/ -> fastlora_jax.kernels) as a
# UserWarning ("Editable installation ... be careful with folders"); it is information, not a problem.
PIP := PYTHONWARNINGS=ignore::UserWarning $(VENV)/bin/python -m pip
PYTEST_ARGS ?=

.PHONY: demo test setup setup-test clean

$(VENV)/bin/python:
	@test -n "$(PYTHON)" || { echo "Python 3.12 not found: install it or run make PYTHON=/path/to/python3.12"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.installed: $(VENV)/bin/python pyproject.toml constraints.txt
	$(PIP) install -q -c constraints.txt -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -q -c constraints.txt -e '.[test]'
	touch $@

setup: $(VENV)/.installed
setup-test: $(VENV)/.installed-test

demo: setup
	$(VENV)/bin/fastlora-jax demo

test: setup-test
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs
