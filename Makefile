# The two README commands (`make demo`, `make test`) do all set-up on a fresh machine.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
PIP     := $(BIN)/python -m pip
# Extras the test suite needs: DeepSpeed, DALI (CPU pipelines), RDKit and AnnData are real components in tests.
TEST_EXTRAS ?= dev,distributed,dali,chem,sc,eval,vcc
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: venv install install-test demo test bench bench-smoke gpu-bundle gpu-check gpu-check-smoke clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel

venv: $(BIN)/python

# torch 2.13.0 first (a local CPU wheel here, PyPI's CUDA build on a GPU machine), then hold it with constraints.
$(VENV)/.torch: $(BIN)/python constraints.txt
	$(PIP) install -c constraints.txt torch==2.13.0
	touch $@

$(VENV)/.core: $(VENV)/.torch setup.py
	$(PIP) install -c constraints.txt -e .
	touch $@

$(VENV)/.test: $(VENV)/.core setup.py
	DS_BUILD_OPS=0 $(PIP) install -c constraints.txt -e ".[$(TEST_EXTRAS)]"
	touch $@

install: $(VENV)/.core
install-test: $(VENV)/.test

demo: $(VENV)/.core
	$(BIN)/phenoflow demo

test: $(VENV)/.test
	$(BIN)/python -m pytest -q tests

# Every benchmark script at full scale (for a GPU machine); rows are appended under benchmarks/results/.
bench: $(VENV)/.test
	set -e; for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b; done

# The same scripts at tiny CPU shapes (what the test suite also runs); rows go to a scratch folder.
bench-smoke: $(VENV)/.test
	set -e; for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b --smoke --out .cache/bench-smoke; done

# Every GPU number in one command (benchmarks/gpu_check.py). On a networked machine, fetch the wheels a bare GPU
# machine lacks (CPython 3.12, manylinux x86-64; about 8 MB) into .gpu-bundle/wheels; on the GPU machine, with
# its own python and torch: `python3 benchmarks/gpu_check.py --out gpu-out --bundle .gpu-bundle` (what gpu-check
# runs), about 8 minutes; then `python benchmarks/gpu_check.py --merge gpu-out` here appends the rows.
GPU_OUT ?= gpu-out
gpu-bundle: $(VENV)/.test
	$(BIN)/python benchmarks/gpu_bundle.py download --dest .gpu-bundle

gpu-check:
	$(PY) benchmarks/gpu_check.py --out $(GPU_OUT) --bundle .gpu-bundle

# The same command at tiny shapes on the CPU (the test suite runs it: tests/test_gpu_check.py).
gpu-check-smoke: $(VENV)/.test
	$(BIN)/python benchmarks/gpu_check.py --smoke --out .cache/gpu-check-smoke

clean:
	rm -rf $(VENV) .cache runs $(GPU_OUT)
