# medplib: `make run` (set-up + the whole pipeline on the synthetic default), `make test` (set-up + the whole suite,
# all tiers: what CI runs), `make test-fast` (the unit tier, for every change).
PYTHON ?= python3.11
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.medplib-installed
export DVC_NO_ANALYTICS = 1
export PREFECT_SERVER_ANALYTICS_ENABLED = false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS = 120
export RAY_AUTH_MODE = disabled
export TOKENIZERS_PARALLELISM = false

.PHONY: setup java postgres chromium run test test-fast clean-state

setup: java $(STAMP)

# A Java runtime for pycocoevalcap, whose PTB tokenizer and METEOR (jars and paraphrase data shipped in its wheel)
# score the refer captions. Installed with apt-get when missing (as root, or through sudo).
java:
	@if ! command -v java >/dev/null; then \
	  echo "installing Debian's default-jre-headless (Java for pycocoevalcap's tokenizer and METEOR)"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null; then SUDO=sudo; \
	  else echo "No java, and neither root nor sudo to install it: apt-get install default-jre-headless" >&2; exit 1; fi; \
	  { $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    $$SUDO apt-get install -y -qq --no-install-recommends default-jre-headless >/dev/null; } \
	    || { echo "apt-get could not install default-jre-headless (see above)" >&2; exit 1; }; \
	  command -v java >/dev/null || { echo "default-jre-headless installed no java on PATH" >&2; exit 1; }; \
	fi

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

# Debian's PostgreSQL server binaries, for the cluster-mode test of the registry on a real MLflow + PostgreSQL
# (tests/cluster). Installed with apt-get when missing (as root, or through sudo).
postgres:
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
	  echo "installing Debian's postgresql (server binaries for tests/cluster)"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null; then SUDO=sudo; \
	  else echo "PostgreSQL is missing and neither root nor sudo can install it: apt-get install postgresql" >&2; exit 1; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq postgresql >/dev/null; \
	  ls /usr/lib/postgresql/*/bin/initdb >/dev/null; \
	fi

# Headless Chromium for the browser tests (tests/serve/browser.py), from the npm registry: infra/chromium.sh (node
# and npm needed; nothing is fetched when $(VENV)/chromium holds the pinned version).
chromium:
	@bash infra/chromium.sh $(VENV)/chromium

# The suite runs in TEST_WORKERS pytest-xdist processes (tests/conftest.py keeps the tests sharing a trained session
# fixture in one process); TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= 2

test: setup postgres chromium
	$(PY) -m pytest -n $(TEST_WORKERS) tests

test-fast: setup
	$(PY) -m pytest -n $(TEST_WORKERS) tests -m unit

clean-state:
	rm -rf .medplib
