# llmos: the two commands a newcomer needs are `make run` and `make test` (see README.md).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
SYSTEM_PYTHON ?= python3
MODEL ?= smollm2
PROMPT ?= What is the capital of France?

.PHONY: run test install dev lint lint-fast bench clean console test-tools

## run: install llmos into $(VENV), pull the default model, stream an answer, then serve the OpenAI API
run: install
	$(VENV)/bin/llmos pull $(MODEL)
	$(VENV)/bin/llmos run $(MODEL) "$(PROMPT)" --temperature 0 --verbose
	$(VENV)/bin/llmos serve --model $(MODEL)

## test: install the dev tools too, then lint, type-check, check import layers and run the whole test suite
# mypy (a minute of one core) runs beside the unit tests, which leave the second core idle; then the rest
test: dev lint-fast test-tools
	@rm -f .mypy.rc; ($(VENV)/bin/mypy src > .mypy.log 2>&1; echo $$? > .mypy.rc) &
	$(VENV)/bin/pytest tests/unit; unit=$$?; while [ ! -s .mypy.rc ]; do sleep 1; done; \
		cat .mypy.log; mypy=$$(cat .mypy.rc); rm -f .mypy.rc .mypy.log; \
		[ $$unit = 0 ] && [ $$mypy = 0 ] || { echo "unit tests: $$unit, mypy: $$mypy" >&2; exit 1; }
	$(VENV)/bin/pytest tests/integration tests/e2e

lint-fast: dev
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/lint-imports

lint: dev
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy src
	$(VENV)/bin/lint-imports

install: $(VENV)/.installed
dev: $(VENV)/.installed-dev

# scripts/install.sh compiles llama.cpp for this CPU (cached per machine) while the other dependencies install; its
# last step checks llama.cpp's fast CPU path where the CPU advertises AMX and, if it faults there, adds a build without
# AMX that keeps weight repacking (see scripts/build_llama_cpp.sh); elsewhere it does nothing.
INSTALL_DEPS := pyproject.toml scripts/install.sh scripts/build_llama_cpp.sh $(wildcard scripts/patches/*.patch)

$(VENV)/.installed: $(INSTALL_DEPS)
	scripts/install.sh $(VENV) $(SYSTEM_PYTHON) llamacpp
	touch $@

$(VENV)/.installed-dev: $(INSTALL_DEPS)
	scripts/install.sh $(VENV) $(SYSTEM_PYTHON) llamacpp,torch,bench,eval,dev
	touch $(VENV)/.installed $@

## test-tools: the Debian programs the tests drive: chromium (the console's browser tests, through Playwright; nothing
## is downloaded by Playwright), promtool (from the prometheus package: `promtool check metrics` on /metrics) and the
## PostgreSQL server (the tests start their own on a free loopback port; tests/postgres.py), iproute2 (`ip netns`,
## `ss`: the multi-node Ray cluster in network namespaces, tests/multinode.py). A policy-rc.d that
## refuses service starts keeps the package from starting a system cluster, should a service manager exist.
test-tools:
	@missing=""; [ -x /usr/bin/chromium ] || missing="chromium"; \
	command -v promtool >/dev/null 2>&1 || missing="$$missing prometheus"; \
	ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || missing="$$missing postgresql"; \
	{ command -v ip && command -v ss; } >/dev/null 2>&1 || missing="$$missing iproute2"; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq || exit 1; \
			rc=/usr/sbin/policy-rc.d; ours=""; \
			if [ ! -e $$rc ]; then printf '#!/bin/sh\nexit 101\n' > $$rc; chmod +x $$rc; ours=1; fi; \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
			status=$$?; if [ -n "$$ours" ]; then rm -f $$rc; fi; exit $$status; \
		else echo "the tests need: sudo apt-get install $$missing" >&2; exit 1; fi; fi

## console: rebuild the web console (console/, Preact + TypeScript + Vite) into src/llmos/console/static
console:
	cd console && npm ci --no-audit --no-fund && npm run build

## bench: llmos against llama-cpp-python: the SDK against llama_cpp.Llama, the server against llama_cpp.server
bench: install
	$(PIP) install --quiet -e '.[llamacpp,bench]' --find-links "$$(scripts/build_llama_cpp.sh $(PY))"
	$(PY) benchmarks/bench_sdk.py
	$(VENV)/bin/llmos bench

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
