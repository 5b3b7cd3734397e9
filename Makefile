# Two commands for a newcomer: `make demo` and `make test`. Both build ./.venv when it is missing;
# `make test` also builds ./.venv-composer (the Composer integration's torch 2.7.0 stack).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.es-stream-installed
# Composer 0.32.1 pins torch 2.6-2.7.0: its tests run in a second environment on that stack.
CVENV  := .venv-composer
CPY    := $(CVENV)/bin/python
CSTAMP := $(CVENV)/.es-stream-installed
# What the Composer environment runs (`make test COMPOSER_TESTS=tests` runs the whole suite there).
COMPOSER_TESTS ?= tests/test_composer*.py tests/test_streaming_dataset*.py

.PHONY: venv test demo bench clean

venv: $(STAMP) $(CSTAMP)

# The pinned stack lives in requirements/lock.txt (torch 2.14.1 + torchvision 0.29.1, the pair
# mosaicml-streaming imports). The package itself is installed editable without deps so the lock
# alone decides versions.
$(STAMP): requirements/lock.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet -r requirements/lock.txt
	$(VPY) -m pip install --quiet --no-deps -e .
	touch $@

$(CSTAMP): requirements/composer-lock.txt pyproject.toml
	$(PYTHON) -m venv $(CVENV)
	$(CPY) -m pip install --quiet --upgrade pip
	$(CPY) -m pip install --quiet -r requirements/composer-lock.txt
	$(CPY) -m pip install --quiet --no-deps -e .
	touch $@

# pytest exits 5 when it collected no tests: for us that means a broken collection, so it fails.
# 1. the whole suite on the pinned stack (torch 2.14.1; the Composer tests skip there);
# 2. the Composer environment (torch 2.7.0 + mosaicml 0.32.1): Composer must import (else its
#    tests would pass by skipping), the whole suite must collect cleanly there too, then
#    COMPOSER_TESTS run. Both environments run even if the first fails.
test: $(STAMP) $(CSTAMP)
	@$(VPY) -m pytest -q tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests - failing on purpose"; rc=1; fi; \
	echo "make test: Composer environment ($(CVENV))"; \
	$(CPY) -c "import composer, streaming, es_stream.integrations.composer"; crc=$$?; \
	if [ $$crc -ne 0 ]; then echo "make test: $(CVENV) cannot import Composer - its tests would only skip"; \
	elif ! $(CPY) -m pytest -q --collect-only tests > $(CVENV)/collect.log; then crc=1; \
		tail -20 $(CVENV)/collect.log; echo "make test: the suite does not collect in $(CVENV)"; \
	else $(CPY) -m pytest -q $(COMPOSER_TESTS); crc=$$?; \
		if [ $$crc -eq 5 ]; then echo "make test: pytest collected no Composer tests - failing on purpose"; crc=1; fi; \
	fi; \
	if [ $$rc -ne 0 ]; then exit $$rc; fi; exit $$crc

demo: $(STAMP)
	$(VPY) -m pipelines.demo --out demo_out

bench: $(STAMP)
	$(VPY) tools/bench_stream.py

clean:
	rm -rf $(VENV) $(CVENV) demo_out
