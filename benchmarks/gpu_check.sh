#!/usr/bin/env bash
# `make gpu-check OUT=dir`: the one command to run on a lent GPU machine.
# That machine has no network and its own python (3.12), torch (2.11, CUDA 13), triton (3.6) and nvcc:
# nothing is installed. It builds the CUDA extension in place, runs the suite with CUDA tensors on
# every backend, runs the quick benchmarks, and leaves logs and results in the folder given.
set -uo pipefail
OUT=${1:?usage: gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
{
  date -u; git rev-parse HEAD 2>/dev/null || true
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

status=0
echo "== build (CUDA extension)"
EFFOPS_BUILD_CUDA=1 MAX_JOBS=16 timeout 240 $PY setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 || { status=1; tail -30 "$OUT/build.log"; }
$PY -m effops info > "$OUT/info.txt" 2>&1; cat "$OUT/info.txt"

echo "== tests on cuda tensors"
EFFOPS_TEST_DEVICE=cuda TRITON_INTERPRET=0 timeout 270 $PY -m pytest -q -p no:cacheprovider tests \
  > "$OUT/tests.log" 2>&1 || status=1
tail -25 "$OUT/tests.log"

echo "== quick benchmarks"
timeout 150 $PY -m benchmarks.run --quick --device cuda --out "$OUT/bench" > "$OUT/bench.log" 2>&1 || status=1
tail -60 "$OUT/bench.log"
exit $status
