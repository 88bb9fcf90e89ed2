"""Crossover of the masked_linear cpu kernels in bf16 against torch's own bf16 F.linear on the dense
masked weight, for the speed rules of effops/ops/masked_linear.py (_CPU_LIMITS["bf16_native"]): on a
CPU with AVX512-BF16 torch's bf16 GEMM runs about 2.8x its fp32 one, so the kernels win at lower
densities there than in fp32. Forward (inference: the weight pack cached) and forward+backward
(training: packs rebuilt every step), the cpu backend forced, interleaved medians (benchmarks.common).

Run: PYTHONPATH=. python benchmarks/masked_bf16_crossover.py [pattern, default block32] [densities]
"""
import sys

import torch
import torch.nn.functional as F

import effops
from benchmarks.bench_masked_linear import make_mask
from benchmarks.common import compare
from effops.ops.masked_linear import masked_linear

SHAPES = [(4096, 4096, 256), (2048, 2048, 64), (4096, 4096, 2048)]  # (N, K, M)


def main():
    pattern = sys.argv[1] if len(sys.argv) > 1 else "block32"
    densities = [float(d) for d in (sys.argv[2] if len(sys.argv) > 2 else "0.05,0.1,0.2,0.3,0.4,0.5").split(",")]
    print("cpu level %s, torch capability %s" % (effops.cpu_isa.current(), torch.backends.cpu.get_cpu_capability()))
    for n, k, m in SHAPES:
        for density in densities:
            torch.manual_seed(0)
            x = torch.randn(m, k, dtype=torch.bfloat16)
            w = torch.randn(n, k, dtype=torch.bfloat16)
            mask = make_mask(pattern, n, k, 1 - density)
            wm = w * mask
            xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()

            def ours():
                with effops.use_backend("cpu"):
                    return masked_linear(x, w, mask)

            def ours_step():
                torch.autograd.graph.increment_version(wg)
                with effops.use_backend("cpu"):
                    masked_linear(xg, wg, mask).sum().backward()

            case = "%dx%d M=%d %s %.0f%% dense" % (n, k, m, pattern, 100 * density)
            fwd = compare("bf16 fwd", case, {"torch": lambda: F.linear(x, wm), "cpu": ours}, "torch", rounds=3)
            step = compare("bf16 fwd+bwd", case, {"torch": lambda: F.linear(xg, wg * mask).sum().backward(),
                                                  "cpu": ours_step}, "torch", rounds=3)
            print("%-40s forward %.2fx  forward+backward %.2fx" % (case, fwd[1]["speedup"], step[1]["speedup"]),
                  flush=True)


if __name__ == "__main__":
    main()
