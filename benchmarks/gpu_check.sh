#!/usr/bin/env bash
# `make gpu-check OUT=dir` (or `bash benchmarks/gpu_check.sh DIR`): the one command to run on a lent GPU
# machine (docs/gpu-check.md). That machine has no network and its own python (3.12), torch (2.11, CUDA
# 13), triton (3.6), nvcc and pytest-xdist: nothing is installed. Three independent parts, each under its
# own time limit, all inside ~475 s (the device tool allows 600 s a command; the lease is 15 min in all):
#   build  the CUDA extension in place             at most GPU_CHECK_BUILD_S (150 s)
#   tests  the suite on CUDA tensors, every backend  what is left of GPU_CHECK_TOTAL_S (460 s) minus the
#                                                  bench's share (~200 s)
#   bench  the quick benchmarks                    the rest of GPU_CHECK_TOTAL_S (>= GPU_CHECK_BENCH_S, 100 s)
# A part that fails or runs out of time is recorded and the next one still runs. Everything is written in a
# scratch folder and packed, after every part, into DIR/gpu-check.tgz next to a short DIR/summary.txt: the
# device tool returns at most 8 files from $OUT, and a kill of the whole command keeps the last pack.
# EFFOPS_COMMIT=<hash> names the commit in the summary where the tree has no .git (the device tool's copy).
set -uo pipefail
OUT=${1:?usage: gpu_check.sh OUT_DIR}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)  # absolute before the cd below: a relative OUT means one place
PY=${PYTHON:-python3}
TOTAL_S=${GPU_CHECK_TOTAL_S:-460}
BUILD_S=${GPU_CHECK_BUILD_S:-150}
BENCH_S=${GPU_CHECK_BENCH_S:-100}
GRACE_S=5  # after a part's time runs out: SIGINT (pytest) or SIGTERM first, SIGKILL this much later
cd "$(dirname "$0")/.."
WORK=$(mktemp -d "${TMPDIR:-/tmp}/effops-gpu-check.XXXXXX")
START=$SECONDS
: > "$WORK/status.txt"

commit() {
  if [ -n "${EFFOPS_COMMIT:-}" ]; then echo "$EFFOPS_COMMIT (EFFOPS_COMMIT)"; return; fi
  local head
  if ! head=$(git rev-parse HEAD 2>/dev/null); then
    echo "unknown (no git checkout here; pass EFFOPS_COMMIT=<hash>)"; return
  fi
  if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then echo "$head + uncommitted changes"
  else echo "$head"; fi
}

# record PART RC SECONDS LIMIT: one line per part in status.txt
record() {
  case $2 in
    0) echo "$1: ok ($3 s)" ;;
    124|137) echo "$1: TIMEOUT after $3 s (limit $4 s)" ;;
    *) echo "$1: FAILED (rc $2, $3 s)" ;;
  esac >> "$WORK/status.txt"
}

# run PART LIMIT SIGNAL LOG CMD...: CMD under `timeout`, output to LOG, status recorded, then packed.
run_part() {
  local part=$1 limit=$2 sig=$3 log=$4 t0=$SECONDS rc
  shift 4
  echo "== $part (limit $limit s)"
  timeout -s "$sig" -k "$GRACE_S" "$limit" "$@" > "$log" 2>&1
  rc=$?
  record "$part" "$rc" "$((SECONDS - t0))" "$limit"
  pack
  return "$rc"
}

summary() {
  echo "effops gpu-check: commit $(commit); $(date -u '+%Y-%m-%d %H:%M:%S UTC'); $((SECONDS - START)) s so far"
  echo "machine: $(head -n 1 "$WORK/machine.txt" 2>/dev/null)"
  cat "$WORK/status.txt"
  if [ -f "$WORK/info.txt" ]; then
    grep -m1 "cuda kernels:" "$WORK/info.txt"
    sed -n '/^backends:/,/^forced backend/p' "$WORK/info.txt" | grep -v '^forced backend'
  fi
  if [ -f "$WORK/tests.log" ]; then
    echo "pytest: $(grep -E '^=+ .*\b(passed|failed|errors?|skipped|no tests ran)\b.* in [0-9.]+s' "$WORK/tests.log" \
      | tail -n 1 || true)"
    # Counted from the per-test lines (-v), which survive a test run that was cut short.
    # -v's lines have the outcome after a space ("[gw3] [ 40%] PASSED tests/..." under xdist, "tests/...
    # PASSED [ 40%]" without); -ra's summary lines start with it.
    local n k
    n=""; for k in PASSED FAILED SKIPPED ERROR; do n="$n $(grep -cE " $k( |\$)" "$WORK/tests.log") ${k,,}"; done
    echo "  per-test lines:$n"
    grep -E '^(FAILED|ERROR) ' "$WORK/tests.log" | head -n 15 | cut -c1-200 | sed 's/^/  /'
  fi
  if [ -f "$WORK/bench/results.md" ]; then
    echo "bench table head (bench/results.md):"
    head -n 25 "$WORK/bench/results.md" | cut -c1-200
  elif [ -f "$WORK/bench.log" ]; then
    echo "bench: no results.md; log tail:"
    tail -n 8 "$WORK/bench.log" | cut -c1-200
  fi
}

# Writes summary.txt (also inside the tarball) and replaces DIR/gpu-check.tgz with the scratch folder's
# current contents; the tarball is renamed into place, so a kill mid-pack leaves the previous one whole.
pack() {
  summary > "$WORK/summary.txt" 2>&1
  cp "$WORK/summary.txt" "$OUT/summary.txt"
  tar -czf "$OUT/.gpu-check.tgz.part" -C "$WORK" . && mv -f "$OUT/.gpu-check.tgz.part" "$OUT/gpu-check.tgz"
}
trap 'pack && rm -rf "$WORK"' EXIT

# One python start (torch's import costs seconds): versions; this GPU's compute capability; where torch's
# CUDA wheels keep headers (site-packages/nvidia/cu13/include) that CUDA_HOME may lack.
PROBE='import os, torch
try:
    import triton
    tv = triton.__version__
except ImportError:
    tv = None
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", tv)
print("%d.%d" % torch.cuda.get_device_capability() if torch.cuda.is_available() else "")
try:
    import nvidia
    print(os.path.join(list(nvidia.__path__)[0], "cu13", "include"))
except ImportError:
    print("")'
mapfile -t PROBED < <(timeout 60 "$PY" -c "$PROBE" 2> "$WORK/probe.log")
{
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -n 1 | tr '\n' ' '
  else printf 'no nvidia-smi '; fi
  echo "| ${PROBED[0]:-no python} | $(nproc) cores"
  echo "date: $(date -u); commit: $(commit)"
  command -v nvidia-smi > /dev/null && nvidia-smi 2>&1
} > "$WORK/machine.txt"
head -n 2 "$WORK/machine.txt"
status=0

# The nvidia headers on the include path as a fallback (-I paths come first), as tools/cuda_build_check.sh
# does. Only this GPU's architecture (9.0a on an H200; setup.py's default "8.0;9.0a" compiles every .cu
# twice): tools/gpu_compile_check.py covers sm_80 without a GPU.
NV=${PROBED[2]:-}
[ -n "$NV" ] && [ -d "$NV" ] && export CPATH="$NV${CPATH:+:$CPATH}"
ARCH=${PROBED[1]:-}
[[ $ARCH =~ ^[0-9]+\.[0-9]+$ ]] || ARCH=
[ "$ARCH" = 9.0 ] && ARCH=9.0a
run_part build "$BUILD_S" TERM "$WORK/build.log" \
  env EFFOPS_BUILD_CUDA=1 MAX_JOBS="$(nproc)" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-${ARCH:-8.0;9.0a}}" \
  "$PY" setup.py -q build_ext --inplace || { status=1; tail -n 30 "$WORK/build.log"; }
timeout 60 "$PY" -m effops info > "$WORK/info.txt" 2>&1
sed -n '/^backends:/,/^forced backend/p' "$WORK/info.txt"

# pytest: -v prints a line per test as it ends (counted in summary.txt even when the run is cut short;
# SIGINT at the limit still makes pytest print its summary); -ra lists every failure, error and skip
# reason at the end; no -x, so one failure does not hide the others. xdist and pytest-timeout only where
# installed. 8 workers x 2 torch threads fill the 16 cores; Triton compiles in all workers at once.
# --dist worksteal (xdist >= 3.2): an idle worker takes tests queued on a busy one, so a file's slow
# tests, queued together, do not run one after another on one worker. GPU_CHECK_IGNORE (default
# tests/test_demo.py: its training runs are CPU-only, --device cpu, ~1-2 min each on 2 threads, and CI
# runs them) lists test files left out of this run; set it empty to run everything.
TEST_S=$((TOTAL_S - BENCH_S - (SECONDS - START)))
[ "$TEST_S" -lt 10 ] && TEST_S=10  # never <= 0 (`timeout 0` would mean no limit); >= 85 s with the defaults
PYTEST_ARGS=(-v -ra --durations=15 -p no:cacheprovider)
for f in ${GPU_CHECK_IGNORE-tests/test_demo.py}; do PYTEST_ARGS+=("--ignore=$f"); done
XDIST_OK='import sys, xdist; sys.exit(tuple(int(p) for p in xdist.__version__.split(".")[:2]) < (3, 2))'
if "$PY" -c "$XDIST_OK" 2>/dev/null; then PYTEST_ARGS+=(-n 8 --dist worksteal)
elif "$PY" -c "import xdist" 2>/dev/null; then PYTEST_ARGS+=(-n 8); fi
"$PY" -c "import pytest_timeout" 2>/dev/null && PYTEST_ARGS+=(--timeout=120)
run_part tests "$TEST_S" INT "$WORK/tests.log" \
  env EFFOPS_TEST_DEVICE=cuda TRITON_INTERPRET=0 OMP_NUM_THREADS=2 "$PY" -m pytest "${PYTEST_ARGS[@]}" tests \
  || status=1
grep -E '^(FAILED|ERROR) |^=+ .* in [0-9.]+s' "$WORK/tests.log" | tail -n 30

# benchmarks.run writes results.json/.md after every benchmark module: a timeout keeps the finished ones.
BENCH_LEFT=$((TOTAL_S - (SECONDS - START)))
[ "$BENCH_LEFT" -lt "$BENCH_S" ] && BENCH_LEFT=$BENCH_S
run_part bench "$BENCH_LEFT" TERM "$WORK/bench.log" \
  "$PY" -m benchmarks.run --quick --device cuda --out "$WORK/bench" || status=1
tail -n 40 "$WORK/bench.log"

echo "== done in $((SECONDS - START)) s: $OUT/summary.txt and $OUT/gpu-check.tgz"
cat "$WORK/status.txt"
exit $status
