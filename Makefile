# Two commands for a newcomer: `make demo` and `make test`. Both build ./.venv when it is missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.es-stream-installed

.PHONY: venv test demo bench clean

venv: $(STAMP)

# The pinned stack lives in requirements/lock.txt (torch 2.14.1 + torchvision 0.29.1, the pair
# mosaicml-streaming imports). The package itself is installed editable without deps so the lock
# alone decides versions.
$(STAMP): requirements/lock.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet -r requirements/lock.txt
	$(VPY) -m pip install --quiet --no-deps -e .
	touch $@

# pytest exits 5 when it collected no tests: for us that means a broken collection, so it fails.
test: $(STAMP)
	@$(VPY) -m pytest -q tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests - failing on purpose"; exit 1; fi; \
	exit $$rc

demo: $(STAMP)
	$(VPY) -m pipelines.demo --out demo_out

bench: $(STAMP)
	$(VPY) tools/bench_stream.py

clean:
	rm -rf $(VENV) demo_out
