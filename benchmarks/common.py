"""Timing side by side: every implementation of one case timed in the same process, interleaved,
medians compared as ratios against a named baseline (this machine is shared and noisy: one absolute
time means little, a ratio taken in one run means more).

Each benchmarks/bench_<op>.py has `run(quick, device) -> list[dict]` that builds rows with `compare`.
"""
import statistics
import sys
import time

import torch


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn, device, min_time=0.2, warm_up=True):
    """Median seconds per call of fn(), after a warm-up call (which may compile) unless warm_up=False."""
    if warm_up:
        fn()
        _sync(device)
    if torch.device(device).type == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    # A call that alone lasts min_time is its own sample: blocked_autorange would run it at least twice
    # more (block-size estimate, then a block), which made the full sweeps run for hours. That sample is
    # the second call: the first after another implementation pays for that one's leftovers (freeing its
    # tensors; glibc's heap and mmap threshold moved by its allocations), which made identical code
    # measure up to 2.5x apart depending on what ran before it. A training loop repeats the same step.
    start = time.perf_counter()
    fn()
    once = time.perf_counter() - start
    if once >= min_time:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    import torch.utils.benchmark as tb
    m = tb.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_time)
    return m.median


def cpu_time_fn(fn, device="cpu", min_time=0.2, warm_up=True):
    """Median CPU seconds of this thread per call of fn() (run with torch.set_num_threads(1): the kernels
    then run in this thread). Other processes on a shared machine slow wall clock, not this."""
    if warm_up:
        fn()
    samples = []
    while sum(samples) < min_time or len(samples) < 3:
        start = time.thread_time()
        fn()
        samples.append(time.thread_time() - start)
    return statistics.median(samples)


def compare(op, case, impls, baseline, device="cpu", rounds=3, min_time=0.2, work=None, work_unit=None,
            extra=None, timer=time_fn):
    """Time every impl of one case, interleaved over `rounds` rounds; one row per impl.

    impls: {name: zero-argument callable}; baseline: the name of the outside implementation the
    ratio is taken against (ratio > 1 means faster than the baseline). work: FLOPs or bytes per call,
    giving a rate in work_unit/s ("GFLOP/s", "GB/s", "GOP/s"). timer: time_fn (wall clock) or cpu_time_fn.
    """
    samples = {name: [] for name in impls}
    for i in range(rounds):
        for name, fn in impls.items():
            samples[name].append(timer(fn, device, min_time, warm_up=(i == 0)))
    medians = {name: statistics.median(s) for name, s in samples.items()}
    # Progress on stderr: a full sweep runs for many minutes.
    print("  %s | %s | %s" % (op, case, ", ".join("%s %.2fx" % (n, medians[baseline] / t) for n, t in medians.items())),
          file=sys.stderr, flush=True)
    rows = []
    for name, t in medians.items():
        row = dict(op=op, case=case, impl=name, baseline=baseline, time_ms=t * 1e3,
                   speedup=medians[baseline] / t)
        if work is not None:
            row["rate"] = work / t / 1e9
            row["rate_unit"] = work_unit
        row.update(extra or {})
        rows.append(row)
    return rows


def peak_memory(fn, device="cpu"):
    """Peak bytes allocated while fn() runs (CUDA allocator stats, or the CPU profiler's tally)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Running sum of allocations/frees in event order; its maximum is the peak above the start. Self
    # figures: an event's cpu_memory_usage includes its child ops', which would count one allocation
    # once per nesting level (aten::conv2d -> aten::convolution -> ... -> aten::empty). The profiler
    # sees no free of a block allocated before it started: free such blocks (old gradients) first.
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    level = peak = 0
    for e in events:
        level += e.self_cpu_memory_usage
        peak = max(peak, level)
    return peak


def now():
    return time.strftime("%Y-%m-%d %H:%M:%S")
