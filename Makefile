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
# The exact versions (every direct and transitive dependency of EXTRAS) the test suite last passed with.
# Every install goes through it; `make lock` refreshes it, `make test-latest` tries the newest versions
# pyproject's ranges allow. LOCK= (empty) installs without it (a GPU machine: other torch and extras).
LOCK       ?= requirements.lock

# Never put the repository root on sys.path: its top-level folders (engine/, export/, kernels/, bench/)
# are dpr.engine, ... and must not stand in for installed modules of those names (docs/ARCHITECTURE.md).
export PYTHONSAFEPATH := 1

.PHONY: install kernels test test-all test-latest lock demo ml1m ml1m-cpu clean

$(VENV)/.installed: pyproject.toml $(LOCK)
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(if $(LOCK),-c $(LOCK)) "$(TORCH_SPEC)"
	$(PY) -m pip install -q $(if $(LOCK),-c $(LOCK)) -e ".[$(EXTRAS)]"
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

# The newest versions pyproject's ranges allow, in their own venv: catches the next upstream break.
test-latest:
	rm -f .venv-latest/.installed
	$(MAKE) test VENV=.venv-latest LOCK=

# Refresh the lock from the newest versions, once the suite has passed with them.
lock: test-latest
	.venv-latest/bin/python -m pip freeze --exclude-editable | sed -e 's/+cpu$$//' > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	@echo "wrote $(LOCK): $$(grep -c '==' $(LOCK)) pinned packages"

demo: install kernels
	$(PY) -m dpr.cli.demo --out $(DEMO_DIR)

# ML-1M recipe (issue 7): both backbones, hyper-parameters from configs/ml1m-*.json, seeded; writes
# $(ML1M_OUT)/{sasrec,gru4rec}.pt and their dpr-eval JSON, and the wall time of each in times.txt.
#   make ml1m ML1M_DIR=path/to/ml-1m                  all three stages here (ML1M_DEVICE=cuda for stage 1 on a GPU)
#   make ml1m ML1M_STAGE1=dir                         stages 2-3 from {sasrec,gru4rec}_s1.pt made elsewhere
#                                                     (scripts/ml1m_stage1_sweep.sh on a GPU)
#   make ml1m-cpu ML1M_DIR=path/to/ml-1m              the 90-minute CPU recipe (configs/ml1m-*-cpu.json: stage 1
#                                                     on a clock) into build/ml1m-cpu
ML1M_DIR    ?= ../shared/data/ml-1m
ML1M_OUT    ?= build/ml1m
ML1M_DEVICE ?= cpu
ML1M_STAGE1 ?=
ML1M_RECIPE ?=
, := ,
ml1m: install
	@test -f "$(ML1M_DIR)/user_sequences.txt" || { echo "ML-1M not found in ML1M_DIR=$(ML1M_DIR)"; exit 2; }
	@mkdir -p $(ML1M_OUT)
	@for bb in sasrec gru4rec; do \
	  start=$$(date +%s); \
	  $(PY) -m dpr.cli.train --dataset ml-1m --data-dir $(ML1M_DIR) --config configs/ml1m-$$bb$(ML1M_RECIPE).json \
	    $(if $(ML1M_STAGE1),--resume $(ML1M_STAGE1)/$${bb}_s1.pt --stages 2$(,)3,--device $(ML1M_DEVICE)) \
	    --out $(ML1M_OUT)/$$bb.pt || exit 1; \
	  $(PY) -m dpr.cli.eval $(ML1M_OUT)/$$bb.pt --dataset ml-1m --data-dir $(ML1M_DIR) \
	    --json $(ML1M_OUT)/$$bb.json || exit 1; \
	  echo "$$bb: $$(( $$(date +%s) - start )) s (train + eval)" | tee -a $(ML1M_OUT)/times.txt; \
	done

ml1m-cpu:
	$(MAKE) ml1m ML1M_RECIPE=-cpu ML1M_OUT=build/ml1m-cpu ML1M_DEVICE=cpu

clean:
	rm -rf build .pytest_cache .venv-latest
