# One entry point for developers and CI. `make test` and `make run` work on a fresh machine:
# they create .venv, build the Cython extension and install what the tests need.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
NODE_MODULES := tests/e2e/node/node_modules

.PHONY: run build prereqs test test-fast test-pure bench bench-smoke lint fuzz clean

$(STAMP): pyproject.toml setup.py src/relaycore/_fastpath.pyx
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	RELAYCORE_BUILD_EXTENSION=yes $(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

$(NODE_MODULES): tests/e2e/node/package.json tests/e2e/node/package-lock.json
	npm ci --prefix tests/e2e/node --no-audit --no-fund
	touch $(NODE_MODULES)

build: $(STAMP)
	RELAYCORE_BUILD_EXTENSION=yes $(PY) -m pip install --quiet -e .

run: $(STAMP)
	$(PY) -m relaycore serve

# What `make test` needs beyond Python: each missing tool is named with its Debian package.
prereqs:
	@missing=""; \
	command -v node >/dev/null || missing="$$missing nodejs"; \
	command -v npm >/dev/null || missing="$$missing npm"; \
	command -v cc >/dev/null || command -v gcc >/dev/null || missing="$$missing gcc"; \
	command -v chromium >/dev/null || command -v chromium-browser >/dev/null \
	  || command -v google-chrome >/dev/null || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
	  echo "make test needs:$$missing (Debian: apt-get install$$missing; .ci/run installs them)" >&2; \
	  exit 2; \
	fi

# The whole suite twice (Cython fast path, then the pure-Python twin), then every benchmark
# once in smoke mode so that none can rot.
test: prereqs $(STAMP) $(NODE_MODULES)
	RELAYCORE_REQUIRE_EXTENSIONS=1 $(PY) -m pytest -q
	RELAYCORE_NO_EXTENSIONS=1 $(PY) -m pytest -q
	$(MAKE) bench-smoke

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not e2e"

test-pure: $(STAMP) $(NODE_MODULES)
	RELAYCORE_NO_EXTENSIONS=1 $(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m pytest bench/bench_fastpath.py --benchmark-only -q
	$(PY) bench/fanout.py
	sh bench/peers/setup.sh
	$(PY) bench/run.py --runs 3

bench-smoke: $(STAMP)
	$(PY) -m pytest bench/bench_fastpath.py --benchmark-disable -q
	$(PY) bench/fanout.py --smoke
	$(PY) bench/hostile.py --smoke
	$(PY) bench/run.py --smoke

lint: $(STAMP)
	$(PY) -m ruff check src tests bench
	$(PY) -m mypy

# Every harness of fuzz/ for FUZZ_SECONDS each, one after the other, with the inputs each
# executed (fuzz/README.md). atheris (the [fuzz] extra) makes it coverage-guided; where it has
# no wheel the harnesses fall back to random mutation.
FUZZ_SECONDS ?= 60
fuzz: $(STAMP)
	@$(PY) -c 'import atheris' 2>/dev/null || $(PY) -m pip install --quiet 'atheris>=2.3' \
	  || echo "make fuzz: atheris did not install; the harnesses use random mutation" >&2
	$(PY) fuzz/run.py --seconds $(FUZZ_SECONDS)

clean:
	rm -rf $(VENV) build dist src/*.egg-info src/relaycore/_fastpath.c src/relaycore/*.so
