"""Per-M throughput of Int8Linear (8-bit and 7-bit weights) and one big call against 256-row calls.

Single thread, thread CPU time (see benchmarks/int8_interleaved.py for why), K = N = 4096.
* scan: GOP/s of the dynamic module at each M (best of 3 rounds), to see whether large M is slower
  per operation than small M.
* --split M: the ratio time(one M-row call) / time(M/256 calls of 256 rows), interleaved over 6 rounds
  (medians): above 1 means the big call loses something that row chunks keep (cache locality).
* --vs-fbgemm: the transformer shapes of issue #15 (M = 1, 8, 400 at K x N = 768 x 3072 and 3072 x 768,
  M = 256 at 4096 x 4096), Int8Linear dynamic (8-bit and 7-bit weights) against torch's dynamic int8
  Linear (FBGEMM), called in turn with the order alternating, 9 rounds: medians of the times and of the
  per-round ratios ([min-max]), and with --peak GOP/s the % of a one-thread int8 peak (--peak auto:
  the one-thread vpdpbusd peak measured by benchmarks/cpu_peak.py before and after the cases, their
  mean; on a shared machine the clock, and so the peak, moves between runs). --threads N: N threads
  for every contestant (and the peak), timed in wall-clock time (one thread's CPU time would miss the
  others' work), so waits for a busy core count: quote such figures from a quiet machine only.
Usage: python -m benchmarks.int8_rows 1 16 256 2048 [--split 2048]
       python -m benchmarks.int8_rows --vs-fbgemm [--peak 1080 | --peak auto] [--threads 2]
"""
import argparse
import statistics
import time

import warnings

import torch

import effops

VS_FBGEMM_CASES = [(1, 768, 3072), (1, 3072, 768), (8, 768, 3072), (8, 3072, 768), (400, 768, 3072),
                   (400, 3072, 768), (256, 4096, 4096)]


def vs_fbgemm(peak=None, rounds=9, after_peak=None, threads=1):
    """after_peak: the peak measured before the cases; the % column is then printed at the end, against
    the mean of that and a second measurement."""
    clock = time.thread_time if threads == 1 else time.perf_counter
    lines = []
    for m, k, n in VS_FBGEMM_CASES:
        torch.manual_seed(0)
        lin, x = torch.nn.Linear(k, n), torch.randn(m, k)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao's deprecation notices
            fbgemm = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear},
                                                            dtype=torch.qint8)
        mods = {"fbgemm": fbgemm, "w8": effops.nn.Int8Linear.from_linear(lin, mode="dynamic"),
                "w7": effops.nn.Int8Linear.from_linear(lin, mode="dynamic", weight_bits=7)}
        reps = max(3, int(0.02 / (2 * m * k * n / 400e9 + 5e-6)))  # ~20 ms a contestant a round
        times = {name: [] for name in mods}
        for mod in mods.values():
            mod(x)
        for r in range(rounds):
            for name in (list(mods) if r % 2 else list(mods)[::-1]):
                s = clock()
                for _ in range(reps):
                    mods[name](x)
                times[name].append((clock() - s) / reps)
        med = {name: statistics.median(v) for name, v in times.items()}
        ratio = {name: [f / t for f, t in zip(times["fbgemm"], times[name])] for name in ("w8", "w7")}
        line = "M=%-4d %4d x %-4d FBGEMM %8.1f us  8-bit %8.1f us %.2fx [%.2f-%.2f]  7-bit %.2fx" % (
            m, k, n, med["fbgemm"] * 1e6, med["w8"] * 1e6, statistics.median(ratio["w8"]), min(ratio["w8"]),
            max(ratio["w8"]), statistics.median(ratio["w7"]))
        gops = {name: 2 * m * k * n / med[name] / 1e9 for name in ("w8", "fbgemm")}
        if peak:
            line += "  8-bit %.0f%% of peak, FBGEMM %.0f%%" % (100 * gops["w8"] / peak, 100 * gops["fbgemm"] / peak)
        lines.append((line, gops))
        if after_peak is None:
            print(line, flush=True)
    if after_peak is not None:
        from benchmarks import cpu_peak
        cpu_peak.measure.cache_clear()
        again = cpu_peak.measure(threads=threads)["int8_vnni_gops"]
        peak = (after_peak + again) / 2
        print("%d-thread vpdpbusd peak measured before / after: %.0f / %.0f GOP/s" % (threads, after_peak, again))
        for line, gops in lines:
            print(line + "  8-bit %.0f%% of peak, FBGEMM %.0f%%" % (100 * gops["w8"] / peak, 100 * gops["fbgemm"] / peak))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("m", type=int, nargs="*")
    p.add_argument("--split", type=int, default=0)
    p.add_argument("--vs-fbgemm", action="store_true")
    p.add_argument("--peak", default=None, help="int8 peak at --threads, GOP/s, for the %% column, or 'auto'")
    p.add_argument("--threads", type=int, default=1, help="threads; above 1 wall-clock times (--vs-fbgemm only)")
    args = p.parse_args()
    torch.set_num_threads(args.threads if args.vs_fbgemm else 1)
    if args.vs_fbgemm:
        peak, before = args.peak, None
        if peak == "auto":
            from benchmarks import cpu_peak
            peak, before = None, cpu_peak.measure(threads=args.threads)["int8_vnni_gops"]
        with torch.no_grad():
            vs_fbgemm(float(peak) if peak else None, after_peak=before, threads=args.threads)
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
