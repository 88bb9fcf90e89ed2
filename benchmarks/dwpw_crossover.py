"""Crossover check for the dwpw_conv2d cpu speed rule (effops/ops/dwpw_conv2d.py:_cpu_faster).

Forward (no grad) of the benchmark's block shapes (3x3, ReLU6, stride 1, fp32) at several batch sizes:
the fused cpu kernel (forced) against torch's two convolutions in the same layout (= the reference
backend, what the automatic choice falls back to) and in the faster layout. Interleaved, min of
at least `reps` single calls (and 0.5 s per impl), default threads. Prints fused/torch speed ratios (> 1: fused faster).
Run: PYTHONPATH=. python benchmarks/dwpw_crossover.py [reps] [batches, e.g. 1,4,16,32] [cpu] [train]
With "train": one training step (forward + backward to x and both weights, gy in x's layout) on the
benchmark's six block shapes (benchmarks/bench_dwpw_conv2d.py), for torch's two convolutions, the
fused op forced ("fused": cpu forward + cpu backward) and the automatic choice ("auto"), both layouts.
With "cpu": one thread, and CPU time of that thread (time.thread_time) instead of wall time: on the
shared 2-core machine wall times of 2-thread calls of a few ms were dominated by waking the second
OpenMP thread (50 ms for a 0.6 ms call), CPU time of one thread is not.
"""
import sys
import time

import torch
import torch.nn.functional as F

import effops
from benchmarks.bench_dwpw_conv2d import training_step as step
from effops.ops import dwpw_conv2d

SHAPES = [(32, 64, 112), (64, 128, 56), (256, 256, 14), (512, 512, 7)]  # (C, O, H)
TRAIN_SHAPES = [(32, 64, 112, 1), (64, 128, 56, 1), (96, 96, 56, 2), (256, 256, 14, 1), (512, 512, 7, 1),
                (144, 24, 56, 1)]  # (C, O, H, stride): the benchmark's


def torch_block(x, dw, pw):
    return F.conv2d(F.relu6(F.conv2d(x, dw, None, 1, 1, 1, x.shape[1])), pw)


def fused(x, dw, pw):
    with effops.use_backend("cpu"):
        return dwpw_conv2d(x, dw, pw, padding=1, activation="relu6")


CLOCK = time.perf_counter


def once(fn):
    start = CLOCK()
    fn()
    return CLOCK() - start


def step_inputs(N, C, O, H, stride):
    """x (N, C, H, H), the 3x3 depthwise and 1x1 weights (requiring grad) and gy of one training step."""
    torch.manual_seed(0)
    x = torch.randn(N, C, H, H)
    dw, pw = (torch.randn(C, 1, 3, 3) / 3).requires_grad_(), (torch.randn(O, C, 1, 1) / C ** 0.5).requires_grad_()
    OH = (H - 1) // stride + 1
    return x, dw, pw, torch.randn(N, O, OH, OH)


def torch_step_block(x, dw, pw, stride):
    return F.conv2d(F.relu6(F.conv2d(x, dw, None, stride, 1, 1, x.shape[1])), pw)


def auto_step_block(x, dw, pw, stride):
    return dwpw_conv2d(x, dw, pw, stride=stride, padding=1, activation="relu6")


def measure(impls, reps):
    """Interleaved rounds: at least `reps` and 0.5 s per impl; the best time of each impl. Each timed
    step follows an untimed step of the same impl: the first step after another impl pays for that
    impl's leftovers (freeing its gradients, glibc's mmap threshold and heap moved by its allocations;
    identical code measured up to 2.5x apart depending on which impl ran before it)."""
    for fn in impls.values():
        fn()  # warm-up
    times = {k: [] for k in impls}
    while min(len(v) for v in times.values()) < reps or min(sum(v) for v in times.values()) < 0.5:
        for k, fn in impls.items():
            fn()
            times[k].append(once(fn))
    return {k: min(v) for k, v in times.items()}


def train(reps, batches):
    for N in batches:
        for C, O, H, stride in TRAIN_SHAPES:
            x, dw, pw, gy = step_inputs(N, C, O, H, stride)
            impls = {}
            for lay in ("nchw", "cl"):
                fmt = torch.channels_last if lay == "cl" else torch.contiguous_format
                xl = x.contiguous(memory_format=fmt).requires_grad_()
                g = gy.contiguous(memory_format=fmt)
                impls["torch", lay] = step(torch_step_block, xl, dw, pw, stride, g)
                impls["fused", lay] = step(auto_step_block, xl, dw, pw, stride, g, forced="cpu")
                impls["auto", lay] = step(auto_step_block, xl, dw, pw, stride, g)
            best = measure(impls, reps)
            torch_best = min(best["torch", "nchw"], best["torch", "cl"])
            print("N=%-2d %3d->%-3d %3dx%-3d s%d  torch nchw %.1f cl %.1f ms | " % (
                N, C, O, H, H, stride, best["torch", "nchw"] * 1e3, best["torch", "cl"] * 1e3) + "  ".join(
                "%s %s %.1f ms %.2fx" % (kind, lay, best[kind, lay] * 1e3, torch_best / best[kind, lay])
                for kind in ("fused", "auto") for lay in ("nchw", "cl")) + "  (x: vs faster torch)", flush=True)


def main():
    reps = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    batches = [int(b) for b in sys.argv[2].split(",")] if len(sys.argv) > 2 else [1, 4, 16, 32]
    if len(sys.argv) > 3 and sys.argv[3] == "cpu":
        global CLOCK
        CLOCK = time.thread_time
        torch.set_num_threads(1)
    if "train" in sys.argv[4:]:
        return train(reps, batches)
    torch.manual_seed(0)
    with torch.no_grad():
        for N in batches:
            for C, O, H in SHAPES:
                x = torch.randn(N, C, H, H)
                xs = {"nchw": x, "cl": x.contiguous(memory_format=torch.channels_last)}
                dw, pw = torch.randn(C, 1, 3, 3) / 3, torch.randn(O, C, 1, 1) / C ** 0.5
                impls = {(kind, lay): (lambda f=f, xl=xl: f(xl, dw, pw))
                         for lay, xl in xs.items() for kind, f in (("torch", torch_block), ("fused", fused))}
                for fn in impls.values():
                    fn()  # warm-up
                times = {k: [] for k in impls}
                # At least `reps` rounds and 0.5 s per impl: small inputs get many more samples, since
                # on a shared machine a single descheduled thread ruins a short call.
                while len(times["torch", "cl"]) < reps or min(sum(v) for v in times.values()) < 0.5:
                    for k, fn in impls.items():
                        times[k].append(once(fn))
                best = {k: min(v) for k, v in times.items()}
                torch_best = min(best["torch", "nchw"], best["torch", "cl"])
                macs = N * H * H * C * O
                print("N=%-2d %3d->%-3d %3dx%-3d MACs=%.2e  " % (N, C, O, H, H, macs) + "  ".join(
                    "%s: fused %.1f ms, vs same-layout torch %.2fx, vs faster torch %.2fx"
                    % (lay, best["fused", lay] * 1e3, best["torch", lay] / best["fused", lay],
                       torch_best / best["fused", lay]) for lay in xs), flush=True)


if __name__ == "__main__":
    main()
