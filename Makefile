# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# The pinned CPU torch wheel is installed first so no multi-GB CUDA build is ever pulled;
# override with e.g. `make test TORCH_SPEC="torch==2.14.1"` (a CUDA build on a GPU machine).
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
# cpu: onnxruntime + faiss-cpu. Use EXTRAS=gpu,encoder,test on a GPU machine (never cpu and gpu together:
# onnxruntime and onnxruntime-gpu install the same module).
EXTRAS     ?= cpu,encoder,test,plot
PY         := $(VENV)/bin/python
DEMO_DIR   ?= build/demo
PYTEST_ARGS ?=

.PHONY: install kernels test test-all demo ml1m clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

# Compiles what this machine can build (CPU twin and ORT custom op always; CUDA + PTX with nvcc),
# cached by source hash.
kernels: install
	$(PY) -m dpr.kernels.build

test: install kernels
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-all: install kernels
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: install kernels
	$(PY) -m dpr.cli.demo --out $(DEMO_DIR)

clean:
	rm -rf build .pytest_cache
