"""Where Int8Linear beats the fp32 nn.Linear it replaces, by layer size: sets effops.quantize's default
min_features (effops.transforms.quantize.MIN_FEATURES_BY_CPU). Re-run after the int8 kernels change.

    python -m benchmarks.int8_min_features
"""
import torch
import torch.utils.benchmark as tb
from torch import nn

from effops.nn import Int8Linear

SHAPES = [(192, 192), (256, 1024), (384, 1536), (512, 2048), (768, 768), (768, 3072), (3072, 768), (1024, 4096)]
ROWS = (1, 50, 800)  # one token; ViT-B/32's 50 tokens; 16 images of them


def main():
    torch.manual_seed(0)
    print("CPU capability %s, %d threads" % (torch.backends.cpu.get_cpu_capability(), torch.get_num_threads()))
    print("| in x out | rows | fp32 nn.Linear ms | Int8Linear ms | int8 vs fp32 |\n|---|---|---|---|---|")
    for k, n in SHAPES:
        lin = nn.Linear(k, n).eval()
        q = Int8Linear.from_linear(lin)
        for m in ROWS:
            x = torch.randn(m, k)
            with torch.inference_mode():  # alternating, best of two medians each
                t = [tb.Timer("f(x)", globals=dict(f=f, x=x)).blocked_autorange(min_run_time=0.3).median
                     for f in (lin, q, lin, q)]
            fp32, int8 = min(t[0], t[2]), min(t[1], t[3])
            print("| %dx%d | %d | %.3f | %.3f | %.2fx |" % (k, n, m, fp32 * 1e3, int8 * 1e3, fp32 / int8), flush=True)


if __name__ == "__main__":
    main()
