# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# The pinned CPU torch wheel is installed first so no multi-GB CUDA build is ever pulled;
# override with e.g. `make test TORCH_SPEC="torch==2.14.1"` (a CUDA build on a GPU machine).
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
# cpu: onnxruntime + faiss-cpu. Use EXTRAS=gpu,encoder,test on a GPU machine (never cpu and gpu together:
# onnxruntime and onnxruntime-gpu install the same module).
EXTRAS     ?= cpu,encoder,test,plot,serve,scale
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

.PHONY: install kernels test test-all test-latest lock demo fuzz soak audit ml1m ml1m-cpu clean triton-env serve serve-triton bench-serve

# Triton (README "Serving"): the tritonserver that nvidia-pytriton ships runs model.py in a Python-backend stub
# that embeds the venv's Python. Debian's python3.11 works there; the pyenv 3.11.7 first on PATH here fails in
# the stub (AttributeError: _recursion_count). So Triton gets its own venv from Debian's interpreter, with its own
# lock (pytriton needs numpy<2). `make test` builds it when that interpreter exists (about 1-2 minutes) and the
# Triton tests skip, naming this target, when it is absent.
TRITON_PYTHON ?= /usr/bin/python3.11
TRITON_VENV   ?= .venv-triton
TRITON_LOCK   ?= requirements-triton.lock
SERVE_EXPORT  ?= $(DEMO_DIR)/export

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

$(TRITON_VENV)/.installed: pyproject.toml $(TRITON_LOCK)
	@test -x "$(TRITON_PYTHON)" || { echo "no $(TRITON_PYTHON): apt-get install python3.11 python3.11-venv (Debian's build; see README Serving)"; exit 2; }
	rm -rf $(TRITON_VENV)
	$(TRITON_PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/python -m pip install -q -c $(TRITON_LOCK) "$(TORCH_SPEC)"
	$(TRITON_VENV)/bin/python -m pip install -q -c $(TRITON_LOCK) -e ".[cpu,triton]"
	touch $@

triton-env: $(TRITON_VENV)/.installed

# The Triton env is built when Debian's python3.11 (with its venv module) is there; without it the Triton tests
# skip with the reason.
TEST_TRITON := $(if $(shell "$(TRITON_PYTHON)" -c "import ensurepip, venv" 2>/dev/null && echo yes),triton-env)

test: install kernels $(TEST_TRITON)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-all: install kernels $(TEST_TRITON)
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
	$(PY) -m dpr.bench.demo --out $(DEMO_DIR)

# Reliability campaign (docs/RELIABILITY.md). `make test` runs the short forms; these run the long ones.
# fuzz: the hypothesis tests with FUZZ_SCALE times the CI example counts, new random examples every run (a failure
# prints the @reproduce_failure line that replays it).
# soak: 8 client threads x 10,000 mixed valid/invalid requests through the dynamic batcher, then through the HTTP
# service (a dpr-serve subprocess), every answer checked against its own request's; memory, fds, threads (of
# the serving process) and p99 by window; each target stops sending after 5 minutes (10 in all).
FUZZ_SCALE ?= 25
SOAK_ARGS  ?=
fuzz: install kernels
	DPR_FUZZ=long DPR_FUZZ_SCALE=$(FUZZ_SCALE) $(PY) -m pytest -q -p no:cacheprovider tests/test_fuzz_*.py $(PYTEST_ARGS)

soak: install kernels
	$(PY) -m dpr.bench.soak --target all --threads 8 --requests 10000 --max-seconds 300 --json build/soak/report.json $(SOAK_ARGS)

# Dependency audit (docs/RELIABILITY.md, "Dependency audit"): pip-audit from its own throwaway venv under build/
# (never .venv, never a lock), against the exact pins of each lock (--no-deps --disable-pip: nothing is installed
# or resolved). It fails on a known vulnerability, and also on a package the vulnerability service could not
# look up: an index without vulnerability data answers "not found" for every package, and pip-audit alone then
# prints "No known vulnerabilities found". AUDIT_SERVICE=osv asks osv.dev instead of PyPI.
AUDIT_VENV    ?= build/audit-venv
AUDIT_SERVICE ?= pypi
AUDIT_LOCKS   ?= requirements.lock requirements-triton.lock
define AUDIT_SUMMARY
import json, sys
deps = json.load(open(sys.argv[1]))["dependencies"]
vulns = [(d["name"], d["version"], v["id"], ", ".join(v["fix_versions"]) or "no fix released")
         for d in deps for v in d.get("vulns", [])]
skipped = [d for d in deps if "skip_reason" in d]
for v in vulns:
    print("  VULNERABLE %s==%s: %s (fixed in: %s)" % v)
if skipped:
    print("  NOT AUDITED: %d of %d packages, e.g. %s" % (len(skipped), len(deps), skipped[0]["skip_reason"]))
print("  %s: %d pinned, %d audited, %d known vulnerabilities" % (sys.argv[2], len(deps), len(deps) - len(skipped),
                                                               len(vulns)))
sys.exit(1 if vulns or skipped else 0)
endef
export AUDIT_SUMMARY
audit:
	@test -x $(AUDIT_VENV)/bin/pip-audit || { rm -rf $(AUDIT_VENV) && $(PYTHON) -m venv $(AUDIT_VENV) && \
	  $(AUDIT_VENV)/bin/python -m pip install -q pip-audit; }
	@mkdir -p build/audit; rc=0; for f in $(AUDIT_LOCKS); do \
	  echo "pip-audit -r $$f ($(AUDIT_SERVICE))"; rm -f build/audit/$$f.json; \
	  $(AUDIT_VENV)/bin/pip-audit -r $$f --no-deps --disable-pip -s $(AUDIT_SERVICE) --progress-spinner off \
	    -f json -o build/audit/$$f.json 2>build/audit/$$f.log; \
	  test -s build/audit/$$f.json || { echo "  pip-audit failed:"; tail -5 build/audit/$$f.log; rc=1; continue; }; \
	  $(AUDIT_VENV)/bin/python -c "$$AUDIT_SUMMARY" build/audit/$$f.json $$f || rc=1; \
	done; exit $$rc

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

# Serving (README "Serving"): the HTTP service, or Triton, on SERVE_EXPORT (default: the demo's export).
serve: install
	$(VENV)/bin/dpr-serve $(SERVE_EXPORT) $(SERVE_ARGS)

serve-triton: triton-env
	$(TRITON_VENV)/bin/dpr-serve --triton $(SERVE_EXPORT) $(SERVE_ARGS)

# The load test: starts both servers on 127.0.0.1, drives them, stops them, prints the table.
bench-serve: install kernels triton-env
	$(PY) -m dpr.serve.load $(BENCH_SERVE_ARGS)

clean:
	rm -rf build .pytest_cache .venv-latest
