# The two commands a newcomer needs: `make run` and `make test`.
VENV    := .venv
PYTHON  := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
ARGS    ?=
# Debian packages the integration tests drive: real clients, a real identd,
# network namespaces and the BIND client (socksify).
TEST_DEBS := curl oidentd dante-client iproute2 util-linux netbase

.PHONY: run test test-unit test-tools typecheck venv bench clean bench-compare

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

typecheck: $(STAMP)
	$(PYTHON) -m mypy

test-unit: $(STAMP)
	$(PYTHON) -m pytest -ra tests --ignore=tests/integration

bench: $(STAMP)
	$(PYTHON) benchmarks/relay_throughput.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

bench-compare: $(STAMP)
	$(PYTHON) benchmarks/compare.py
