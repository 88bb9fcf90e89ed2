"""`make bench`: every benchmarks/bench_*.py side by side with its outside baseline.

Writes <out>/results.json (rows plus machine, versions and commit) and <out>/results.md (one table per
op), and prints the tables. Both files are rewritten after every benchmark module, so a run stopped by a
time limit (`make gpu-check`) keeps the modules that finished; a module that raises is reported (its
traceback printed, its name under "errors" in results.json) and the others still run.

    python -m benchmarks.run [--quick] [--only adam_step,...] [--device cpu|cuda] [--out DIR] [--levels all|top|avx2,...]

On the CPU, modules whose kernels have a body per instruction-set level (LEVEL_DEPENDENT = True: int8,
masked_linear) run once per vector level this machine has, up to the current cap (EFFOPS_CPU_ISA;
`make bench ISA=avx2` caps torch too), each row tagged with its `cpu_level`; the others run at the
current level. The scalar level is a fallback for CPUs without AVX2 and is not timed.
"""
import argparse
import glob
import importlib
import json
import os
import platform
import subprocess
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def machine_info(device):
    info = dict(date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), python=platform.python_version(),
                torch=torch.__version__, threads=torch.get_num_threads(), cpu=platform.processor() or platform.machine(),
                device=device)
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    else:
        info.update(cpu_level_info())
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                        text=True).stdout.strip() or None
    except OSError:
        info["commit"] = None
    # A copy of the tree without .git (the GPU machine's) is named by EFFOPS_COMMIT (benchmarks/gpu_check.sh).
    info["commit"] = os.environ.get("EFFOPS_COMMIT") or info["commit"]
    return info


def cpu_level_info():
    """The instruction sets behind the CPU figures: effops' levels here and now, and torch's own capability."""
    from effops import cpu_isa
    from benchmarks import cpu_peak
    return dict(cpu_levels=list(cpu_isa.levels()), cpu_level=cpu_isa.current(), peaks=cpu_peak.measure(),
                torch_cpu_capability=torch.backends.cpu.get_cpu_capability(),
                caps={k: os.environ[k] for k in ("EFFOPS_CPU_ISA", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA",
                                                 "MKL_ENABLE_INSTRUCTIONS") if k in os.environ})


def bench_levels(spec):
    """The levels a level-dependent module runs at: every vector level up to the current one ('all'), the
    current one ('top'), or the listed ones."""
    from effops import cpu_isa
    current = cpu_isa.current()
    upto = cpu_isa.LEVELS[1:cpu_isa.LEVELS.index(current) + 1]
    if spec == "all":
        return list(upto) or [current]
    if spec == "top":
        return [current]
    levels = spec.split(",")
    for level in levels:
        if level not in upto and level != current:
            raise SystemExit("--levels: %r is not a level this run can use (%s)" % (level, ", ".join(upto)))
    return levels


def run_module(module, quick, device, levels):
    """module.run at each level (CPU, level-dependent modules) or once, rows tagged with cpu_level."""
    if torch.device(device).type != "cpu":
        return module.run(quick=quick, device=device)
    from effops import cpu_isa
    rows = []
    for level in levels if getattr(module, "LEVEL_DEPENDENT", False) else [cpu_isa.current()]:
        with cpu_isa.use_cpu_isa(level):
            new = module.run(quick=quick, device=device)
        for r in new:
            r["cpu_level"] = level
        rows += new
    return rows


def markdown(rows):
    out, by_op = [], {}
    for r in rows:
        by_op.setdefault(r["op"], []).append(r)
    for op, op_rows in by_op.items():
        out.append("### %s (speedup = baseline time / time; baseline: %s)\n" % (op, op_rows[0]["baseline"]))
        extra_keys = sorted({k for r in op_rows for k in r} - {"op", "case", "impl", "baseline", "time_ms", "speedup",
                                                                "rate", "rate_unit"})
        head = ["case", "impl", "time ms", "speedup", "rate"] + extra_keys
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        for r in op_rows:
            rate = "%.1f %s" % (r["rate"], r["rate_unit"]) if "rate" in r else ""
            cells = [str(r["case"]), r["impl"], "%.3f" % r["time_ms"], "%.2fx" % r["speedup"], rate]
            cells += [("%.3g" % r[k]) if isinstance(r.get(k), float) else str(r.get(k, "")) for k in extra_keys]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes and rounds (under 3 minutes on 2 cores)")
    parser.add_argument("--only", default="", help="comma-separated bench names (e.g. adam_step)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="bench-results")
    parser.add_argument("--levels", default="all", help="CPU levels of the level-dependent modules: all, top, or a list")
    args = parser.parse_args()
    names = sorted(os.path.basename(p)[len("bench_"):-3] for p in glob.glob(os.path.join(ROOT, "benchmarks", "bench_*.py")))
    if args.only:
        names = [n for n in names if n in args.only.split(",")]
    os.makedirs(args.out, exist_ok=True)
    machine = machine_info(args.device)
    levels = bench_levels(args.levels) if args.device == "cpu" else []
    if args.device == "cpu":
        print("cpu: %s; effops levels here: %s; running at: %s; torch capability %s%s\n" % (
            machine["cpu"], ", ".join(machine["cpu_levels"]), ", ".join(levels), machine["torch_cpu_capability"],
            "; caps: " + " ".join("%s=%s" % kv for kv in machine["caps"].items()) if machine["caps"] else ""),
            flush=True)
    rows, done, errors = [], [], {}
    for name in names:
        start = time.time()
        try:
            module = importlib.import_module("benchmarks.bench_" + name)
            new = run_module(module, args.quick, args.device, levels)
        except Exception:  # one broken benchmark (a GPU path never run before) must not lose the others
            errors[name] = traceback.format_exc()
            print("(%s FAILED after %.0f s)\n%s" % (name, time.time() - start, errors[name]), flush=True)
        else:
            rows += new
            done.append(name)
            print(markdown(new))
            print("(%s: %.0f s)\n" % (name, time.time() - start), flush=True)
        write_results(args.out, dict(machine=machine, quick=args.quick, benchmarks=done,
                                     pending=names[names.index(name) + 1:], errors=errors, rows=rows))
    try:
        from benchmarks import plots
        plots.write_plots(rows, args.out)
    except ImportError:
        pass
    print("results in %s" % args.out)
    if errors:
        raise SystemExit("benchmarks that failed: %s" % ", ".join(errors))


def write_results(out, result):
    """results.json and results.md as they stand; each written to a temporary name, then renamed, so a kill
    mid-write leaves the previous complete file."""
    m = result["machine"]
    head = "Measured %s, commit %s, %s, %d threads, torch %s\n\n" % (m["date"], m["commit"], m.get("gpu", m["cpu"]),
                                                                     m["threads"], m["torch"])
    if "cpu_levels" in m:
        head += "CPU levels here: %s; torch CPU capability %s%s\n\n" % (
            ", ".join(m["cpu_levels"]), m["torch_cpu_capability"],
            "; caps: " + " ".join("%s=%s" % kv for kv in m["caps"].items()) if m["caps"] else "")
        if m.get("peaks"):
            head += "Measured peaks (benchmarks/cpu_peak.py, %d threads): %s\n\n" % (
                m["threads"], ", ".join("%s %.0f" % kv for kv in m["peaks"].items()))
    if result["pending"]:
        head += "(partial: not yet run: %s)\n\n" % ", ".join(result["pending"])
    if result["errors"]:
        head += "(failed: %s; tracebacks in results.json)\n\n" % ", ".join(result["errors"])
    texts = {"results.json": json.dumps(result, indent=1), "results.md": head + markdown(result["rows"])}
    for fname, text in texts.items():
        path = os.path.join(out, fname)
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
