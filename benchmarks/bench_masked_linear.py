"""masked_linear: sparse masked matmul vs dense F.linear (baseline) and torch's CSR sparse.mm.

Per case: a weight of transformer / MLP shape, a mask of one pattern at one sparsity, x of M tokens.
impls (all in one process, interleaved):
  dense F.linear  the baseline: forward F.linear(x, W * mask) with W * mask precomputed;
                  forward+backward F.linear(x, W * mask) under autograd (what plain PyTorch does)
  effops auto     effops.ops.masked_linear with the automatic backend choice (the mask scanned per call)
  effops index    the same given the mask's index (masked_linear_index: what SparseLinear holds)
  effops cpu      the cpu backend forced (its kernels even where auto would decline; the full sweep
                  times it only where auto chooses another backend)
  torch CSR       torch.sparse.mm(W_csr, x^T) (forward only; CSR built outside the timing)
Nothing is cached between calls: the cpu kernels pack the kept weights on every call (as they walk them), forward and
backward.
rate: dense-equivalent GFLOP/s, 2*M*N*K per forward, 6*M*N*K per forward+backward, so a speedup over
dense shows as a rate above dense's.
"""
import sys
import warnings

import torch
import torch.nn.functional as F

import effops
from benchmarks.common import compare
from effops.ops.masked_linear import masked_linear, masked_linear_index

LEVEL_DEPENDENT = True  # benchmarks.run times it at every CPU level
FULL_SHAPES = [(4096, 4096, 256), (4096, 4096, 2048), (11008, 4096, 256), (4096, 11008, 256)]  # (N, K, M)
FULL_SPARSITIES = (0.5, 0.75, 0.9, 0.95)
# Quick: the headline cases (4096 x 4096, 256 tokens), fp32, and the two 90% ones in bf16 (forward).
QUICK_CASES = [("block32", 0.9, torch.float32), ("unstructured", 0.9, torch.float32), ("2:4", 0.5, torch.float32),
               ("block32", 0.9, torch.bfloat16), ("unstructured", 0.9, torch.bfloat16)]


def make_mask(pattern, n, k, sparsity, seed=0):
    g = torch.Generator().manual_seed(seed)
    if pattern.startswith("block"):
        b = int(pattern[5:])
        scores = torch.rand(-(-n // b), -(-k // b), generator=g)
        keep = scores.flatten().argsort()[: round((1 - sparsity) * scores.numel())]
        kept = torch.zeros(scores.numel(), dtype=torch.bool)
        kept[keep] = True
        return kept.view_as(scores).repeat_interleave(b, 0).repeat_interleave(b, 1)[:n, :k].contiguous()
    if pattern == "2:4":
        groups = torch.rand(n, k // 4, 4, generator=g)
        mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(2, dim=-1).indices, True)
        mask = mask.view(n, k)
        if sparsity > 0.5:  # still 2:4-compliant, with further weights dropped at random
            mask &= torch.rand(n, k, generator=g) < (1 - sparsity) / 0.5
        return mask
    return torch.rand(n, k, generator=g) < (1 - sparsity)


def _cases(quick):
    """(shape (N, K, M), pattern, sparsity, dtype) per case."""
    if quick:
        return [((4096, 4096, 256), p, s, dt) for p, s, dt in QUICK_CASES]
    out = []
    for shape in FULL_SHAPES:
        for pattern in ("block32", "unstructured", "2:4"):
            for s in FULL_SPARSITIES:
                out.append((shape, pattern, s, torch.float32))
    for pattern in ("block32", "unstructured"):  # bf16 forward, at the first shape
        for s in FULL_SPARSITIES:
            out.append((FULL_SHAPES[0], pattern, s, torch.bfloat16))
    return out


def run(quick, device):
    if device != "cpu":
        return _run_cuda(quick, device)
    rows = []
    # Full: 48 cases up to 2048 x 4096 x 11008 products (a dense forward+backward there takes seconds):
    # 2 rounds keep the sweep near 15 minutes on 2 quiet cores.
    rounds, min_time = (2, 0.1)
    for (n, k, m), pattern, sparsity, dtype in _cases(quick):
        torch.manual_seed(0)
        x = torch.randn(m, k, dtype=dtype)
        w = torch.randn(n, k, dtype=dtype)
        mask = make_mask(pattern, n, k, sparsity)
        wm = w * mask
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
            csr = wm.to_sparse_csr()
        xt = x.t().contiguous()
        name = "%dx%d M=%d %s %.0f%%%s" % (n, k, m, pattern, 100 * sparsity, "" if dtype == torch.float32 else " bf16")
        with torch.no_grad(), effops._backends.record_choices() as tally:
            masked_linear(x, w, mask)
        (chosen,) = tally["masked_linear"]
        index = masked_linear_index(mask)
        extra = dict(sparsity=sparsity, auto_backend=chosen)

        def forced_cpu(fn):
            def call():
                with effops.use_backend("cpu"):
                    return fn()
            return call

        fwd = {
            "dense F.linear": lambda: F.linear(x, wm),
            "effops auto": lambda: masked_linear(x, w, mask),
            "effops index": lambda: masked_linear(x, w, mask, index=index),
        }
        if quick or chosen != "cpu":  # full sweep: when auto runs the cpu kernel, forcing it times the same code
            fwd["effops cpu"] = forced_cpu(lambda: masked_linear(x, w, mask))
        if dtype == torch.float32 and (not quick or sparsity >= 0.9):  # CSR: many times slower below 90%
            fwd["torch CSR"] = lambda: torch.sparse.mm(csr, xt)
        rows += compare("masked_linear fwd", name, fwd, "dense F.linear", rounds=rounds, min_time=min_time,
                        work=2 * m * n * k, work_unit="GFLOP/s", extra=extra)
        if dtype != torch.float32 or (quick and not (pattern in ("block32", "unstructured") and sparsity == 0.9)):
            continue
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()

        def dense_fb():
            F.linear(xg, wg * mask).sum().backward()

        def ours_fb():
            masked_linear(xg, wg, mask).sum().backward()

        def index_fb():
            masked_linear(xg, wg, mask, index=index).sum().backward()

        fb = {"dense F.linear": dense_fb, "effops auto": ours_fb, "effops index": index_fb}
        if quick or chosen != "cpu":
            fb["effops cpu"] = forced_cpu(ours_fb)
        rows += compare("masked_linear fwd+bwd", name, fb, "dense F.linear", rounds=rounds, min_time=min_time,
                        work=6 * m * n * k, work_unit="GFLOP/s", extra=extra)
    return rows


def _run_cuda(quick, device):
    """GPU (never run yet): effops (auto, forced triton) vs cuBLAS bf16 F.linear, and torch's 2:4
    semi-structured sparsity where this GPU / build supports it."""
    rows = []
    for (n, k, m), pattern, sparsity, dtype in _cases(quick):
        if dtype != torch.float32:  # every GPU case runs in bf16 already
            continue
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=device, dtype=torch.bfloat16)
        mask = make_mask(pattern, n, k, sparsity).to(device)
        wm = w * mask
        name = "%dx%d M=%d %s %.0f%%" % (n, k, m, pattern, 100 * sparsity)
        def forced_triton():
            with effops.use_backend("triton"):
                return masked_linear(x, w, mask)

        impls = {"cuBLAS F.linear": lambda: F.linear(x, wm), "effops auto": lambda: masked_linear(x, w, mask),
                 "effops triton": forced_triton}
        if pattern == "2:4" and sparsity == 0.5:
            # Both the conversion and the product can be unsupported on a GPU / build (cuSPARSELt or CUTLASS
            # kernels missing, shape limits): one call, synchronized so a failing kernel shows here, decides.
            try:
                from torch.sparse import to_sparse_semi_structured
                ws = to_sparse_semi_structured(wm)
                F.linear(x, ws)
                torch.cuda.synchronize(device)
                impls["torch semi-structured"] = lambda: F.linear(x, ws)
            except Exception as e:  # leave it out, saying why
                print("  masked_linear | %s | torch semi-structured left out: %s: %s"
                      % (name, type(e).__name__, str(e).splitlines()[0][:200] if str(e) else ""),
                      file=sys.stderr, flush=True)
        rows += compare("masked_linear fwd", name, impls, "cuBLAS F.linear", device=device,
                        work=2 * m * n * k, work_unit="GFLOP/s", extra=dict(sparsity=sparsity))
    return rows
