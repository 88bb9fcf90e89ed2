"""The 8-bit optimizer step: effops.optim.AdamW8bit against torch.optim.AdamW(fused=True) on fp32 params.

Case: the GPT-shaped parameter list of bench_adam_step.py (quick: 17.3M params in 52 tensors; full:
102M in 112), gradients fixed, the step timed alone. Beside the baseline: effops' fp32 AdamW, and the
other 8-bit AdamWs where they import: bitsandbytes' AdamW8bit and torchao's AdamW8bit (torchao
compiles its step with torch.compile on first use: the warm-up call, not timed). The script says
which were not measured.

Bytes one fused pass must move per parameter: 28 for fp32 AdamW (read param, grad, two fp32
moments; write param and moments), 16 for 8-bit moments (read param, grad, two 1-byte codes; write
param and codes; the block scales add 8 bytes per 256 params). Each row also carries the optimizer
state it holds, in bytes per parameter (effops.optim.state_bytes_per_param, after the warm-up step).
"""
import torch

from benchmarks.bench_adam_step import _stepper, make_params, transformer_shapes
from benchmarks.common import compare
from effops.optim import AdamW, AdamW8bit, state_bytes_per_param


def _outside_8bit():
    """{name: AdamW8bit class} of the outside libraries that import here."""
    found = {}
    try:
        import bitsandbytes
        found["bitsandbytes_adamw8bit"] = bitsandbytes.optim.AdamW8bit
    except Exception as exc:  # ImportError, or a library that fails while loading its native parts
        print("bitsandbytes AdamW8bit: not measured (%s: %s)" % (type(exc).__name__, exc))
    try:
        from torchao.optim import AdamW8bit as TorchaoAdamW8bit
        found["torchao_adamw8bit"] = TorchaoAdamW8bit
    except Exception as exc:
        print("torchao AdamW8bit: not measured (%s: %s)" % (type(exc).__name__, exc))
    return found


def case_8bit(name, shapes, device, rounds, min_time):
    opts = {"torch_fused": torch.optim.AdamW(make_params(shapes, torch.float32, device), lr=1e-3, fused=True)}
    if torch.device(device).type == "cpu":
        opts["effops_cpu_fp32"] = AdamW(make_params(shapes, torch.float32, device), lr=1e-3)
    opts["effops_adamw8bit"] = AdamW8bit(make_params(shapes, torch.float32, device), lr=1e-3)
    for label, cls in _outside_8bit().items():
        opts[label] = cls(make_params(shapes, torch.float32, device), lr=1e-3)
    impls = {label: _stepper(opt) for label, opt in opts.items()}
    n = sum(torch.Size(s).numel() for s in shapes)
    rows = compare("adam8bit_step", name, impls, "torch_fused", device=device, rounds=rounds, min_time=min_time,
                   extra=dict(params_M=round(n / 1e6, 2), tensors=len(shapes)))
    for row in rows:
        row["state_B_per_param"] = round(state_bytes_per_param(opts[row["impl"]]), 3)
    return rows


def run(quick, device):
    rounds, min_time = (3, 0.2) if quick else (3, 0.5)
    big = transformer_shapes(512, 4, 8192) if quick else transformer_shapes(768, 9, 50257)
    return case_8bit("fp32 transformer, 8-bit states", big, device, rounds, min_time)
