# The two commands a new user runs: `make serve` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 8000
export OMP_NUM_THREADS ?= 2

.PHONY: setup tools serve test lint format bench deploy-check clean
# System tools the deploy tests drive for real: Prometheus (+ promtool), nginx, and a compose client to parse
# docker-compose.yml. Installed with apt-get when missing and possible (root); otherwise those tests skip, saying why.
DEPLOY_TOOLS := prometheus promtool nginx docker-compose
# Headless Chromium and its driver for the browser tests of the page at / (tests/app/test_browser.py), same terms.
BROWSER_TOOLS := chromium chromedriver

setup: $(STAMP)

# Reinstall only when the project's dependency list changes.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev,bench]"
	touch $(STAMP)

serve: setup
	$(BIN)/uvicorn app.main:create_app --factory --host $(HOST) --port $(PORT)

tools:
	@missing=""; for t in $(DEPLOY_TOOLS); do command -v $$t >/dev/null 2>&1 || test -x /usr/sbin/$$t || missing=1; done; \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing prometheus, nginx-light, docker-compose with apt-get"; \
		(apt-get install -y -q prometheus nginx-light docker-compose >/dev/null 2>&1 || \
		 (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q prometheus nginx-light docker-compose >/dev/null 2>&1)) || \
		echo "apt-get could not install the deploy tools; the deploy tests that need them will skip"; \
	fi
	@missing=""; for t in $(BROWSER_TOOLS); do command -v $$t >/dev/null 2>&1 || missing=1; done; \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing chromium, chromium-driver with apt-get"; \
		(apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
		 (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null 2>&1)) || \
		echo "apt-get could not install chromium; the browser tests will skip"; \
	fi

test: setup tools
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: setup
	$(BIN)/python -m bench.run

# Real Prometheus on loopback scraping a local uvicorn; every dashboard query must return data (also in make test).
deploy-check: setup tools
	$(BIN)/python -m deploy.check

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
