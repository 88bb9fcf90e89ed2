"""Build the host-emulation harnesses: a kernel source from csrc/cuda, its launches rewritten, compiled
with g++ under cuda_host_shim.h (see docs/cuda-emulation.md).

The kernel body is compiled as written. The only source rewrites, each required to match exactly
the number of times given (so an edit of the .cu that escapes them fails the build instead of
silently testing something else):
  * `kernel<<<cfg>>>(args);` -> `::effops_emu::launch(kernel, ::effops_emu::LaunchConfig(cfg), args);`
    (g++ cannot parse the launch syntax);
  * optional constant overrides (`constexpr int kName = value;` -> another value), used to shrink
    adam_step's launch tables so the multi-launch paths run in a fast test;
  * planted bugs (`mutations`), only for the tests that show the emulation catches them.
Executables are cached in build/cuda_emulation/ (ignored by git) under a digest of all their inputs.
"""
import glob
import hashlib
import os
import re
import shutil
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CUDA_INCLUDE = os.environ.get("EFFOPS_EMU_CUDA_INCLUDE", "/usr/local/cuda/include")
CXX = os.environ.get("CXX_FOR_EMULATION", "g++")
CACHE_DIR = os.path.join(ROOT, "build", "cuda_emulation")

LAUNCH = re.compile(r"(?P<kernel>[A-Za-z_][\w:]*(?:<[^<>;]*>)?)<<<(?P<cfg>[^;]*?)>>>\((?P<args>[^;]*)\);")
# -O1: ASan/UBSan-instrumented code at -O0 is several times slower; -g1: line tables for the
# sanitizers' reports; -ffp-contract=off: no fused multiply-adds the source does not ask for (fp32
# results must be the IEEE per-operation ones).
FLAGS = ["-std=c++20", "-O1", "-g1", "-ffp-contract=off", "-fno-fast-math", "-Wall", "-Wno-unknown-pragmas",
         "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]


def missing_tools():
    """A reason the harness cannot be built here, or None."""
    if shutil.which(CXX) is None:
        return "%s not found (the CUDA host emulation compiles kernels with it)" % CXX
    if not os.path.exists(os.path.join(CUDA_INCLUDE, "cuda_runtime.h")):
        return "%s/cuda_runtime.h not found (CUDA headers; set EFFOPS_EMU_CUDA_INCLUDE)" % CUDA_INCLUDE
    return None


def rewrite(source_text, launches, constants=None, mutations=()):
    """The kernel source with its launches (exactly `launches` of them) and `constants` rewritten, and
    `mutations` ((old, new) exact text, each found once) applied: planted bugs for the tests that
    check the emulation catches them."""
    for old, new in mutations:
        if source_text.count(old) != 1:
            raise RuntimeError("mutation target found %d times: %r" % (source_text.count(old), old))
        source_text = source_text.replace(old, new)
    text, n = LAUNCH.subn(lambda m: "::effops_emu::launch(%s, ::effops_emu::LaunchConfig(%s), %s);"
                          % (m["kernel"], m["cfg"], m["args"]), source_text)
    if n != launches or "<<<" in text:
        raise RuntimeError("expected %d kernel launches to rewrite, found %d" % (launches, n))
    for name, value in (constants or {}).items():
        text, n = re.subn(r"\b%s = [^,;]+([,;])" % name, lambda m: "%s = %s%s" % (name, value, m.group(1)), text)
        if n != 1:
            raise RuntimeError("constant %s found %d times, expected once" % (name, n))
    return text


def _inputs_digest(text, flags):
    """Everything the executable depends on: the rewritten kernel, the headers it may include, the
    emulation sources, the flags and the compiler."""
    h = hashlib.sha256(text.encode())
    paths = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cuh")) + glob.glob(os.path.join(HERE, "*.h"))
                   + glob.glob(os.path.join(HERE, "*.cpp")))
    for path in paths:
        with open(path, "rb") as f:
            h.update(path.encode() + b"\0" + f.read())
    # The CUDA headers the shim takes its types and conversions from (their location and contents).
    for name in ("cuda_runtime_api.h", "cuda_bf16.hpp", "cuda_fp16.hpp", "vector_types.h"):
        path = os.path.join(CUDA_INCLUDE, name)
        if os.path.exists(path):
            with open(path, "rb") as f:
                h.update(path.encode() + b"\0" + f.read())
    version = subprocess.run([CXX, "--version"], capture_output=True, text=True).stdout
    h.update(repr((flags, version, _command("SRC", "HARNESS", "EXE", flags))).encode())
    return h.hexdigest()[:16]


def _command(src, harness, out, flags):
    return [CXX, *flags, "-DEFFOPS_CUDA_HOST_EMULATION", "-DEFFOPS_EMU_KERNEL_SOURCE=\"%s\"" % src,
            "-I" + os.path.join(ROOT, "csrc"), "-I" + HERE, "-isystem", CUDA_INCLUDE,
            "-include", os.path.join(HERE, "cuda_host_shim.h"), os.path.join(HERE, harness), "-o", out]


def build(kernel, harness, launches, constants=None, mutations=(), sanitize=True, out_dir=CACHE_DIR):
    """Compile csrc/cuda/<kernel>.cu (rewritten) with tests/cuda_emulation/<harness>; returns the
    executable. Cached in out_dir under a digest of every input, so a rerun reuses it."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(ROOT, "csrc", "cuda", kernel + ".cu")) as f:
        text = rewrite(f.read(), launches, constants, mutations)
    flags = FLAGS if sanitize else [f for f in FLAGS if not f.startswith("-fsanitize")]
    tag = _inputs_digest(text, flags)
    exe = os.path.join(out_dir, "%s_%s" % (harness.rsplit(".", 1)[0], tag))
    if os.path.exists(exe):
        return exe
    # Per-process names for the source and the executable until the executable is renamed into place:
    # two processes building the same digest (pytest-xdist workers) never read each other's half-written files.
    src = os.path.join(out_dir, "%s.emu.%s.%d.cpp" % (kernel, tag, os.getpid()))
    with open(src, "w") as f:
        f.write('#line 1 "csrc/cuda/%s.cu"\n' % kernel)
        f.write(text)
    tmp = "%s.tmp%d" % (exe, os.getpid())
    cmd = _command(src, harness, tmp, flags)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError("emulation build failed:\n%s\n%s" % (" ".join(cmd), proc.stderr[-6000:]))
    os.replace(tmp, exe)  # atomic: a concurrent session sees no half-written executable
    os.remove(src)  # (#line maps the executable's diagnostics to csrc/cuda/<kernel>.cu)
    return exe
