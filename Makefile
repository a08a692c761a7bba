# The two commands in the README: `make run` and `make test`. Everything else is a helper.
#
# Everything goes into a project virtualenv, .venv, made from $(PYTHON): never into the system's Python, so this works
# on PEP 668 systems too (`make install PYTHON=/usr/bin/python3` on stock Debian). To start over: rm -rf .venv
PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
VPIP := $(VPY) -m pip
# torch's CPU build first, so sentence-transformers does not pull CUDA (PyPI's Linux wheel is the CUDA build). Where
# PyTorch's index cannot be reached, the same version from the default index (a mirror's or a local CPU wheel).
TORCH := torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
PYTEST_ARGS ?=
# The suite runs in 3 pytest-xdist processes, a module per process at a time (--dist loadfile: a module's shared
# gateway and worker are started once). Half of a serial run's time is waiting on processes and sockets, so 3 fill 2
# cores; 4 measured slower, with timing tests failing under the contention. Tests marked `alone` measure time: they
# run afterwards, one at a time. TEST_WORKERS=0 runs everything serially in one go.
TEST_WORKERS ?= 3

.PHONY: install install-dev run test test-prereqs check bench bytecode

install: $(VENV)/.installed-run  ## Konstruct alone, into .venv (what `make run` needs)

install-dev: $(VENV)/.installed-dev  ## Konstruct with its test and check tools (pytest, playwright, ruff, mypy), into .venv

run: install bytecode  ## first time: konstruct init (it asks for the model and tests it); then konstruct up
	@test -f konstruct.toml || $(VENV)/bin/konstruct init
	$(VENV)/bin/konstruct up

test: test-prereqs install-dev bytecode  ## the whole test suite (real PostgreSQL, real processes, loopback fakes)
	@# The embedding model's ONNX graph, exported once per machine (~5 s) before the processes that use it start
	$(VPY) -c "from konstruct.agent.embedding import load_backend; load_backend('onnx')"
ifeq ($(TEST_WORKERS),0)
	$(VPY) -m pytest $(PYTEST_ARGS)
else
	$(VPY) -m pytest -n $(TEST_WORKERS) --dist loadfile -m "not alone" $(PYTEST_ARGS)
	$(VPY) -m pytest -m alone $(PYTEST_ARGS) || [ $$? -eq 5 ]  # 5: PYTEST_ARGS selected none of them
endif

check: install-dev  ## format, lint and type checks in one go
	$(VPY) -m ruff format --check .
	$(VPY) -m ruff check .
	$(VPY) -m mypy

bench: install-dev bytecode  ## the benchmarks under bench/ (print their figures; not tests)
	$(VPY) bench/foundation.py
	$(VPY) bench/slack_events.py --worker after
	$(VPY) bench/whatsapp_webhooks.py --worker after
	$(VPY) bench/memory_recall.py
	$(VPY) bench/llm_overhead.py

# The editable install's bytecode, compiled now: where PYTHONDONTWRITEBYTECODE is set (CI images, containers) every
# process would otherwise compile Konstruct's modules again as it imports them (~80 ms of each CLI command's 0.6 s of
# imports, measured). Only what changed is compiled again, so this is quick when nothing did.
bytecode: install
	@$(VPY) -m compileall -q konstruct migrations > /dev/null

# What the suite needs outside Python: Chromium for the browser test (tests/browser.py: Debian's, or KONSTRUCT_CHROMIUM)
# fails without it; the Redis queue test skips without redis-server, except under CI=true, where both must be there.
test-prereqs:
	@missing=0; chromium="$${KONSTRUCT_CHROMIUM:-/usr/bin/chromium}"; \
	if [ ! -x "$$chromium" ]; then missing=1; \
	  echo "make test: no Chromium at $$chromium: apt-get install chromium (or point KONSTRUCT_CHROMIUM at one, e.g. from \`$(VPY) -m playwright install chromium\`)"; fi; \
	if ! command -v redis-server >/dev/null 2>&1; then \
	  if [ "$${CI:-}" = true ]; then missing=1; echo "make test: no redis-server (CI=true needs it): apt-get install redis-server"; \
	  else echo "make test: no redis-server, so the Redis queue test is skipped: apt-get install redis-server"; fi; fi; \
	exit $$missing

$(VPY):
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
	  || { echo "make: Konstruct needs Python 3.11 or newer; $(PYTHON) is not: run make with PYTHON=/path/to/python3.11"; exit 1; }
	@$(PYTHON) -m venv $(VENV) \
	  || { rm -rf $(VENV); echo "make: $(PYTHON) could not make a virtualenv: on Debian/Ubuntu apt-get install python3-venv"; exit 1; }
	@echo "made $(VENV) from $$($(PYTHON) -c 'import sys; print(sys.executable)')"

# --timeout/--retries 0: where PyTorch's index cannot be reached, fall back at once instead of after minutes of retries.
$(VENV)/.installed-torch: | $(VPY)
	@$(VPIP) install --quiet --timeout 10 --retries 0 --index-url $(TORCH_INDEX) $(TORCH) \
	  || { echo "make: no $(TORCH) from $(TORCH_INDEX) (see above): installing it from the default index instead"; \
	       $(VPIP) install --quiet $(TORCH); }
	@touch $@

$(VENV)/.installed-run: pyproject.toml $(VENV)/.installed-torch
	$(VPIP) install --quiet -e .
	@touch $@

# The development install includes the runtime one, so it stamps both.
$(VENV)/.installed-dev: pyproject.toml examples/tool-plugin/pyproject.toml $(VENV)/.installed-torch
	$(VPIP) install --quiet -e '.[dev]'
	$(VPIP) install --quiet --no-deps -e examples/tool-plugin
	@touch $@ $(VENV)/.installed-run
