#!/usr/bin/env bash
# The full CUDA build, kernels AND torch glue, on a machine without a GPU.
# The CPU torch cannot compile the glue (csrc/bindings/cuda/*.cpp needs c10/cuda headers), so this
# builds a copy of the tree against the CUDA torch 2.14.1 wheel that lies on this machine's disk
# (kept in .venv-cuda, about 5.5 GB, created once) and checks that the result loads and registers its
# CUDA ops. Nothing runs on a GPU here: that is `make gpu-check` on a lent GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-cuda
if [ ! -f "$VENV/.installed" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.14.1 ninja setuptools wheel 'numpy<2.3'
  touch "$VENV/.installed"
fi
SRC=build/cuda-build-check/src
rm -rf "$SRC" && mkdir -p "$SRC"
git ls-files -z | xargs -0 cp -P --parents -t "$SRC"   # tracked files only: what CI and users get
NV=$("$VENV/bin/python" -c "import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))")/nvidia/cu13/include
cd "$SRC"
CPATH="$NV" CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} EFFOPS_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-2} \
  "../../../$VENV/bin/python" setup.py -q build_ext --inplace > ../build.log 2>&1 || { tail -40 ../build.log; exit 1; }
"../../../$VENV/bin/python" - <<'PY'
import glob, os, re, torch
import effops._ext as ext
assert ext.load(), ext.reason()
info = ext.build_info()
assert info["cuda_kernels"], info
# Every op the CUDA glue defines must be registered with a CUDA kernel.
names = set()
for path in glob.glob("csrc/bindings/cuda/*.cpp"):
    names |= set(re.findall(r'm\.def\(\s*"(\w+)\(', open(path).read()))
missing = [n for n in sorted(names) if not torch._C._dispatch_has_kernel_for_dispatch_key("effops_cuda::" + n, "CUDA")]
assert not missing, "CUDA ops without a CUDA kernel: %s" % missing
print("CUDA build OK: %d CUDA ops registered (%s); build %s" % (len(names), ", ".join(sorted(names)) or "none", info))
PY
