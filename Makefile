# The two commands a new user runs: `make serve` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 8000
export OMP_NUM_THREADS ?= 2

.PHONY: setup tools serve test lint format docs docs-check bench load deploy-check clean
# System packages the tests drive for real, installed with apt-get when missing and possible (root); otherwise the
# tests that need them skip, saying why. $(call apt_ensure,WHAT,CHECK,PACKAGES): install PACKAGES unless CHECK passes.
define apt_ensure
	@if ! ( $(2) ) >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing $(3) with apt-get"; \
			(apt-get install -y -q $(3) >/dev/null 2>&1 || \
			 (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q $(3) >/dev/null 2>&1)) || \
			echo "apt-get could not install $(3); the $(1) tests that need them will skip"; \
		fi; \
	fi
endef
have = { command -v $(1) || test -x /usr/sbin/$(1); }

setup: $(STAMP)

# Reinstall only when the project's dependency list changes.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev,bench]"
	touch $(STAMP)

serve: setup
	$(BIN)/uvicorn app.main:create_app --factory --host $(HOST) --port $(PORT)

# Prometheus (+ promtool), nginx and a compose client (deploy tests); headless Chromium and its driver (browser tests
# of the page at /); WordNet 3.0 (everyday captions and labels of the tiny CLIP, training tests).
tools:
	$(call apt_ensure,deploy,$(call have,prometheus) && $(call have,promtool) && $(call have,nginx) && \
		$(call have,docker-compose),prometheus nginx-light docker-compose)
	$(call apt_ensure,browser,$(call have,chromium) && $(call have,chromedriver),chromium chromium-driver)
	$(call apt_ensure,WordNet,test -f /usr/share/wordnet/data.noun,wordnet-base)

test: setup tools
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The tables of figures in README.md and docs/*.md, rendered anew from the committed reports (seconds); the check
# changes nothing and fails on a stale block (tests/test_docs.py runs it too).
docs: setup
	$(BIN)/python -m docs.generate

docs-check: setup
	$(BIN)/python -m docs.generate --check

bench: setup
	$(BIN)/python -m bench.run

# Long soak of a real uvicorn: 2,000 varied requests at concurrency 16, then six concurrent 40 MB bodies; zero 5xx
# or it fails. Figures (statuses, req/s, server RSS before/after/peak) to bench/results/load-*.json and .md.
load: setup
	$(BIN)/python -m bench.load

# Real Prometheus on loopback scraping a local uvicorn; every dashboard query must return data (also in make test).
deploy-check: setup tools
	$(BIN)/python -m deploy.check

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
