# ParotidOAR — the two commands:
#   make demo   segment a synthetic phantom case end to end (creates .venv on first use)
#   make test   run the whole pytest suite (creates .venv on first use)
# Needs only python3 (3.10+, 3.11 tested), make and pip.

PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
REQS   := requirements.txt requirements-test.txt
STAMP  := $(VENV)/.installed-$(shell cat $(REQS) | cksum | cut -d' ' -f1)
DEMO_OUT ?= demo-output

.PHONY: demo test bench clean-venv

$(STAMP): $(REQS)
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -r requirements-test.txt
	grep '^# no-deps: ' requirements-test.txt | cut -d' ' -f3- | xargs -r $(VPY) -m pip install -q --no-deps
	@rm -f $(VENV)/.installed-*
	@touch $@

demo: $(STAMP)
	$(VPY) -m ParotidOARLib demo --out $(DEMO_OUT)

test: $(STAMP)
	$(VPY) -m pytest Testing -q -p no:cacheprovider

bench: $(STAMP)
	$(VPY) Testing/benchmarks/bench_segment.py

clean-venv:
	rm -rf $(VENV)
