# Two commands do all the set-up on a fresh Debian machine: `make run` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# A CPU host takes torch 2.13.0 (its CPU build is on disk here); a GPU host sets its CUDA build,
# e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128".
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup system-deps venv viewer-deps run serve worker demo test lint clean

setup: system-deps venv

system-deps:
	@bash scripts/install-system-deps.sh

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[worker,test]'
	touch $@

run: setup
	$(VENV)/bin/pacs-agent db upgrade
	$(VENV)/bin/pacs-agent run

demo: setup
	$(PY) -m pacs_agent.demo --output demo-output

# The viewer test needs Debian's chromium, playwright and the prebuilt OHIF viewer.
viewer-deps: venv
	bash scripts/install-viewer-deps.sh $(VENV)

test: setup viewer-deps
	$(PY) -m pytest $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check pacs_agent workers tests orthanc migrations
	$(VENV)/bin/mypy pacs_agent workers

clean:
	rm -rf data demo-output .pytest_cache
