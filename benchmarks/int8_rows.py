"""Per-M throughput of Int8Linear (8-bit and 7-bit weights) and one big call against 256-row calls.

Single thread, thread CPU time (see benchmarks/int8_interleaved.py for why), K = N = 4096.
* scan: GOP/s of the dynamic module at each M (best of 3 rounds), to see whether large M is slower
  per operation than small M.
* --split M: the ratio time(one M-row call) / time(M/256 calls of 256 rows), interleaved over 6 rounds
  (medians): above 1 means the big call loses something that row chunks keep (cache locality).
Usage: python -m benchmarks.int8_rows 1 16 256 2048 [--split 2048]
"""
import argparse
import statistics
import time

import torch

import effops


def main():
    p = argparse.ArgumentParser()
    p.add_argument("m", type=int, nargs="*")
    p.add_argument("--split", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    k = n = 4096
    lin = torch.nn.Linear(k, n)
    mods = {"w8": effops.nn.Int8Linear.from_linear(lin, mode="dynamic"),
            "w7": effops.nn.Int8Linear.from_linear(lin, mode="dynamic", weight_bits=7)}
    best = {}
    with torch.no_grad():
        for _ in range(3):
            for m in args.m:
                x = torch.randn(m, k)
                for name, mod in mods.items():
                    mod(x)
                    reps = max(1, int(0.03 / (2 * m * k * n / 150e9)))
                    s = time.thread_time()
                    for _ in range(reps):
                        mod(x)
                    best[m, name] = min(best.get((m, name), 1e9), (time.thread_time() - s) / reps)
        for m in args.m:
            print("M=%-5d 8-bit %.1f GOP/s  7-bit %.1f GOP/s" % (
                m, 2 * m * k * n / best[m, "w8"] / 1e9, 2 * m * k * n / best[m, "w7"] / 1e9), flush=True)
        if args.split:
            x = torch.randn(args.split, k)
            ratios = {name: [] for name in mods}
            for r in range(6):
                for name, mod in mods.items():
                    t = {}
                    for how in ("full", "chunks") if r % 2 else ("chunks", "full"):
                        s = time.thread_time()
                        if how == "full":
                            mod(x)
                        else:
                            for i in range(0, args.split, 256):
                                mod(x[i:i + 256])
                        t[how] = time.thread_time() - s
                    ratios[name].append(t["full"] / t["chunks"])
            for name, v in ratios.items():
                print("M=%d %s: one call / 256-row calls = %.3f (median of 6) %s" % (
                    args.split, name, statistics.median(v), ["%.2f" % a for a in v]))


if __name__ == "__main__":
    main()
