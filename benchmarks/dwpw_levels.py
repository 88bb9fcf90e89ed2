"""The dwpw_conv2d cpu kernels' bodies against each other and against torch, one thread, CPU time.

For each block shape (3x3, ReLU6, fp32 unless "bf16" is given) and layout: the fused forward (no grad)
and the fused training step (forward + backward to x and both weights) with the kernels capped to each
instruction-set level in LEVELS (effops.cpu_isa.use_cpu_isa), and torch's two convolutions, all in
one process, interleaved over rounds; medians of the thread's CPU time (time.thread_time), so the
load of a shared machine does not count. Prints each body's time and its ratio against torch and
against the first level (> 1: faster). torch runs at its own level: to emulate an AVX2 machine cap it
too (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2) and pass avx2 only.

Run: PYTHONPATH=. python benchmarks/dwpw_levels.py [batch=8] [levels=avx2,avx512] [rounds=5] [bf16]
     [--shape C,O,H,stride] (one block instead of the six)
"""
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import effops
from effops.ops import dwpw_conv2d

SHAPES = [(32, 64, 112, 1), (64, 128, 56, 1), (96, 96, 56, 2), (256, 256, 14, 1), (512, 512, 7, 1),
          (144, 24, 56, 1)]  # (C, O, H, stride): bench_dwpw_conv2d.py's blocks


def cpu_time(fn, min_time=0.3):
    """Median thread CPU time of fn() over calls filling min_time (at least 3 calls)."""
    times = []
    while len(times) < 3 or sum(times) < min_time:
        start = time.thread_time()
        fn()
        times.append(time.thread_time() - start)
    return statistics.median(times)


def main():
    args = sys.argv[1:]
    shapes = SHAPES
    if "--shape" in args:
        i = args.index("--shape")
        shapes = [tuple(int(v) for v in args[i + 1].split(","))]
        del args[i:i + 2]
    dtype = torch.bfloat16 if "bf16" in args else torch.float32
    args = [a for a in args if a != "bf16"]
    batch = int(args[0]) if args else 8
    levels = args[1].split(",") if len(args) > 1 else ["avx2", "avx512"]
    rounds = int(args[2]) if len(args) > 2 else 5
    torch.set_num_threads(1)
    print("batch %d, %s, one thread, CPU time; torch capability %s; effops levels %s"
          % (batch, dtype, torch.backends.cpu.get_cpu_capability(), ",".join(levels)))
    for C, O, H, stride in shapes:
        for layout in ("nchw", "channels_last"):
            torch.manual_seed(0)
            x = torch.randn(batch, C, H, H, dtype=dtype)
            if layout == "channels_last":
                x = x.contiguous(memory_format=torch.channels_last)
            dw = (torch.randn(C, 1, 3, 3) / 3).to(dtype).requires_grad_()
            pw = (torch.randn(O, C, 1, 1) / C ** 0.5).to(dtype).requires_grad_()
            xg = x.clone().requires_grad_()

            def torch_fwd():
                with torch.no_grad():
                    F.conv2d(F.relu6(F.conv2d(x, dw, None, stride, 1, 1, C)), pw)

            def torch_step():
                F.conv2d(F.relu6(F.conv2d(xg, dw, None, stride, 1, 1, C)), pw).sum().backward()

            def fused_fwd(level):
                def run():
                    with torch.no_grad(), effops.use_backend("cpu"), effops.cpu_isa.use_cpu_isa(level):
                        dwpw_conv2d(x, dw, pw, stride=stride, padding=1, activation="relu6")
                return run

            def fused_step(level):
                def run():
                    with effops.use_backend("cpu"), effops.cpu_isa.use_cpu_isa(level):
                        dwpw_conv2d(xg, dw, pw, stride=stride, padding=1, activation="relu6").sum().backward()
                return run

            for mode, base, make in (("fwd", torch_fwd, fused_fwd), ("step", torch_step, fused_step)):
                impls = {"torch": base, **{lv: make(lv) for lv in levels}}
                samples = {k: [] for k in impls}
                for _ in range(rounds):
                    for k, fn in impls.items():
                        fn()  # an untimed call first: the allocator state the previous impl left
                        samples[k].append(cpu_time(fn))
                med = {k: statistics.median(v) for k, v in samples.items()}
                cells = ", ".join("%s %.1f ms (%.2fx torch%s)" % (
                    lv, med[lv] * 1e3, med["torch"] / med[lv],
                    "" if lv == levels[0] else ", %.2fx %s" % (med[levels[0]] / med[lv], levels[0]))
                    for lv in levels)
                print("%3d -> %3d @%3d s%d %-13s %-4s torch %.1f ms | %s" % (C, O, H, stride, layout, mode,
                                                                         med["torch"] * 1e3, cells), flush=True)


if __name__ == "__main__":
    main()
