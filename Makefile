# Newcomer path: `make demo` and `make test` each create .venv, install what is needed and build.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
QUICK   ?= 0
OUT     ?= bench-results
ISA     ?=

# `make bench ISA=avx2`: an AVX2 machine seen from a wider one, torch capped too (FBGEMM ignores these);
# any other level caps effops' kernels only.
ifeq ($(ISA),avx2)
BENCH_ENV := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 EFFOPS_CPU_ISA=avx2
else ifneq ($(ISA),)
BENCH_ENV := EFFOPS_CPU_ISA=$(ISA)
endif

.PHONY: demo test build gpu-compile-check cuda-build-check lint-imports bench gpu-check info clean

$(STAMP): requirements-dev.txt
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -r requirements-dev.txt
	touch $(STAMP)

# Builds effops._C in place (ninja; only changed files are recompiled). --no-build-isolation is
# implied: setup.py runs with the venv's own torch, so nothing downloads another torch.
build: $(STAMP)
	$(VPY) setup.py -q build_ext --inplace

demo: build
	$(VPY) -m effops.demo

test: build
	$(VPY) -m pytest -q

info: build
	$(VPY) -m effops info

# Every .cu through nvcc for sm_80/sm_90a and every Triton kernel config through Triton's compiler.
gpu-compile-check: $(STAMP)
	$(VPY) tools/gpu_compile_check.py --out build/gpu-compile-check

# The import boundaries of docs/architecture.md (.importlinter): kernels are leaves, the reference is plain
# PyTorch, modules use the public ops, transforms launch no kernel.
lint-imports: $(STAMP)
	$(VENV)/bin/lint-imports

# The CUDA extension with its torch glue, built against the CUDA torch wheel on disk (no GPU needed).
cuda-build-check:
	bash tools/cuda_build_check.sh

# Level-dependent benchmarks (int8, masked_linear) run at every CPU level up to ISA (default: this CPU's).
# DeepSpeed is only the Adam benchmark's outside baseline (its CPU Adam JIT-compiles ~90 s on first use).
bench: build
	$(VPY) -c "import deepspeed" 2>/dev/null || $(VPY) -m pip install -q deepspeed
	$(BENCH_ENV) $(VPY) -m benchmarks.run $(if $(filter 1,$(QUICK)),--quick) --out $(OUT)

# The one command for a lent GPU machine: its own python/torch/triton, no installs, no network; ~8 min
# at most (build, tests on CUDA tensors, quick benchmarks). Leaves $(OUT)/gpu-check/summary.txt and
# gpu-check.tgz (every log and result); see docs/gpu-check.md.
gpu-check:
	bash benchmarks/gpu_check.sh "$(OUT)/gpu-check"

clean:
	rm -rf build effops/_C*.so
