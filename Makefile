# tierstream: the two commands a new user needs are `make demo` and `make test`.
# Each installs what it needs: a virtualenv with the package and its test tools, and the
# Apache Kafka jars from Maven Central (into .cache/, git-ignored).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
KAFKA_STAMP := .cache/.kafka-fetched

.PHONY: install kafka promtool lint test test-chaos test-slow test-fast demo bench router router-eval schemas broker-start broker-stop clean

install: $(STAMP) $(KAFKA_STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# kafka.sh caches under .cache/ in a checkout (TIERSTREAM_CACHE overrides; docs/operations.md).
$(KAFKA_STAMP): streams/broker_files/kafka.sh streams/broker_files/pom.xml
	bash streams/broker_files/kafka.sh fetch
	mkdir -p .cache && touch $@

kafka: $(KAFKA_STAMP)

# promtool checks /metrics and the alert rules in the tests. Not fatal: without it (no
# apt-get, no network) those tests are skipped and say why.
promtool:
	-@bash deploy/prometheus/install-promtool.sh

# The whole suite, end-to-end tests included: they start their own broker (or use
# $$KAFKA_BOOTSTRAP_SERVERS) and the provider simulator.
test: install promtool lint
	$(PY) -m pytest -q -ra -m "not slow" --durations=15

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# The long kill-loop fault run (20,000 requests), by hand; `make test` runs a short one.
test-chaos: install
	$(PY) -m tests.faults kill-loop --requests 20000 --produce-over 240

# The rate-limit tests over two minutes of steady state (make test runs ~35 s versions).
test-slow: install
	$(PY) -m pytest -q -ra -m slow -s

# Only the tests that need no broker.
test-fast: $(STAMP) promtool
	$(PY) -m pytest -q -m "not e2e"

demo: install
	$(VENV)/bin/tierstream demo

# Scenario 1 (zero-latency simulator, one worker) against raw aiokafka baselines and
# Kafka's own perf tools in the same run; see docs/benchmarks.md for scenarios 2-4.
bench: install
	$(VENV)/bin/tierstream bench --scenario 1

# The packaged default router, trained on the routing development data (docs/routing.md).
ROUTING_DATA := benchmarks/routing/mmlu-dev.jsonl
router: $(STAMP)
	$(VENV)/bin/tierstream router train --data $(ROUTING_DATA) --out streams/routing/default.router

# Every routing strategy on the development data, the learned router cross-validated with
# whole subjects held out: the figures and the plot of docs/routing.md.
router-eval: $(STAMP)
	$(VENV)/bin/tierstream router eval --data $(ROUTING_DATA) --cross-validate \
		--save benchmarks/baselines/routing-mmlu-dev.json --plot docs/routing-curves.png
	$(VENV)/bin/python -m benchmarks.classifier --data $(ROUTING_DATA)

schemas: $(STAMP)
	$(PY) -m schemas.export

broker-start: install
	$(VENV)/bin/tierstream broker start

broker-stop: $(STAMP)
	$(VENV)/bin/tierstream broker stop

clean:
	-$(VENV)/bin/tierstream broker stop
	rm -rf $(VENV) .cache .pytest_cache .hypothesis *.egg-info
