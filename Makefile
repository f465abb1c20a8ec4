# The two commands a newcomer needs: `make run` and `make test`.
VENV    := .venv
PYTHON  := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
ARGS    ?=
# Debian packages the integration tests drive: real clients, a real identd,
# network namespaces, the BIND client (socksify), a SOCKS4 server we did not write
# (danted), gcc for the benchmark's smoke test, HAProxy in front of two servers
# and systemd-analyze for the service units.
TEST_DEBS := curl oidentd dante-client dante-server iproute2 util-linux netbase gcc haproxy systemd

.PHONY: run test test-unit test-tools typecheck venv mutate mutate-score bench bench-full bench-relay bench-tools clean fuzz fuzz-ci soak

venv: $(STAMP)

$(STAMP): setup.py
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check \
		--config-settings editable_mode=compat -e '.[test,typecheck]'
	$(PYTHON) -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
	touch $@

run: $(STAMP)
	$(VENV)/bin/twistd --nodaemon --pidfile= socks4 $(ARGS)

test-tools:
	@missing=""; for pkg in $(TEST_DEBS); do \
		dpkg -s $$pkg >/dev/null 2>&1 || missing="$$missing $$pkg"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then \
		echo "installing Debian packages:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	else \
		echo "not root: cannot install$$missing; the tests that need them will skip"; \
	fi

test: $(STAMP) test-tools typecheck
	$(PYTHON) -m pytest -ra tests
	$(MAKE) fuzz-ci

# Coverage-guided fuzzing (atheris, from pip): `make fuzz FUZZ_SECONDS=600` runs
# each target in fuzz/ that long; CI runs each for $(FUZZ_CI_SECONDS) s when
# atheris installs, and must under SOCKSIDENT_STRICT_TESTS=1.
FUZZ_SECONDS    ?= 60
FUZZ_CI_SECONDS := 10

fuzz: $(STAMP)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check atheris
	$(PYTHON) fuzz/run.py --seconds $(FUZZ_SECONDS)

fuzz-ci: $(STAMP)
	@if $(PYTHON) -m pip install --quiet --disable-pip-version-check atheris; then \
		$(PYTHON) fuzz/run.py --seconds $(FUZZ_CI_SECONDS); \
	elif [ -n "$$SOCKSIDENT_STRICT_TESTS" ]; then \
		echo "atheris does not install: the fuzz targets must run under SOCKSIDENT_STRICT_TESTS"; \
		exit 1; \
	else \
		echo "atheris does not install here: fuzz targets skipped"; \
	fi

# The long soak: at least 100,000 requests through one real twistd.
SOAK_REQUESTS ?= 100000

soak: $(STAMP) test-tools
	SOCKSIDENT_SOAK_REQUESTS=$(SOAK_REQUESTS) $(PYTHON) -m pytest -ra -s tests/integration/test_soak.py

typecheck: $(STAMP)
	$(PYTHON) -m mypy

test-unit: $(STAMP)
	$(PYTHON) -m pytest -ra tests --ignore=tests/integration

# Mutation testing (mutmut, configured in setup.cfg [mutmut]) against the unit
# tests; not part of `make test`: the whole package takes long.  Name modules to
# mutate only those: `make mutate MUTATE="socksident/socks4.py socksident/ident.py"`.
# The score per module discounts the mutants listed in tests/mutation/equivalent.txt.
# Two children: the test machine has two cores.  The first run also generates
# mutants/ and collects which tests reach which function (tests/conftest.py keeps
# that stats run clear of a CPython 3.11 contextvars crash); later runs reuse both.
MUTATE ?=
MUTATE_CHILDREN ?= 2
MUTATE_NAMES = $(if $(strip $(MUTATE)),$(foreach m,$(MUTATE),'$(subst /,.,$(m:.py=)).*'),'socksident.*')

mutate: $(STAMP)
	ulimit -s unlimited 2>/dev/null || true; $(VENV)/bin/mutmut run --max-children $(MUTATE_CHILDREN) $(MUTATE_NAMES) > mutants.log 2>&1 || { tail -n 40 mutants.log; exit 1; }
	$(PYTHON) tests/mutation/score.py $(MUTATE)

mutate-score: $(STAMP)
	$(PYTHON) tests/mutation/score.py $(MUTATE)

# The benchmark (benchmarks/bench.py): never part of `make test`.  It installs
# what it compares against: Dante, oidentd, gcc for its C load generator, and
# matplotlib for its plot.
BENCH_DEBS  := dante-server oidentd gcc iproute2 util-linux
BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): $(STAMP) setup.py
	$(PYTHON) -m pip install --quiet --disable-pip-version-check \
		--config-settings editable_mode=compat -e '.[test,typecheck,bench]'
	touch $@

bench-tools:
	@$(MAKE) --no-print-directory test-tools TEST_DEBS="$(BENCH_DEBS)"

bench: $(BENCH_STAMP) bench-tools
	$(PYTHON) benchmarks/bench.py $(ARGS)

bench-full: $(BENCH_STAMP) bench-tools
	$(PYTHON) benchmarks/bench.py --full $(ARGS)

bench-relay: $(STAMP)
	$(PYTHON) benchmarks/relay_throughput.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache mutants mutants.log
