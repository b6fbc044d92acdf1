# xrayfm — developer commands. Everything installs itself into .venv on first use.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
# Every install takes the exact versions of requirements/constraints.txt (as a hashed lock), as the images do (make images),
# so the tests and the containers run the same packages. torch 2.14.1 / torchvision 0.29.1 are pinned there
# (their wheels lie on this machine's disk; other versions would download several GB).
CONSTRAINTS := requirements/constraints.txt
# The same versions with the sha256 of every file of each (uv pip compile --generate-hashes, by `make
# constraints`): the venv's third-party packages are installed from it in pip's hash-checking mode.
LOCK   := requirements/lock.txt
# uv does not read pip's configuration: the indexes and wheel folders pip is configured with, passed on.
UV_SOURCES := $(foreach u,$(shell pip config get global.extra-index-url 2>/dev/null),--extra-index-url $(u)) \
              $(foreach u,$(shell pip config get global.find-links 2>/dev/null),--find-links $(u))
MYPY   := $(VENV)/bin/mypy --config-file pyproject.toml

.PHONY: help install test test-fast lint typecheck format demo bench up down clean constraints \
        base-images images compose-test

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(PY):
	$(PYTHON) -m venv $(VENV)

# services/local: the local launcher (make up), for this venv only: no image installs it
SERVICES := services/common services/inference services/training services/gateway services/frontend services/router \
            services/local

# Third-party packages from the hashed lock (no dependency resolution, every file's hash checked), then the
# project's own packages on top without their dependencies (built with the locked setuptools), then a check
# that every package's requirements hold.
$(STAMP): $(PY) shared/pyproject.toml $(addsuffix /pyproject.toml,$(SERVICES)) $(CONSTRAINTS) $(LOCK)
	$(PIP) install --require-hashes --no-deps -r $(LOCK)
	$(PIP) install --no-deps --no-build-isolation -e 'shared[torch,hospital,dev]' $(addprefix -e ,$(SERVICES))
	$(PIP) check
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install the library, services and dev tools

test: $(STAMP)  ## run the whole test suite (real-data tests skip when ../shared/data is absent)
	$(PY) -m pytest

test-fast: $(STAMP)  ## the suite without tests marked slow
	$(PY) -m pytest -m "not slow"

lint: $(STAMP)  ## ruff check + format check + type check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(MYPY)

typecheck: $(STAMP)  ## mypy alone: strict on xrayfm_stack and the gateway ([tool.mypy] in pyproject.toml)
	$(MYPY)

format: $(STAMP)  ## apply ruff's fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

demo: $(STAMP)  ## the main job end to end on SYNTHETIC phantoms; prints where the report is
	$(VENV)/bin/xrayfm demo --out runs/demo

bench: $(STAMP)  ## data benchmark (ratios measured side by side)
	$(PY) bench/bench_data.py

up: $(STAMP)  ## start the inference stack as local processes (Redis from the system); logs in runs/stack/logs
	$(PY) -m xrayfm_local up

down:  ## stop what `make up` started
	$(PY) -m xrayfm_local down

clean:  ## remove the virtual environment and run outputs
	rm -rf $(VENV) runs

constraints: $(STAMP)  ## rewrite requirements/constraints.txt from .venv and the hashed requirements/lock.txt from it
	{ sed -n '1,/^[^#]/{/^#/p}' $(CONSTRAINTS); $(VENV)/bin/pip freeze --all --exclude-editable | grep -v '^[-#]'; \
	  cat requirements/constraints-images.txt; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)
	$(VENV)/bin/uv pip compile $(CONSTRAINTS) --generate-hashes --no-header --python-version 3.11 \
	  --python-platform x86_64-manylinux_2_28 --index-strategy unsafe-best-match $(UV_SOURCES) -o $(LOCK)

base-images:  ## offline base images (Python, Redis, Prometheus) from Debian packages: deploy/base-images.sh
	deploy/base-images.sh

images:  ## build the stack's images from this tree and print sizes vs budgets (OFFLINE=1: no registry)
	deploy/images.sh

compose-test: $(STAMP)  ## build the images, then the containers end to end (skips without a Docker engine)
	XRAYFM_COMPOSE_TEST=1 $(PY) -m pytest tests/containers -v -rs -s
