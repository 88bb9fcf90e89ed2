"""GPU compile check: build all GPU code for real GPUs on a machine that has none.

* every csrc/cuda/*.cu through the machine's nvcc, to a cubin for sm_80 and for sm_90a;
* every Triton kernel in every tuning configuration its module lists in AOT_SPECS, through Triton's
  own compiler (triton.compile with a GPUTarget), to PTX and a cubin for sm_80 and sm_90.

For each cubin, the cuobjdump shipped inside the triton wheel reports registers, spill stack and shared
memory, and its SASS is searched for tensor-core instructions (HMMA/IMMA/HGMMA/IGMMA). The check fails
when anything does not compile or a kernel needs more shared memory than the GPU has. The Triton
interpreter accepts code the real compiler rejects, which is why this runs beside the interpreter tests.

    python tools/gpu_compile_check.py --out build/gpu-compile-check
"""
import argparse
import concurrent.futures
import glob
import importlib
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Maximum shared memory per block (opt-in), bytes.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
NVCC_ARCHS = {80: "sm_80", 90: "sm_90a"}
TENSOR_CORE_SASS = re.compile(r"\b(HMMA|IMMA|HGMMA|IGMMA|QGMMA|UTCHMMA|UTCIMMA)\b")


def cuobjdump():
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def cubin_report(path):
    """[{function, reg, stack, shared, tensor_core_instrs}] for every function in a cubin."""
    usage = subprocess.run([cuobjdump(), "--dump-resource-usage", path], capture_output=True, text=True,
                           check=True).stdout
    sass = subprocess.run([cuobjdump(), "--dump-sass", path], capture_output=True, text=True, check=True).stdout
    tc_per_fn, current = {}, None
    for line in sass.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            current = m.group(1)
            tc_per_fn[current] = 0
        elif current and TENSOR_CORE_SASS.search(line):
            tc_per_fn[current] += 1
    out = []
    for m in re.finditer(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+)", usage):
        fn = m.group(1)
        out.append(dict(function=fn, reg=int(m.group(2)), stack=int(m.group(3)), shared=int(m.group(4)),
                        tensor_core_instrs=tc_per_fn.get(fn, 0)))
    return out


def compile_cu(source, arch, out_dir):
    name = "%s.%s.cubin" % (os.path.basename(source), NVCC_ARCHS[arch])
    cubin = os.path.join(out_dir, name)
    cmd = ["nvcc", "-cubin", "-arch=" + NVCC_ARCHS[arch], "-O3", "-std=c++17", "--expt-relaxed-constexpr",
           "-I" + os.path.join(ROOT, "csrc"), source, "-o", cubin]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return [dict(kind="cuda", source=os.path.relpath(source, ROOT), arch=arch, ok=False,
                     error=(proc.stderr or proc.stdout)[-3000:])]
    return [dict(kind="cuda", source=os.path.relpath(source, ROOT), arch=arch, ok=True, **fn)
            for fn in cubin_report(cubin)]


def compile_triton(module_name, index, arch, out_dir):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec = importlib.import_module(module_name).AOT_SPECS[index]
    row = dict(kind="triton", source=module_name, config=spec.label(), arch=arch)
    try:
        src = ASTSource(fn=spec.kernel, signature=spec.signature, constexprs=spec.constexprs)
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                options=dict(num_warps=spec.num_warps, num_stages=spec.num_stages))
    except Exception as exc:
        return [dict(row, ok=False, error="%s: %s" % (type(exc).__name__, str(exc)[-3000:]))]
    cubin = os.path.join(out_dir, "%s.%d.sm%d.cubin" % (module_name.rsplit(".", 1)[-1], index, arch))
    with open(cubin, "wb") as f:
        f.write(kernel.asm["cubin"])
    with open(cubin.replace(".cubin", ".ptx"), "w") as f:
        f.write(kernel.asm["ptx"])
    rows = cubin_report(cubin)
    # Triton's shared memory is dynamic: the cubin says 0, the compile metadata has the real figure.
    return [dict(row, ok=True, **dict(r, shared=max(r["shared"], kernel.metadata.shared))) for r in rows]


def triton_jobs():
    sys.path.insert(0, ROOT)
    jobs = []
    for path in sorted(glob.glob(os.path.join(ROOT, "triton_kernels", "*.py"))):
        base = os.path.basename(path)[:-3]
        if base.startswith("_"):
            continue
        module_name = "effops.triton_kernels." + base
        specs = getattr(importlib.import_module(module_name), "AOT_SPECS", None)
        if specs is None:
            raise SystemExit("%s lists no AOT_SPECS: every Triton kernel module must" % module_name)
        jobs += [(module_name, i) for i in range(len(specs))]
    return jobs


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="build/gpu-compile-check")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)  # the real compiler, never the interpreter
    os.makedirs(args.out, exist_ok=True)
    sys.path.insert(0, ROOT)
    start = time.time()
    futures = []
    with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
        for source in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))):
            for arch in NVCC_ARCHS:
                futures.append(pool.submit(compile_cu, source, arch, args.out))
        for module_name, index in triton_jobs():
            for arch in (80, 90):
                futures.append(pool.submit(compile_triton, module_name, index, arch, args.out))
        rows = [r for f in futures for r in f.result()]

    failures = []
    lines = ["| kind | source | config | sm | function | regs | spill stack | shared B | tensor-core SASS |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r["ok"]:
            failures.append("%s %s %s sm_%d:\n%s" % (r["kind"], r["source"], r.get("config", ""), r["arch"], r["error"]))
            continue
        if r["shared"] > SMEM_LIMIT[r["arch"]]:
            failures.append("%s %s sm_%d: %d B shared memory exceeds the %d B limit"
                            % (r["source"], r.get("config", r["function"]), r["arch"], r["shared"], SMEM_LIMIT[r["arch"]]))
        lines.append("| %s | %s | %s | %d | %s | %d | %d | %d | %d |" % (
            r["kind"], r["source"].replace("effops.triton_kernels.", ""), r.get("config", ""), r["arch"],
            r["function"][:40], r["reg"], r["stack"], r["shared"], r["tensor_core_instrs"]))
    report = "\n".join(lines)
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(report + "\n")
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print(report)
    print("\n%d kernel builds in %.0f s; report in %s" % (len(rows), time.time() - start, args.out))
    if failures:
        print("\nGPU compile check FAILED:\n" + "\n\n".join(failures))
        sys.exit(1)
    if not rows:
        print("no GPU code found")


if __name__ == "__main__":
    main()
