# flowgate: `make up` brings the whole local stack up, `make test` runs every test.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
KUSTOMIZE_VERSION := v5.5.0
# Tools installed into the venv (kustomize) are found by the tests.
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: bootstrap bootstrap-up install kustomize engine engine-operaton up down ps logs \
	deploy-bpmn test test-operaton test-fast test-cluster lint format bench bench-smoke clean

# System packages (Redis, PostgreSQL, nginx, wrk, JDK, Maven, venv): installs what is missing
# as root, or prints the one command to run (deploy/local/bootstrap.py holds the list).
bootstrap:
	@python3 deploy/local/bootstrap.py

# Only what `make up` runs here: compose where a Docker engine answers, else the native stack.
bootstrap-up:
	@python3 deploy/local/bootstrap.py --for up

install: bootstrap $(STAMP)

$(STAMP): pyproject.toml clients/python/pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[tracing]' -e clients/python --group dev --group bench
	touch $(STAMP)

# kustomize renders deploy/k8s for the manifest tests (only they need Go): built from the
# Go module proxy into the venv unless one is on PATH.
kustomize: $(STAMP)
	@command -v kustomize >/dev/null || test -x $(VENV)/bin/kustomize || \
	  GOBIN=$(abspath $(VENV)/bin) go install sigs.k8s.io/kustomize/kustomize/v5@$(KUSTOMIZE_VERSION)

# The Camunda engine jar (deploy/camunda); rebuilt only when its sources change.
engine: $(STAMP)
	$(PY) -c "from deploy.local.servers import build_engine; print(build_engine('camunda'))"

engine-operaton: $(STAMP)
	$(PY) -c "from deploy.local.servers import build_engine; print(build_engine('operaton'))"

# The whole local stack as native background processes (see deploy/local/stack.py).
up: bootstrap-up $(STAMP)
	$(PY) -m deploy.local.stack up

down:
	@if [ -x $(PY) ]; then $(PY) -m deploy.local.stack down; else echo "nothing to stop"; fi

ps: $(STAMP)
	$(PY) -m deploy.local.stack ps

logs: $(STAMP)
	$(PY) -m deploy.local.stack logs

# Deploy every bpmn/*.bpmn to CAMUNDA_BASE_URL (duplicates are filtered by the engine).
deploy-bpmn: $(STAMP)
	$(PY) -m flowgate.shared.deployment

# Every test, starting the real servers it needs (Redis, Postgres, the Camunda engine).
test: bootstrap $(STAMP) engine kustomize
	$(PY) -m pytest

# The engine-facing tests against Operaton (deploy/camunda/pom.xml, profile `operaton`).
test-operaton: bootstrap $(STAMP) engine-operaton
	FLOWGATE_ENGINE=operaton $(PY) -m pytest -m "engine and not engine_agnostic"

test-fast: $(STAMP) kustomize
	$(PY) -m pytest tests/unit

# Every test on a native Redis Cluster (three masters, a replica each) instead of one Redis.
test-cluster: bootstrap $(STAMP) engine kustomize
	FLOWGATE_TEST_REDIS=cluster $(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: bootstrap $(STAMP) engine
	$(PY) -m bench

bench-smoke: bootstrap $(STAMP) engine
	$(PY) -m bench --smoke

clean:
	rm -rf $(VENV) deploy/camunda/target .run
