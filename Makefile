# One command each on a fresh machine: every target creates .venv and installs first.
# torch is installed first at a pinned version: an unpinned torch pulls several GB of CUDA
# packages. Override for a GPU machine, e.g. `make test TORCH_SPEC="torch==2.13.0"` with your index.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.medct-installed

.PHONY: install demo test test-wheel test-slow bench bench-deps lint clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: install
	$(VENV)/bin/medct demo -o demo_out

test: install
	$(VENV)/bin/pytest -q --durations=15

# the wheel (built from an sdist) in a fresh venv, run from outside the checkout
test-wheel: install
	TORCH_SPEC="$(TORCH_SPEC)" bash .ci/wheel $(PY)

test-slow: install
	$(VENV)/bin/pytest -q -m "slow"

# nnU-Net v2 for the peer arm of bench/segment.py, without its torch/torchvision requirements
bench-deps: install
	$(PY) -m pip install --quiet --no-deps -r bench/requirements-nnunet.txt

# quick variants only: each writes bench/results/<name>_quick.json, the committed full results stay as they are
bench: install
	@for b in bench/[!_]*.py; do echo "== $$b --quick"; $(PY) $$b --quick || exit 1; done

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) demo_out .pytest_cache
