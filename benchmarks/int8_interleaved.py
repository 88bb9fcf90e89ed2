"""Interleaved timing of effops Int8Linear (dynamic) vs torch quantize_dynamic (FBGEMM) vs fp32 F.linear.

For each M the three are built from one nn.Linear(K, N) and called in turn, round after round (the
order rotating each round); each round gives a ratio, and the median and the spread (min-max) of the
per-round ratios are printed, so that a busy machine shows up as spread rather than as a wrong answer.
With --threads 1 the times are the thread's CPU time (time.thread_time: every library runs a
single-threaded call inline), which time slices taken by other processes do not inflate: the measure of
the kernels themselves on a shared machine.
Usage: python -m benchmarks.int8_interleaved [--k K] [--n N] [--rounds R] [--threads T] M [M ...]
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
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lin = torch.nn.Linear(args.k, args.n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fb = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)
    ours = effops.nn.Int8Linear.from_linear(lin, mode="dynamic")
    print("K=%d N=%d threads=%d rounds=%d" % (args.k, args.n, torch.get_num_threads(), args.rounds))
    for m in args.m:
        x = torch.randn(m, args.k)
        fns = {"ours": lambda: ours(x), "fbgemm": lambda: fb(x), "fp32": lambda: F.linear(x, lin.weight, lin.bias)}
        names = list(fns)
        # calls per timing: about 20 ms of work at ~150 GOP/s
        reps = max(1, int(0.02 / (2 * m * args.k * args.n / 150e9)))
        times = {k: [] for k in names}
        clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
        with torch.no_grad():
            for f in fns.values():
                f()
            for r in range(args.rounds):
                for k in names[r % 3:] + names[:r % 3]:
                    s = clock()
                    for _ in range(reps):
                        fns[k]()
                    times[k].append((clock() - s) / reps)
        vs_fb = [f / o for f, o in zip(times["fbgemm"], times["ours"])]
        vs_fp32 = [f / o for f, o in zip(times["fp32"], times["ours"])]
        print("M=%-5d ours %.3f ms (min)  vs FBGEMM median %.2fx [%.2f-%.2f]  vs fp32 median %.2fx [%.2f-%.2f]"
              "  min-time ratios %.2fx / %.2fx" % (
                  m, min(times["ours"]) * 1e3, statistics.median(vs_fb), min(vs_fb), max(vs_fb),
                  statistics.median(vs_fp32), min(vs_fp32), max(vs_fp32),
                  min(times["fbgemm"]) / min(times["ours"]), min(times["fp32"]) / min(times["ours"])), flush=True)


if __name__ == "__main__":
    main()
