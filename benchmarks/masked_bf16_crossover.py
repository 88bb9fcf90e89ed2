"""Crossover of the masked_linear cpu kernels in bf16 against torch's own bf16 F.linear on the dense
masked weight made ahead, for the speed rules of the op (kBf16Native in csrc/bindings/masked_linear.cpp):
on a CPU with AVX512-BF16 torch's bf16 GEMM runs about 2.8x its fp32 one, so the kernels win at lower
densities there than in fp32. Forward and forward+backward, the mask given alone (scanned on every
call, the weights packed as the kernels walk them), the cpu backend forced beside the automatic choice,
interleaved medians (benchmarks.common). The tiers given an index or packed weights:
benchmarks/masked_bf16_rows.py.

Run: PYTHONPATH=. python benchmarks/masked_bf16_crossover.py [pattern, default block32] [densities]
     [--cpu-time] [--shapes NxKxM,...] [--no-step]
--cpu-time: one thread, CPU time of that thread (time.thread_time; the kernels then run in it), which
other processes on a shared machine do not inflate. "auto" is the automatic choice (the op's own
speed rule), "cpu" the cpu backend forced.
"""
import argparse

import torch
import torch.nn.functional as F

import effops
from benchmarks.bench_masked_linear import make_mask
from benchmarks.common import compare, cpu_time_fn, time_fn
from effops.ops.masked_linear import masked_linear

SHAPES = [(4096, 4096, 256), (2048, 2048, 64), (4096, 4096, 2048)]  # (N, K, M)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("pattern", nargs="?", default="block32")
    p.add_argument("densities", nargs="?", default="0.05,0.1,0.2,0.3,0.4,0.5")
    p.add_argument("--cpu-time", action="store_true")
    p.add_argument("--shapes", default=",".join("%dx%dx%d" % s for s in SHAPES))
    p.add_argument("--no-step", action="store_true", help="forward only")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    pattern, timer = args.pattern, cpu_time_fn if args.cpu_time else time_fn
    densities = [float(d) for d in args.densities.split(",")]
    if args.cpu_time:
        torch.set_num_threads(1)
    print("cpu level %s, torch capability %s, %s" % (effops.cpu_isa.current(), torch.backends.cpu.get_cpu_capability(),
                                                     "one thread, CPU time" if args.cpu_time else "wall time"))
    for n, k, m in (tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")):
        for density in densities:
            torch.manual_seed(0)
            x = torch.randn(m, k, dtype=torch.bfloat16)
            w = torch.randn(n, k, dtype=torch.bfloat16)
            mask = make_mask(pattern, n, k, 1 - density)
            wm = w * mask
            xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()

            def ours():
                with effops.use_backend("cpu"):
                    return masked_linear(x, w, mask)

            def ours_step():
                torch.autograd.graph.increment_version(wg)
                with effops.use_backend("cpu"):
                    masked_linear(xg, wg, mask).sum().backward()

            def auto_step():
                masked_linear(xg, wg, mask).sum().backward()

            case = "%dx%d M=%d %s %.0f%% dense" % (n, k, m, pattern, 100 * density)
            with torch.no_grad():
                fwd = compare("bf16 fwd", case, {"torch": lambda: F.linear(x, wm), "cpu": ours,
                                                 "auto": lambda: masked_linear(x, w, mask)},
                              "torch", rounds=args.rounds, timer=timer)
            line = "%-40s forward cpu %.2fx auto %.2fx" % (case, fwd[1]["speedup"], fwd[2]["speedup"])
            if not args.no_step:
                step = compare("bf16 fwd+bwd", case, {"torch": lambda: F.linear(xg, wg * mask).sum().backward(),
                                                      "cpu": ours_step, "auto": auto_step}, "torch",
                               rounds=args.rounds, timer=timer)
                line += "  forward+backward cpu %.2fx auto %.2fx" % (step[1]["speedup"], step[2]["speedup"])
            print(line, flush=True)


if __name__ == "__main__":
    main()
