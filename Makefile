# The two commands a newcomer needs: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Re-install whenever the project's dependencies change.
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck unit unit-postgres smoke env bench endpoints clean lock

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# pip first, from its own lock: the pip a venv bundles can fail on today's index
# (scripts/lock.py says why).
PIP_STAMP := $(VENV)/.pip
$(PIP_STAMP): requirements-pip.lock | $(BIN)/python
	$(BIN)/python -m pip install --quiet --require-hashes -r requirements-pip.lock
	touch $@

# Everything from the hashed lock files (scripts/lock.py), then pinauth itself alone.
LOCKS := requirements-dev.lock requirements.lock requirements-build.lock requirements-pip.lock

$(STAMP): pyproject.toml $(LOCKS) $(PIP_STAMP)
	$(BIN)/python scripts/lock.py --check
	$(BIN)/python -m pip install --quiet --require-hashes \
		-r requirements-dev.lock -r requirements-build.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

# Re-resolve the locks after editing dependencies in pyproject.toml; versions already
# locked stay. `make lock ARGS=--upgrade` moves every pin to the newest allowed.
lock: | $(PIP_STAMP)
	$(BIN)/python scripts/lock.py $(ARGS)

# A first run writes a .env with fresh keys, so nobody has to generate them by hand.
.env: | $(STAMP)
	$(BIN)/python -m pinauth.dotenv .env

env: .env

# With Pinterest credentials (environment or .env) the real Pinterest is used;
# without them, the demo: pinauth and its built-in sandbox on http://localhost:8000/.
run: export PINAUTH_LOG_FORMAT ?= text
run: $(STAMP) .env
	@if [ -n "$$PINTEREST_CLIENT_ID" ] || grep -Eq '^PINTEREST_CLIENT_ID=.+' .env; then \
		$(BIN)/pinauth serve; \
	else \
		$(BIN)/pinauth serve --demo; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check src tests alembic bench scripts
	$(BIN)/ruff format --check src tests alembic bench scripts
	$(BIN)/hadolint Dockerfile

# What `docker run` would do, without a Docker engine (see scripts/container_smoke.py).
smoke: $(STAMP)
	$(BIN)/python scripts/container_smoke.py

typecheck: $(STAMP)
	$(BIN)/mypy

# The suite runs twice: on SQLite, then on PostgreSQL (a fresh database per run).
POSTGRES_TEST_URL ?= postgresql+asyncpg://postgres@127.0.0.1:5432/test

# The SQLite run measures branch coverage and fails below the floor in pyproject.toml
# ([tool.coverage.report] fail_under); the modules that handle credentials, sessions and
# security headers must stay at 100% of their branches.
SECURITY_MODULES := */pinauth/api/deps.py,*/pinauth/apikeys.py,*/pinauth/cache.py,*/pinauth/crypto.py,*/pinauth/security_headers.py

unit: $(STAMP)
	$(BIN)/pytest --cov --cov-report=term-missing:skip-covered
	$(BIN)/coverage report --include='$(SECURITY_MODULES)' --fail-under=100

# Skipped, with one loud line, where no server answers (a fresh machine); CI sets
# PINAUTH_REQUIRE_POSTGRES=1, and then a missing server fails the run.
unit-postgres: $(STAMP)
	@why=$$($(BIN)/python -c 'import asyncio, sys; from pinauth.preflight import postgres_unreachable; print(asyncio.run(postgres_unreachable(sys.argv[1], 3)) or "")' '$(POSTGRES_TEST_URL)'); \
	if [ -z "$$why" ]; then \
		echo "PINAUTH_TEST_POSTGRES_URL=$(POSTGRES_TEST_URL) $(BIN)/pytest"; \
		PINAUTH_TEST_POSTGRES_URL='$(POSTGRES_TEST_URL)' $(BIN)/pytest; \
	elif [ "$$PINAUTH_REQUIRE_POSTGRES" = 1 ]; then \
		echo "make unit-postgres: PostgreSQL is required here (PINAUTH_REQUIRE_POSTGRES=1): $$why" >&2; \
		exit 1; \
	else \
		echo "######## SKIPPED the PostgreSQL run of the suite: $$why (start PostgreSQL or set POSTGRES_TEST_URL=postgresql+asyncpg://…) ########"; \
	fi

test: lint typecheck unit unit-postgres smoke

# Not part of `make test`: timings belong in a benchmark, not in pass/fail tests.
bench: $(STAMP)
	$(BIN)/python bench/run.py $(ARGS)

# After updating spec/pinterest/openapi.yaml: regenerate what pinauth derives from it.
endpoints: $(STAMP)
	$(BIN)/python scripts/gen_endpoints.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage
