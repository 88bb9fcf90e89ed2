"""How fast could a fused depthwise + pointwise forward (and training step) be, at best, against torch?

Times torch's own parts of the block (depthwise conv, activation, 1x1 conv) at the benchmark's batch-32
shapes, one thread, each layout. A fused kernel that ran the 1x1 product at oneDNN's speed and got the
depthwise conv and the activation for free would take the 1x1 conv's time, so total / pointwise bounds
its speedup; where torch's pointwise alone is most of the block, a 2x forward needs a 1x1 product
faster than oneDNN's. (The bound is loose where torch's large outputs page-fault: the fused kernel
writes fewer of them.) Minimum of 5 runs per part, after one warm-up.
With `train`: the same for a training step (forward and backward for x and both weights): its three
1x1 products (forward, gradient of the activation, gradient of the 1x1 weight) bound the fused step.

Run: PYTHONPATH=. python benchmarks/dwpw_forward_bound.py [train]
"""
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = [(32, 64, 112, 1), (64, 128, 56, 1), (96, 96, 112, 2), (144, 24, 56, 1), (256, 256, 14, 1), (512, 512, 7, 1)]
BATCH = 32


def best_ms(fn, reps=5):
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def train_bound():
    for cin, cout, hw, stride in SHAPES:
        for layout in (torch.contiguous_format, torch.channels_last):
            x = torch.randn(BATCH, cin, hw, hw).contiguous(memory_format=layout).requires_grad_()
            dw = torch.randn(cin, 1, 3, 3, requires_grad=True)
            pw = torch.randn(cout, cin, 1, 1, requires_grad=True)
            with torch.no_grad():
                a = F.relu(F.conv2d(x, dw, None, stride, 1, 1, cin))
            a.requires_grad_()
            step = best_ms(lambda: F.conv2d(F.relu(F.conv2d(x, dw, None, stride, 1, 1, cin)), pw).sum().backward())
            pw_step = best_ms(lambda: F.conv2d(a, pw).sum().backward())
            print("%3d -> %3d @%3d s%d %-4s  torch step %7.1f ms, its 1x1 conv forward + backward %6.1f ms  bound %.2fx"
                  % (cin, cout, hw, stride, "CL" if layout == torch.channels_last else "NCHW", step, pw_step,
                     step / pw_step), flush=True)


def main():
    torch.set_num_threads(1)
    if sys.argv[1:] == ["train"]:
        return train_bound()
    with torch.no_grad():
        for cin, cout, hw, stride in SHAPES:
            for layout in (torch.contiguous_format, torch.channels_last):
                x = torch.randn(BATCH, cin, hw, hw).contiguous(memory_format=layout)
                dw, pw = torch.randn(cin, 1, 3, 3), torch.randn(cout, cin, 1, 1)
                h = F.conv2d(x, dw, None, stride, 1, 1, cin)
                a = F.relu(h)
                total = best_ms(lambda: F.conv2d(F.relu(F.conv2d(x, dw, None, stride, 1, 1, cin)), pw))
                t_dw = best_ms(lambda: F.conv2d(x, dw, None, stride, 1, 1, cin))
                t_act = best_ms(lambda: F.relu(h))
                t_pw = best_ms(lambda: F.conv2d(a, pw))
                gflops = 2 * BATCH * cin * cout * h.shape[2] * h.shape[3] / t_pw / 1e6
                print("%3d -> %3d @%3d s%d %-4s  torch %7.1f ms = dw %6.1f + act %5.1f + pw %6.1f (%5.1f GFLOP/s)"
                      "  bound %.2fx" % (cin, cout, hw, stride, "CL" if layout == torch.channels_last else "NCHW",
                                         total, t_dw, t_act, t_pw, gflops, total / t_pw), flush=True)


if __name__ == "__main__":
    main()
