"""dwpw_conv2d: fused depthwise 3x3 + ReLU6 + pointwise 1x1 vs torch's own two convolutions.

Cases: MobileNetV2 / EfficientNet block shapes at batch 32, the issue's case (quick mode: two of them,
64 -> 128 at 56x56 and 512 -> 512 at 7x7, the large- and the small-spatial end).
impls, timed interleaved in one process:
  torch NCHW / torch channels_last   F.conv2d(relu6(F.conv2d(x, dw, groups=C)), pw) on that layout
  effops NCHW / effops channels_last effops.ops.dwpw_conv2d, automatic backend, on that layout
  cpu NCHW / cpu channels_last       the same with the fused cpu kernel forced (effops.use_backend("cpu")),
                                     forward and backward, also where the automatic choice declines it
The baseline is the FASTER torch layout per case (speedup = that time / time). Modes: forward (no
grad) and fwd+bwd (one training step: forward, backward to x and all weights). Peak memory of the
training step is reported for torch, effops and cpu in channels_last (benchmarks.common.peak_memory: on CPU
the bytes alive above the start, each allocation counted once).
rate: GFLOP/s with 2*N*OH*OW*C*(kh*kw + O) per forward and 3x that per training step.
"""
import torch
import torch.nn.functional as F

import effops
from benchmarks.common import compare, peak_memory
from effops.ops import dwpw_conv2d

# (N, C, O, H, stride)
FULL = [(32, 32, 64, 112, 1), (32, 64, 128, 56, 1), (32, 96, 96, 56, 2), (32, 256, 256, 14, 1),
        (32, 512, 512, 7, 1), (32, 144, 24, 56, 1)]
QUICK = [(32, 64, 128, 56, 1), (32, 512, 512, 7, 1)]


def _auto(x, dw, pw, stride, training, device):
    """The backend the automatic choice takes for this block (the policy's answer for these shapes)."""
    from effops.ops.dwpw_conv2d import route_reason
    fused = "triton" if torch.device(device).type == "cuda" else "cpu"
    return fused if route_reason(x, dw, pw, [stride] * 2, [1, 1], [1, 1], training, torch.device(device).type) == "" \
        else "reference"


def _torch_block(x, dw, pw, stride):
    return F.conv2d(F.relu6(F.conv2d(x, dw, None, stride, 1, 1, x.shape[1])), pw)


def _effops_block(x, dw, pw, stride):
    return dwpw_conv2d(x, dw, pw, stride=stride, padding=1, activation="relu6")


def _forced_cpu_block(x, dw, pw, stride):
    with effops.use_backend("cpu"):
        return _effops_block(x, dw, pw, stride)


def training_step(block, x, dw, pw, stride, gy, forced=None):
    """One training step. `forced`: a backend forced around the forward AND the backward (autograd runs
    the backward after a `with use_backend()` inside the block has exited: forcing only the forward
    would time the automatic choice's backward)."""
    def call():
        for t in (x, dw, pw):
            t.grad = None
        block(x, dw, pw, stride).backward(gy)

    def forced_call():
        with effops.use_backend(forced):
            call()
    return forced_call if forced else call


def _rebase(rows, torch_names):
    """Make the faster torch layout the baseline of every row."""
    best = min(r["time_ms"] for r in rows if r["impl"] in torch_names)
    for r in rows:
        r["speedup"] = best / r["time_ms"]
        r["baseline"] = "faster of torch NCHW / channels_last"
    return rows


def run(quick, device):
    rows = []
    rounds, min_time = (4, 0.1) if quick else (5, 0.2)  # allocator state swings single rounds by 2x
    for N, C, O, H, stride in (QUICK if quick else FULL):
        torch.manual_seed(0)
        x = torch.randn(N, C, H, H, device=device)
        xs = {"NCHW": x, "channels_last": x.contiguous(memory_format=torch.channels_last)}
        dw = torch.randn(C, 1, 3, 3, device=device) / 3
        pw = torch.randn(O, C, 1, 1, device=device) / C ** 0.5
        OH = (H + 2 - 3) // stride + 1
        flops = 2 * N * OH * OH * C * (9 + O)
        case = "%dx%d->%d %dx%d s%d" % (N, C, O, H, H, stride)
        auto = _auto(xs["channels_last"], dw, pw, stride, False, device)
        auto_nchw = _auto(x, dw, pw, stride, False, device)
        extra = dict(mode="forward", auto_backend="%s / %s" % (auto_nchw, auto))
        impls = {}
        for layout, xl in xs.items():
            impls["torch " + layout] = (lambda xl=xl: _torch_block(xl, dw, pw, stride))
            impls["effops " + layout] = (lambda xl=xl: _effops_block(xl, dw, pw, stride))
            if device == "cpu":
                impls["cpu " + layout] = (lambda xl=xl: _forced_cpu_block(xl, dw, pw, stride))
        with torch.no_grad():
            fwd = compare("dwpw_conv2d", case, impls, "torch channels_last", device, rounds, min_time, flops,
                          "GFLOP/s", extra)
        rows += _rebase(fwd, ("torch NCHW", "torch channels_last"))

        params = [t.clone().requires_grad_() for t in (dw, pw)]
        gy = torch.randn(N, O, OH, OH, device=device)
        impls, memory = {}, {}
        for layout, xl in xs.items():
            xg = xl.clone().requires_grad_()
            g = gy.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else gy
            impls["torch " + layout] = training_step(_torch_block, xg, *params, stride, g)
            impls["effops " + layout] = training_step(_effops_block, xg, *params, stride, g)
            if device == "cpu":
                impls["cpu " + layout] = training_step(_effops_block, xg, *params, stride, g, forced="cpu")
            if layout == "channels_last":
                for name in [n for n in impls if n.endswith(layout)]:
                    impls[name]()  # warm-up; then no gradients left from an earlier step (the profiler
                    for t in (xg, *params):  # does not see frees of blocks allocated before it started)
                        t.grad = None
                    memory[name] = peak_memory(impls[name], device) / 2 ** 20
        # The automatic choice of a training step: the forward sees tensors that require grad.
        fwd = [_auto(xl, dw, pw, stride, True, device) for xl in xs.values()]  # the fused pair or neither
        step = compare("dwpw_conv2d", case, impls, "torch channels_last", device, rounds, min_time, 3 * flops,
                       "GFLOP/s", dict(extra, mode="fwd+bwd",
                                       auto_backend="%s / %s" % tuple(fwd)))
        for r in step:
            if r["impl"] in memory:  # measured for the channels_last pair only
                r["peak_MiB"] = memory[r["impl"]]
        rows += _rebase(step, ("torch NCHW", "torch channels_last"))
    return rows
