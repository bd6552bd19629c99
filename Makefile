# The two README commands. Both work from a fresh clone, offline except package registries.
#   make demo   creates .venv/, installs usae with what the demo needs, runs `usae demo`
#   make test   creates or updates .venv/ with the development extras, runs the test suite
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
ARCH   := $(shell uname -m)
# The CPU wheel of torch 2.13.0 installs fast, but PyPI's torchvision does not import beside
# it; timm (dev extras) needs torchvision, so tests use the pair that works together.
ifeq ($(ARCH),aarch64)
TORCH_DEMO := torch==2.9.1
TORCH_DEV  := torch==2.9.1 torchvision==0.24.1
else
TORCH_DEMO := torch==2.13.0
TORCH_DEV  := torch==2.14.1 torchvision==0.29.1
endif

.PHONY: demo test venv install-demo install-dev browser mutation mutation-changed mutation-js clean

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip

venv: $(PY)

install-demo: $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q $(TORCH_DEMO)
	$(PIP) install -q -e ".[demo]"

demo: install-demo
	$(VENV)/bin/usae demo --out demo-output

install-dev: $(PY)
	$(PY) -c "import torchvision" 2>/dev/null || $(PIP) install -q $(TORCH_DEV)
	$(PIP) install -q -e ".[dev]"

# Debian's Chromium for the explorer's browser tests (test tools cannot download browsers here).
browser:
	@command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ] || \
	  { (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || \
	    echo "warning: could not install chromium; browser tests will be skipped"; }

test: install-dev browser
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest

# Mutation testing of the core modules, one module at a time (not part of `make test`; about
# 42 min on 2 cores). Scores and survivors: docs/TESTING.md;
# `python scripts/mutation.py MODULE...` runs some modules, `--rerun` only the survivors.
mutation: install-dev
	$(PIP) install -q -e ".[mutation]"
	$(VENV)/bin/python scripts/mutation.py

# Before a submission: mutate only the modules changed since scripts/mutation_record.json
# (or never scored), for at most MUTATION_BUDGET minutes; the record keeps each new score.
MUTATION_BUDGET ?= 30
mutation-changed: install-dev browser
	$(PIP) install -q -e ".[mutation]"
	$(VENV)/bin/python scripts/mutation.py --changed --budget $(MUTATION_BUDGET)
	$(VENV)/bin/python scripts/mutation_js.py --changed

# The explorer's JavaScript: scripts/mutation_js.py's mutants of app.js against the real
# browser tests (about 30 min on 2 cores).
mutation-js: install-dev browser
	$(VENV)/bin/python scripts/mutation_js.py

clean:
	rm -rf $(VENV) demo-output mutants-work
