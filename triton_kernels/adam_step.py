"""Fused multi-tensor Adam/AdamW step in Triton.

What is computed: for every element of every tensor, the step of effops/reference/adam.py (the
arithmetic of torch.optim.Adam's single-tensor path, in fp32 whatever the storage dtype; master
weights updated and rounded into the low-precision param in the same pass; gradients optionally
unscaled and stored back).

Tiling: the tensors of one dtype combination are cut into chunks of BLOCK elements; one program
steps one chunk. Which tensor and where in it comes from a chunk table (tensor index, start), and
the tensor's addresses from tables of raw pointers (int64) cast in the kernel to typed pointers:
so a step over thousands of tensors is one launch per dtype combination, like apex's
multi_tensor_apply. Flags (amsgrad, maximize, weight decay kind, unscale, master weights, dtypes)
are constexprs: each combination compiles to its own branch-free kernel.
"""
import torch
import triton
import triton.language as tl

from effops.reference.adam import per_tensor_scalars
from effops.triton_kernels._aot import AotSpec

BLOCK = 2048
NUM_WARPS = 8
# Storage-dtype codes the kernel switches on (constexpr).
_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@triton.jit
def _typed(address, KIND: tl.constexpr):
    if KIND == 0:
        return address.to(tl.pointer_type(tl.float32))
    elif KIND == 1:
        return address.to(tl.pointer_type(tl.bfloat16))
    else:
        return address.to(tl.pointer_type(tl.float16))


@triton.jit
def adam_grad_and_param(param, grad_ptr, master_ptrs, t, offs, mask, grad_scale, weight_decay, decay_factor,
                        MASTER: tl.constexpr, MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr,
                        DECOUPLED: tl.constexpr, UNSCALE: tl.constexpr):
    """One chunk's gradient (unscaled and stored back, negated for maximize) and parameter (the master
    copy where there is one), weight decay applied, in fp32: the start of the step, shared by the fp32
    and the 8-bit kernels. Returns (g, p, the master pointer: the param pointer without one)."""
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if UNSCALE:
        g = tl.div_rn(g, grad_scale)
        tl.store(grad_ptr + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)
    if MAXIMIZE:
        g = -g
    if MASTER:
        master = _typed(tl.load(master_ptrs + t), 0)
        p = tl.load(master + offs, mask=mask, other=0.0)
    else:
        master = param
        p = tl.load(param + offs, mask=mask, other=0.0).to(tl.float32)
    if WEIGHT_DECAY:
        if DECOUPLED:
            p = p * decay_factor
        else:
            g = g + weight_decay * p
    return g, p, master


@triton.jit
def _adam_step_kernel(param_ptrs, grad_ptrs, exp_avg_ptrs, exp_avg_sq_ptrs, max_sq_ptrs, master_ptrs, numels,
                      neg_step_sizes, bc2_sqrts, sr_seeds, chunk_tensor, chunk_start, lerp_weight, beta2,
                      one_minus_beta2, eps, weight_decay, decay_factor, grad_scale, P_KIND: tl.constexpr,
                      MASTER: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
                      WEIGHT_DECAY: tl.constexpr, DECOUPLED: tl.constexpr, UNSCALE: tl.constexpr,
                      STOCHASTIC: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(chunk_tensor + pid)
    offs = tl.load(chunk_start + pid) + tl.arange(0, BLOCK)
    mask = offs < tl.load(numels + t)
    S_KIND: tl.constexpr = 0 if MASTER else P_KIND

    param = _typed(tl.load(param_ptrs + t), P_KIND)
    grad_ptr = _typed(tl.load(grad_ptrs + t), P_KIND)
    exp_avg_ptr = _typed(tl.load(exp_avg_ptrs + t), S_KIND)
    exp_avg_sq_ptr = _typed(tl.load(exp_avg_sq_ptrs + t), S_KIND)

    g, p, master = adam_grad_and_param(param, grad_ptr, master_ptrs, t, offs, mask, grad_scale, weight_decay,
                                       decay_factor, MASTER, MAXIMIZE, WEIGHT_DECAY, DECOUPLED, UNSCALE)
    m = tl.load(exp_avg_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # torch's lerp: start + w * (end - start) for w < 0.5, else end - (end - start) * (1 - w)
    if lerp_weight < 0.5:
        m = m + lerp_weight * (g - m)
    else:
        m = g - (g - m) * (1.0 - lerp_weight)
    v = tl.load(exp_avg_sq_ptr + offs, mask=mask, other=0.0).to(tl.float32) * beta2
    v = v + one_minus_beta2 * g * g
    vhat = v
    if AMSGRAD:
        max_sq_ptr = _typed(tl.load(max_sq_ptrs + t), S_KIND)
        vhat = tl.maximum(tl.load(max_sq_ptr + offs, mask=mask, other=0.0).to(tl.float32), v)
        tl.store(max_sq_ptr + offs, vhat.to(max_sq_ptr.dtype.element_ty), mask=mask)
    # IEEE sqrt and division (Triton's defaults are the approximate ones) to stay near torch.
    denom = tl.div_rn(tl.sqrt_rn(vhat), tl.load(bc2_sqrts + t)) + eps
    p = p + tl.div_rn(tl.load(neg_step_sizes + t) * m, denom)

    tl.store(exp_avg_ptr + offs, m.to(exp_avg_ptr.dtype.element_ty), mask=mask)
    tl.store(exp_avg_sq_ptr + offs, v.to(exp_avg_sq_ptr.dtype.element_ty), mask=mask)
    if MASTER:
        tl.store(master + offs, p, mask=mask)
    if STOCHASTIC:
        seed = tl.load(sr_seeds + t)
        rounded = _round_bf16_stochastic(p, offs, seed)
        # a tensor of this launch with seed -1 rounds to nearest
        tl.store(param + offs, tl.where(seed >= 0, rounded, p.to(tl.bfloat16)), mask=mask)
    else:
        tl.store(param + offs, p.to(param.dtype.element_ty), mask=mask)


@triton.jit
def _mix32(x):
    """effops/reference/stochastic_round.py's mix (uint32, wrapping)."""
    x = x ^ (x >> 16)
    x = x * 0x7feb352d
    x = x ^ (x >> 15)
    x = x * 0x1b873593
    return x ^ (x >> 16)


@triton.jit
def _round_bf16_stochastic(p, offs, seed):
    """p (fp32) to bf16, rounded up with probability (discarded bits) / 2^16 (see the reference)."""
    noise = _mix32(offs.to(tl.uint32) ^ seed.to(tl.uint32)) & 0xFFFF
    bits = (p.to(tl.uint32, bitcast=True) + noise) >> 16
    bits = tl.where(p != p, 0x7FC0, bits)
    return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)


def _tables(device, params, grads, exp_avgs, exp_avg_sqs, max_sqs, masters, neg_step_sizes, bc2_sqrts, seeds):
    """Pointer, size and chunk tables for one launch (built on the host, copied once)."""
    numels = [p.numel() for p in params]
    ptr = lambda ts: [0 if t is None else t.data_ptr() for t in ts]  # noqa: E731
    pointers = torch.tensor([ptr(params), ptr(grads), ptr(exp_avgs), ptr(exp_avg_sqs), ptr(max_sqs), ptr(masters)],
                            dtype=torch.int64)
    counts = torch.tensor([(n + BLOCK - 1) // BLOCK for n in numels], dtype=torch.int64)
    chunk_tensor = torch.repeat_interleave(torch.arange(len(params), dtype=torch.int32), counts)
    first_chunk = torch.cumsum(counts, 0) - counts
    chunk_start = (torch.arange(len(chunk_tensor), dtype=torch.int64) - first_chunk[chunk_tensor.long()]) * BLOCK
    host = dict(pointers=pointers, numels=torch.tensor(numels, dtype=torch.int64),
                neg_step_sizes=torch.tensor(neg_step_sizes, dtype=torch.float32),
                bc2_sqrts=torch.tensor(bc2_sqrts, dtype=torch.float32),
                sr_seeds=torch.tensor(seeds, dtype=torch.int64), chunk_tensor=chunk_tensor,
                chunk_start=chunk_start)
    return {k: v.to(device) for k, v in host.items()}


def adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, steps, *, lr, beta1, beta2,
              eps, weight_decay, amsgrad, maximize, decoupled_weight_decay, grad_scale, stochastic_round_seeds=None):
    """The "triton" kernel of effops::adam_step: one launch per (param dtype, master weights) group."""

    step_sizes, bc2_sqrts = per_tensor_scalars(lr, beta1, beta2, steps)
    groups = {}
    for i, p in enumerate(params):
        if p.numel():
            groups.setdefault((p.dtype, master_params[i] is not None), []).append(i)
    for (dtype, master), idx in groups.items():
        pick = lambda ts: [ts[i] for i in idx]  # noqa: E731
        seeds = [-1] * len(idx) if stochastic_round_seeds is None else pick(stochastic_round_seeds)
        tab = _tables(params[0].device, pick(params), pick(grads), pick(exp_avgs), pick(exp_avg_sqs),
                      pick(max_exp_avg_sqs) if amsgrad else [None] * len(idx), pick(master_params),
                      [-step_sizes[i] for i in idx], pick(bc2_sqrts), seeds)
        ptrs = tab["pointers"]
        stochastic = any(s >= 0 for s in seeds)
        grid = (tab["chunk_tensor"].numel(),)
        _adam_step_kernel[grid](
            ptrs[0], ptrs[1], ptrs[2], ptrs[3], ptrs[4], ptrs[5], tab["numels"], tab["neg_step_sizes"],
            tab["bc2_sqrts"], tab["sr_seeds"], tab["chunk_tensor"], tab["chunk_start"], 1.0 - beta1, beta2,
            1.0 - beta2, eps,
            weight_decay, 1.0 - lr * weight_decay, 1.0 if grad_scale is None else grad_scale,
            P_KIND=_KIND[dtype], MASTER=master, AMSGRAD=amsgrad, MAXIMIZE=maximize, WEIGHT_DECAY=weight_decay != 0,
            DECOUPLED=decoupled_weight_decay, UNSCALE=grad_scale is not None, STOCHASTIC=stochastic, BLOCK=BLOCK,
            num_warps=NUM_WARPS)


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile check: every dtype combination with the common flags, and one with all on.
# ---------------------------------------------------------------------------------------------
_SIGNATURE = dict(
    {name: "*i64" for name in ("param_ptrs", "grad_ptrs", "exp_avg_ptrs", "exp_avg_sq_ptrs", "max_sq_ptrs",
                               "master_ptrs", "numels", "chunk_start")},
    neg_step_sizes="*fp32", bc2_sqrts="*fp32", sr_seeds="*i64", chunk_tensor="*i32",
    **{name: "fp32" for name in ("lerp_weight", "beta2", "one_minus_beta2", "eps", "weight_decay", "decay_factor",
                                 "grad_scale")},
    **{name: "constexpr" for name in ("P_KIND", "MASTER", "AMSGRAD", "MAXIMIZE", "WEIGHT_DECAY", "DECOUPLED",
                                      "UNSCALE", "STOCHASTIC", "BLOCK")})


def _spec(p_kind, master, all_flags):
    flags = dict(AMSGRAD=all_flags, MAXIMIZE=all_flags, WEIGHT_DECAY=True, DECOUPLED=not all_flags,
                 UNSCALE=all_flags, STOCHASTIC=all_flags and p_kind == 1 and not master)
    return AotSpec(_adam_step_kernel, _SIGNATURE, dict(P_KIND=p_kind, MASTER=master, BLOCK=BLOCK, **flags),
                   num_warps=NUM_WARPS, num_stages=1)


AOT_SPECS = [_spec(kind, master, flags) for kind, master in ((0, False), (1, False), (2, False), (1, True), (2, True))
             for flags in (False, True)]
