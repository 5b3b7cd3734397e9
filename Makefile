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

.PHONY: venv test demo bench bench-training clean

venv: $(STAMP) $(CSTAMP)

# Fail before pip does, with the reason: $(call need_disk,WHAT,MB) stops unless MB megabytes are
# free on this disk (the peak measured while building WHAT from a clean clone).
need_disk = @free=$$(df -Pm . | awk 'NR==2 {print $$4}'); if [ "$$free" -lt $(2) ]; then \
	echo "make: building $(1) needs about $(2) MB free on this disk and $$free MB are; free some space and run make again"; \
	exit 1; fi

# The pinned stack lives in requirements/lock.txt (torch 2.14.1 + torchvision 0.29.1, the pair
# mosaicml-streaming imports). The package itself is installed editable without deps so the lock
# alone decides versions.
$(STAMP): requirements/lock.txt pyproject.toml
	$(call need_disk,$(VENV),7100)
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --no-cache-dir --upgrade pip
	$(VPY) -m pip install --quiet --no-cache-dir -r requirements/lock.txt
	$(VPY) -m pip install --quiet --no-deps -e .
	touch $@

# torch 2.7.0 comes from PyPI with ~3 GB of CUDA wheels. pip keeps every wheel of one call on
# disk until that call ends, so the whole lock at once peaked at 9.5 GB for a 6.5 GB environment
# (a CI machine ran out of disk there). One call per large wheel first (torch, triton, the
# nvidia-* libraries; the lock pins each, --no-deps since it lists them all) keeps one at a time
# beside it: 6.6 GB at the peak, the same environment (pip freeze).
$(CSTAMP): requirements/composer-lock.txt pyproject.toml
	$(call need_disk,$(CVENV),6700)
	$(PYTHON) -m venv $(CVENV)
	$(CPY) -m pip install --quiet --no-cache-dir --upgrade pip
	grep -E '^(torch|triton|nvidia-[a-z0-9-]+)==' requirements/composer-lock.txt | while read -r pin; do \
		$(CPY) -m pip install --quiet --no-cache-dir --no-deps "$$pin" || exit 1; done
	$(CPY) -m pip install --quiet --no-cache-dir -r requirements/composer-lock.txt
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

# Every training table in BENCHMARKS.md and docs/choosing.md, by the bench_train commands that
# wrote docs/evidence/*/ (issues 7, 14, 15). Each keeps its finished runs in OUT/runs.jsonl and
# resumes there, so on this checkout it only rewrites the tables; to measure again on your
# machine, `make bench-training EVIDENCE=some/new/dir` (about 8 h on 2 cores; add `--dry-run`
# through TRAIN_FLAGS for the plan and its estimate).
EVIDENCE    ?= docs/evidence
TRAIN_FLAGS ?=
TRAIN := $(VPY) tools/bench_train.py --data-dir out/bench_data --no-progress $(TRAIN_FLAGS)
bench-training: $(STAMP)
	$(TRAIN) --workload mnist1d --workload textlm --noise 0,0.2,0.4 --grid betas --grid ratio --grid prune --grid fixes --grid-seeds 0,1 --time wall --out $(EVIDENCE)
	$(TRAIN) --workload mnist1d-long --workload mnist1d-finetune --time wall --out $(EVIDENCE)/regimes --methods uniform,es,eswp,infobatch,infobatch_es,eswp_rescale,random,budget_es,budget_eswp,budget_infobatch
	$(TRAIN) --workload mnist1d --noise 0 --out $(EVIDENCE)/cputime-quiet --methods uniform,es,eswp,infobatch,random,budget_es,budget_eswp,budget_infobatch
	$(TRAIN) --workload mnist1d --noise 0 --out $(EVIDENCE)/cputime --methods uniform,infobatch,infobatch_es,eswp_rescale,rho,band_low,band_middle,prune_chance,prune_random,budget_infobatch,budget_infobatch_es,budget_eswp_rescale,budget_prune_chance
	$(TRAIN) --workload mnist1d --noise 0.4 --out $(EVIDENCE)/cputime --methods uniform,rho,rho_es,band_low,band_middle,band_high,prune_chance,prune_random,budget_rho,budget_prune_chance
	$(TRAIN) --workload mnist1d --noise 0.2 --out $(EVIDENCE)/cputime --methods uniform,rho,band_low,prune_chance,prune_random,budget_prune_chance
	$(TRAIN) --workload mnist1d --noise 0 --out $(EVIDENCE)/variants --methods uniform,es,es_reweight,es_to_uniform,es_from_uniform,es_fresh,budget_es
	$(TRAIN) --workload mnist1d --noise 0.2,0.4 --out $(EVIDENCE)/noise-infobatch --methods uniform,infobatch,budget_infobatch
	$(TRAIN) --workload textlm --out $(EVIDENCE)/textlm-reference --methods uniform,rho,band_low,band_middle,band_high,prune_chance,prune_random,budget_rho,infobatch,budget_infobatch
	$(TRAIN) --workload textlm-long --out $(EVIDENCE)/textlm-long --methods uniform,es,budget_es,infobatch,budget_infobatch
	$(TRAIN) --workload webtext --web-passes 0.25 --out $(EVIDENCE)/webtext --methods uniform,oracle,dedup_near,dedup_filter,es,rho,budget_dedup_filter,budget_es,budget_rho,ref_filter,prune_random,rho_es,budget_ref_filter,budget_rho_es
	$(TRAIN) --workload webtext --web-passes 0.5 --out $(EVIDENCE)/webtext --methods uniform,oracle,dedup_near,dedup_filter,es,budget_dedup_filter,budget_es
	$(TRAIN) --workload webtext --web-samples 4096 --web-passes 2 --out $(EVIDENCE)/webtext/multipass --methods uniform,oracle,dedup_near,dedup_filter,budget_dedup_filter,rs2,prune_random,es,infobatch,eswp,budget_es,budget_infobatch,budget_eswp,budget_rs2
	$(TRAIN) --workload webtext --web-samples 4096 --web-passes 1 --out $(EVIDENCE)/webtext/multipass --methods uniform
	$(TRAIN) --workload webtext --web-mixture dupes --web-passes 0.25 --out $(EVIDENCE)/webtext/dupes --methods uniform,oracle,dedup_near,dedup_filter,budget_dedup_filter
	$(TRAIN) --workload webtext --web-seed-set spread --seeds 0 --out $(EVIDENCE)/webtext/spread-seed --methods uniform,ref_filter,dedup_filter

clean:
	rm -rf $(VENV) $(CVENV) demo_out
