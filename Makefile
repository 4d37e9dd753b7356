# Fleetplane developer commands. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help
PY := .venv/bin/python
STACK := infra/local/stack.sh
PYTEST_ARGS ?=
ONLY ?=

.PHONY: help
help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

.PHONY: setup
setup: ## install what is missing: Debian packages, .venv, Kafka jars, dev PKI
	bash infra/local/setup.sh

.PHONY: up
up: setup ## start Kafka, PostgreSQL and nginx, create topics, migrate the database
	bash $(STACK) up
	$(PY) -m services.shared.topics
	$(PY) -m services.shared.migrate

.PHONY: down
down: ## stop Kafka, PostgreSQL and nginx
	bash $(STACK) down

.PHONY: status
status: ## show what is running
	bash $(STACK) status

.PHONY: run
run: ## set up, start everything natively, drive it with simulated agents (Ctrl-C stops)
	bash infra/local/run.sh

.PHONY: stop
stop: ## stop everything `make run` started
	bash infra/local/stop-run.sh
	-bash infra/local/demo.sh stop
	bash infra/local/services.sh stop
	bash infra/local/observability.sh stop
	bash $(STACK) down

.PHONY: lint
lint: ## ruff (lint and format check) and mypy --strict
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy services tests bench

.PHONY: test-unit
test-unit: ## unit tests only (no services needed)
	.venv/bin/pytest tests/unit --durations=25 $(PYTEST_ARGS)

.PHONY: test
test: setup ## set up, start the stack, run lint and the whole suite, stop the stack
	$(MAKE) lint
	bash $(STACK) up
	set -o pipefail; status=0; \
	.venv/bin/pytest tests --durations=25 $(PYTEST_ARGS) || status=$$?; \
	bash $(STACK) down; exit $$status

.PHONY: bench
# The accept section drives the edge as fast as 200 agents can send: the per-agent
# rate and connection limits are lifted so it measures capacity, not policy.
bench: export FLEETPLANE_EDGE_AGENT_RATE ?= 1000000
bench: export FLEETPLANE_EDGE_AGENT_BURST ?= 1000000
bench: export FLEETPLANE_EDGE_AGENT_CONN ?= 10000
bench: setup ## run benchmarks (all sections, or ONLY=<section>) into bench/results/latest.json
	bash $(STACK) down
	bash $(STACK) up
	set -o pipefail; status=0; \
	$(PY) -m bench $(if $(ONLY),--only $(ONLY)) || status=$$?; \
	bash $(STACK) down; exit $$status

.PHONY: lock
lock: ## re-pin requirements.lock from the current .venv
	(echo "# Every package, pinned: the reproducible install of .venv (python 3.11)."; \
	 echo "# Regenerate after changing pyproject.toml: make lock"; \
	 .venv/bin/pip freeze --exclude-editable | grep -v "^fleetplane") > requirements.lock
