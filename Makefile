# The two commands in the README: `make run` and `make test`. Everything else is a helper.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install run test check bench

install:  ## install Konstruct with its test tools (torch's CPU build first, so nothing pulls CUDA)
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dev]'
	$(PIP) install --quiet --no-deps -e examples/tool-plugin

run: install  ## first time: konstruct init; then konstruct up on the embedded defaults
	@test -f konstruct.toml || $(PYTHON) -m konstruct init
	$(PYTHON) -m konstruct up

test: install  ## the whole test suite (real PostgreSQL, real processes, loopback fakes)
	$(PYTHON) -m pytest

check:  ## format, lint and type checks in one go
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m ruff check .
	$(PYTHON) -m mypy

bench: install  ## the benchmarks under bench/ (print their figures; not tests)
	$(PYTHON) bench/foundation.py
	$(PYTHON) bench/slack_events.py --worker after
	$(PYTHON) bench/whatsapp_webhooks.py --worker after
	$(PYTHON) bench/memory_recall.py
	$(PYTHON) bench/llm_overhead.py
