"""Int8Linear end to end (per-row activation quantization + int8 GEMM + fused epilogue) against fp32
F.linear and torch's own dynamic int8 Linear (torch.ao quantize_dynamic, FBGEMM) on CPU, for the default
8-bit weights and the opt-in 7-bit weights (Int8Linear weight_bits=7); on CUDA,
effops int8_linear against bf16 F.linear (cuBLAS) and torch._int_mm.

Work per call: 2 * M * K * N operations (multiply + add), reported in GOP/s, and on a CPU with
AVX512-VNNI as a % of its int8 peak, measured at the start of the run (benchmarks/cpu_peak.py).
Run: python -m benchmarks.run [--quick] --only int8_linear
"""
import warnings

import torch
import torch.nn.functional as F

import effops
from benchmarks import cpu_peak
from benchmarks.common import compare

LEVEL_DEPENDENT = True  # benchmarks.run times it at every CPU level
# (in_features K, out_features N) of transformer layers: LLaMA-7B-like, and BERT-base / ViT-B's MLP.
SIZES = [(4096, 4096), (4096, 11008), (768, 3072), (3072, 768)]
ROWS = [1, 8, 16, 256, 400, 2048]
QUICK_CASES = [(1, 4096, 4096), (256, 4096, 4096), (8, 768, 3072), (400, 3072, 768)]


def _torch_dynamic_int8(linear):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notices
        return torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(linear), {torch.nn.Linear},
                                                      dtype=torch.qint8)


def _cpu_rows(quick):
    import effops
    cases = QUICK_CASES if quick else [(m, k, n) for k, n in SIZES for m in ROWS]
    rows = []
    for m, k, n in cases:
        torch.manual_seed(0)
        linear = torch.nn.Linear(k, n)
        x = torch.randn(m, k)
        fbgemm = _torch_dynamic_int8(linear)
        impls = {
            "fp32 F.linear": lambda: F.linear(x, linear.weight, linear.bias),
            "torch dynamic int8 (FBGEMM)": lambda: fbgemm(x),
            "effops Int8Linear dynamic": (lambda mod: lambda: mod(x))(
                effops.nn.Int8Linear.from_linear(linear, mode="dynamic")),
            # opt-in 7-bit weights (activations still 8-bit): the CPU kernel without the sign handling
            "effops Int8Linear dynamic weight_bits=7": (lambda mod: lambda: mod(x))(
                effops.nn.Int8Linear.from_linear(linear, mode="dynamic", weight_bits=7)),
        }
        if m <= 16:
            impls["effops Int8Linear weight_only"] = (lambda mod: lambda: mod(x))(
                effops.nn.Int8Linear.from_linear(linear, mode="weight_only"))
        with torch.no_grad():
            new = compare("int8_linear", "M=%d K=%d N=%d" % (m, k, n), impls, baseline="fp32 F.linear",
                          rounds=2 if quick else 3, min_time=0.1 if quick else 0.2, work=2 * m * k * n,
                          work_unit="GOP/s")
        t_fbgemm = next(r["time_ms"] for r in new if r["impl"] == "torch dynamic int8 (FBGEMM)")
        peak = cpu_peak.measure().get("int8_vnni_gops") if "avx512_vnni" in effops.cpu_isa.levels() else None
        for r in new:
            r["vs_fbgemm"] = t_fbgemm / r["time_ms"]
            if peak:
                r["pct_vnni_peak"] = 100 * r["rate"] / peak
        rows += new
    return rows


def _forced(backend, fn, *args, **kwargs):
    with effops.use_backend(backend):
        return fn(*args, **kwargs)


def _cuda_rows(quick):
    from effops import ops
    from effops.reference.int8 import quantize_rowwise
    cases = [(8192, 8192, 8192)] + ([] if quick else [(m, k, n) for k, n in SIZES for m in ROWS])
    rows = []
    for m, k, n in cases:
        torch.manual_seed(0)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        xq, xs = quantize_rowwise(x)
        wq, ws = quantize_rowwise(w)
        wq_t = wq.t().contiguous()
        impls = {
            "bf16 F.linear (cuBLAS)": lambda: F.linear(x, w),
            "effops int8_linear": lambda: ops.int8_linear(xq, xs, wq, ws, out_dtype=torch.bfloat16),
            "effops int8_mm": lambda: ops.int8_mm(xq, wq_t),
        }
        # Each GPU kernel forced too: the automatic choice (Triton over the CUDA kernel, unmeasured)
        # should follow these rows.
        for backend in ("cuda", "triton"):
            if effops.backends()[backend]:
                impls["effops int8_linear [%s]" % backend] = lambda b=backend: _forced(
                    b, ops.int8_linear, xq, xs, wq, ws, out_dtype=torch.bfloat16)
        if m > 16 and k % 8 == 0 and n % 8 == 0:
            impls["torch._int_mm"] = lambda: torch._int_mm(xq, wq_t)
        rows += compare("int8_linear", "M=%d K=%d N=%d" % (m, k, n), impls, baseline="bf16 F.linear (cuBLAS)",
                        device="cuda", work=2 * m * k * n, work_unit="GOP/s")
    return rows


def run(quick=False, device="cpu"):
    return _cuda_rows(quick) if torch.device(device).type == "cuda" else _cpu_rows(quick)
