"""Interleaved timing of effops Int8Linear (dynamic) vs torch quantize_dynamic (FBGEMM) vs fp32 F.linear.

For each M the three are built from one nn.Linear(K, N) and called in turn, round after round (the
order rotating each round); each round gives a ratio, and the median and the spread (min-max) of the
per-round ratios are printed, so that a busy machine shows up as spread rather than as a wrong answer.
With --threads 1 the times are the thread's CPU time (time.thread_time: every library runs a
single-threaded call inline), which time slices taken by other processes do not inflate: the measure of
the kernels themselves on a shared machine.
With --w7 a fourth contestant, Int8Linear(weight_bits=7), is timed in the same rounds (its ratios
printed on a second line).
Usage: python -m benchmarks.int8_interleaved [--k K] [--n N] [--rounds R] [--threads T] [--w7] M [M ...]
"""
import argparse
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

import effops


def main():
    p = argparse.ArgumentParser()
    p.add_argument("m", type=int, nargs="+")
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    p.add_argument("--w7", action="store_true", help="also time Int8Linear(weight_bits=7)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lin = torch.nn.Linear(args.k, args.n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fb = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)
    ours = effops.nn.Int8Linear.from_linear(lin, mode="dynamic")
    ours7 = effops.nn.Int8Linear.from_linear(lin, mode="dynamic", weight_bits=7) if args.w7 else None
    print("K=%d N=%d threads=%d rounds=%d" % (args.k, args.n, torch.get_num_threads(), args.rounds))
    for m in args.m:
        x = torch.randn(m, args.k)
        fns = {"ours": lambda: ours(x), "fbgemm": lambda: fb(x), "fp32": lambda: F.linear(x, lin.weight, lin.bias)}
        if ours7 is not None:
            fns["ours7"] = lambda: ours7(x)
        names = list(fns)
        # calls per timing: about 20 ms of work at ~150 GOP/s
        reps = max(1, int(0.02 / (2 * m * args.k * args.n / 150e9)))
        times = {k: [] for k in names}
        clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
        with torch.no_grad():
            for f in fns.values():
                f()
            for r in range(args.rounds):
                for k in names[r % len(names):] + names[:r % len(names)]:
                    s = clock()
                    for _ in range(reps):
                        fns[k]()
                    times[k].append((clock() - s) / reps)
        for mine in [n for n in names if n.startswith("ours")]:
            _report(m, mine, times)


def _report(m, mine, times):
    vs_fb = [f / o for f, o in zip(times["fbgemm"], times[mine])]
    vs_fp32 = [f / o for f, o in zip(times["fp32"], times[mine])]
    print("M=%-5d %-5s %.3f ms (min)  vs FBGEMM median %.2fx [%.2f-%.2f]  vs fp32 median %.2fx [%.2f-%.2f]"
          "  min-time ratios %.2fx / %.2fx" % (
              m, mine, min(times[mine]) * 1e3, statistics.median(vs_fb), min(vs_fb), max(vs_fb),
              statistics.median(vs_fp32), min(vs_fp32), max(vs_fp32),
              min(times["fbgemm"]) / min(times[mine]), min(times["fp32"]) / min(times[mine])), flush=True)


if __name__ == "__main__":
    main()
