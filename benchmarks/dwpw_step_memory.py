"""Peak memory of one dwpw_conv2d training step (forward + backward to x and both weights): torch's two
convolutions vs the fused cpu op (forward and backward forced), both layouts, the benchmark's block
shapes (benchmarks/bench_dwpw_conv2d.py, 3x3, ReLU6, fp32); x, gy and the weights exist before.

Tally: benchmarks.common.peak_memory (the peak of the bytes alive above the start, each allocation
counted once in the op that made it).
Run: PYTHONPATH=. python benchmarks/dwpw_step_memory.py [batch, default 32]
"""
import sys

import torch

from benchmarks.common import peak_memory
from benchmarks.dwpw_crossover import TRAIN_SHAPES, auto_step_block, step, step_inputs, torch_step_block


def main():
    N = int(sys.argv[1]) if len(sys.argv) > 1 else 32
    torch.set_num_threads(1)
    for C, O, H, stride in TRAIN_SHAPES:
        x, dw, pw, gy = step_inputs(N, C, O, H, stride)
        cells = []
        for lay, fmt in (("NCHW", torch.contiguous_format), ("channels_last", torch.channels_last)):
            xl, g = x.contiguous(memory_format=fmt).requires_grad_(), gy.contiguous(memory_format=fmt)
            fns = {"torch": step(torch_step_block, xl, dw, pw, stride, g),
                   "fused": step(auto_step_block, xl, dw, pw, stride, g, forced="cpu")}
            for fn in fns.values():
                fn()  # warm-up (one-time allocations of the first call)

            def measure(tally, fn):
                # Gradients of the previous step are freed before the profiler starts: it reports no
                # free of a block allocated before it started, which made the figures depend on order.
                for t in (xl, dw, pw):
                    t.grad = None
                return tally(fn) / 2 ** 20
            own = {k: measure(peak_memory, fn) for k, fn in fns.items()}
            cells.append("%s: torch %.1f MiB, fused %.1f MiB (%.2fx)" % (
                lay, own["torch"], own["fused"], own["fused"] / own["torch"]))
        print("N=%d %d->%d %dx%d s%d: %s" % (N, C, O, H, H, stride, "; ".join(cells)), flush=True)


if __name__ == "__main__":
    main()
