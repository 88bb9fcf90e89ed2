"""The dwpw_conv2d cpu kernel in bf16 against torch's own bf16 convolutions, channels_last, for the
speed rules of effops/ops/dwpw_conv2d.py: on a CPU with AVX512-BF16 oneDNN runs torch's bf16
convolutions natively, while the fused kernel computes in fp32. Forward (no grad) and a training step
(forward + backward to x and both weights), the fused op forced and the automatic choice, interleaved
medians, ratios against torch (> 1: faster).

With --cpu-time: one thread and the CPU time of that thread (benchmarks.common.cpu_time_fn), robust
against the load of a shared machine; the fused op then runs the body of the current effops level
(EFFOPS_CPU_ISA caps it: at avx512_bf16 its channels-last forward takes the vdpbf16ps pointwise).

Run: PYTHONPATH=. python benchmarks/dwpw_bf16_crossover.py [--cpu-time]
"""
import sys

import torch
import torch.nn.functional as F

import effops
from benchmarks.common import compare, cpu_time_fn, time_fn
from effops.ops import dwpw_conv2d

SHAPES = [(32, 32, 64, 112), (32, 64, 128, 56), (32, 144, 24, 56), (32, 256, 256, 14), (8, 64, 128, 56)]  # N, C, O, H


def main():
    timer = time_fn
    if "--cpu-time" in sys.argv[1:]:
        torch.set_num_threads(1)
        timer = cpu_time_fn
    print("cpu level %s, torch capability %s" % (effops.cpu_isa.current(), torch.backends.cpu.get_cpu_capability()))
    for n, c, o, h in SHAPES:
        torch.manual_seed(0)
        x = torch.randn(n, c, h, h, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
        dw = torch.randn(c, 1, 3, 3, dtype=torch.bfloat16)
        pw = torch.randn(o, c, 1, 1, dtype=torch.bfloat16)
        xg, dwg, pwg = (t.clone().requires_grad_() for t in (x, dw, pw))

        def torch_fwd():
            return F.conv2d(F.relu6(F.conv2d(x, dw, None, 1, 1, 1, c)), pw)

        def fused_fwd():
            with effops.use_backend("cpu"):
                return dwpw_conv2d(x, dw, pw, padding=1, activation="relu6")

        def auto_fwd():
            return dwpw_conv2d(x, dw, pw, padding=1, activation="relu6")

        def auto_step():
            dwpw_conv2d(xg, dwg, pwg, padding=1, activation="relu6").sum().backward()

        def torch_step():
            F.conv2d(F.relu6(F.conv2d(xg, dwg, None, 1, 1, 1, c)), pwg).sum().backward()

        def fused_step():
            with effops.use_backend("cpu"):
                dwpw_conv2d(xg, dwg, pwg, padding=1, activation="relu6").sum().backward()

        case = "%dx%d->%d@%d bf16 channels_last" % (n, c, o, h)
        with torch.no_grad():
            fwd = compare("fwd", case, {"torch": torch_fwd, "fused": fused_fwd, "auto": auto_fwd}, "torch", rounds=3,
                          timer=timer)
        step = compare("step", case, {"torch": torch_step, "fused": fused_step, "auto": auto_step}, "torch", rounds=3,
                       timer=timer)
        print("%-36s forward fused %.2fx auto %.2fx | training step fused %.2fx auto %.2fx"
              % (case, fwd[1]["speedup"], fwd[2]["speedup"], step[1]["speedup"], step[2]["speedup"]), flush=True)


if __name__ == "__main__":
    main()
