# medplib: `make run` (set-up + the whole pipeline on the synthetic default), `make test` (set-up + the suite).
PYTHON ?= python3.11
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.medplib-installed
export DVC_NO_ANALYTICS = 1
export PREFECT_SERVER_ANALYTICS_ENABLED = false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS = 120
export RAY_AUTH_MODE = disabled
export TOKENIZERS_PARALLELISM = false

.PHONY: setup run test clean-state

setup: $(STAMP)

# Idempotent: the venv is created once; packages are reinstalled only when the lock or pyproject changes.
$(STAMP): requirements.lock pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	@touch $(STAMP)

run: setup
	$(VENV)/bin/medplib pipeline

test: setup
	$(PY) -m pytest tests

clean-state:
	rm -rf .medplib
