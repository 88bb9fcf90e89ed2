"""Fused multi-tensor Adam/AdamW step with 8-bit moments in Triton.

What is computed: for every element of every tensor, the step of effops/reference/adam8bit.py:
dequantize the block-wise 8-bit moments, the Adam step in fp32 (master weights, gradient unscaling
as in triton_kernels/adam_step.py), requantize against the block's new maxima.

Tiling: one program per quantization block of BLOCK = 256 elements, so a block's maxima are one
tl.max each and never cross programs. Which tensor and which block come from a block table, the
tensors' addresses from tables of raw pointers (apex's multi_tensor_apply idea, as adam_step.py):
one launch per (param dtype, master weights) combination. Flags are constexprs.
"""
import torch
import triton
import triton.language as tl

from effops.reference.adam import per_tensor_scalars
from effops.triton_kernels._aot import AotSpec
from effops.triton_kernels.adam_step import _KIND, _typed, adam_grad_and_param

BLOCK = 256  # the quantization block (effops/reference/adam8bit.py)
NUM_WARPS = 2
# Adding then subtracting 1.5 * 2^23 rounds a float in [0, 2^22) to the nearest integer, ties to even
# (the reference's torch.round), with plain fp32 adds that the interpreter and the GPU agree on.
_ROUNDER = tl.constexpr(12582912.0)


@triton.jit
def _round_even(x):
    return (x + _ROUNDER) - _ROUNDER


@triton.jit
def _adam8bit_step_kernel(param_ptrs, grad_ptrs, m_code_ptrs, m_scale_ptrs, r_code_ptrs, r_scale_ptrs, master_ptrs,
                          numels, neg_step_sizes, inv_bc2_sqrts, block_tensor, block_index, lerp_weight, beta2,
                          one_minus_beta2, eps, weight_decay, decay_factor, grad_scale, P_KIND: tl.constexpr,
                          MASTER: tl.constexpr, MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr,
                          DECOUPLED: tl.constexpr, UNSCALE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    b = tl.load(block_index + pid)
    offs = b * BLOCK + tl.arange(0, BLOCK)
    mask = offs < tl.load(numels + t)

    param = _typed(tl.load(param_ptrs + t), P_KIND)
    grad_ptr = _typed(tl.load(grad_ptrs + t), P_KIND)
    m_codes = tl.load(m_code_ptrs + t).to(tl.pointer_type(tl.int8))
    r_codes = tl.load(r_code_ptrs + t).to(tl.pointer_type(tl.uint8))
    m_scales = tl.load(m_scale_ptrs + t).to(tl.pointer_type(tl.float32))
    r_scales = tl.load(r_scale_ptrs + t).to(tl.pointer_type(tl.float32))

    g, p, master = adam_grad_and_param(param, grad_ptr, master_ptrs, t, offs, mask, grad_scale, weight_decay,
                                       decay_factor, MASTER, MAXIMIZE, WEIGHT_DECAY, DECOUPLED, UNSCALE)

    # Dequantize: one multiply of an exact integer (c * |c|, (c + 1)^2) by the block's unit.
    m_unit = tl.div_rn(tl.load(m_scales + b), 16129.0)
    r_unit = tl.load(r_scales + b) * (1.0 / 65536.0)
    cm = tl.load(m_codes + offs, mask=mask, other=0).to(tl.float32)
    m = cm * tl.abs(cm) * m_unit
    c1 = tl.load(r_codes + offs, mask=mask, other=0).to(tl.float32) + 1.0
    r = c1 * c1 * r_unit
    v = r * r

    if lerp_weight < 0.5:
        m = m + lerp_weight * (g - m)
    else:
        m = g - (g - m) * (1.0 - lerp_weight)
    v = v * beta2 + one_minus_beta2 * g * g
    r = tl.sqrt_rn(v)
    denom = r * tl.load(inv_bc2_sqrts + t) + eps  # the reference's multiply by 1 / sqrt(1 - beta2^t)
    p = p + tl.div_rn(tl.load(neg_step_sizes + t) * m, denom)
    if MASTER:
        tl.store(master + offs, p, mask=mask)
    tl.store(param + offs, p.to(param.dtype.element_ty), mask=mask)

    # Requantize against the new block maxima (masked lanes excluded).
    m_max = tl.max(tl.where(mask, tl.abs(m), 0.0), axis=0)
    r_max = tl.max(tl.where(mask, r, 0.0), axis=0)
    tl.store(m_scales + b, m_max)
    tl.store(r_scales + b, r_max)
    m_inv = tl.where(m_max > 0, tl.div_rn(1.0, m_max), 0.0)
    r_inv = tl.where(r_max > 0, tl.div_rn(1.0, r_max), 0.0)
    qm = _round_even(tl.sqrt_rn(tl.abs(m) * m_inv) * 127.0)
    tl.store(m_codes + offs, tl.where(m < 0, -qm, qm).to(tl.int8), mask=mask)
    qr = tl.maximum(_round_even(tl.sqrt_rn(r * r_inv) * 256.0) - 1.0, 0.0)
    tl.store(r_codes + offs, qr.to(tl.uint8), mask=mask)


def adam8bit_step(params, grads, exp_avg_codes, exp_avg_scales, exp_avg_sq_codes, exp_avg_sq_scales, master_params,
                  steps, *, lr, beta1, beta2, eps, weight_decay, maximize, decoupled_weight_decay, grad_scale):
    """The "triton" kernel of effops::adam8bit_step: one launch per (param dtype, master weights) group."""

    step_sizes, bc2_sqrts = per_tensor_scalars(lr, beta1, beta2, steps)
    groups = {}
    for i, p in enumerate(params):
        if p.numel():
            groups.setdefault((p.dtype, master_params[i] is not None), []).append(i)
    device = params[0].device
    for (dtype, master), idx in groups.items():
        ptr = lambda ts: [0 if ts[i] is None else ts[i].data_ptr() for i in idx]  # noqa: E731
        pointers = torch.tensor([ptr(params), ptr(grads), ptr(exp_avg_codes), ptr(exp_avg_scales),
                                 ptr(exp_avg_sq_codes), ptr(exp_avg_sq_scales), ptr(master_params)],
                                dtype=torch.int64)
        numels = [params[i].numel() for i in idx]
        counts = torch.tensor([(n + BLOCK - 1) // BLOCK for n in numels], dtype=torch.int64)
        block_tensor = torch.repeat_interleave(torch.arange(len(idx), dtype=torch.int32), counts)
        first = torch.cumsum(counts, 0) - counts
        block_index = torch.arange(len(block_tensor), dtype=torch.int64) - first[block_tensor.long()]
        tables = [pointers, torch.tensor(numels, dtype=torch.int64),
                  torch.tensor([-step_sizes[i] for i in idx], dtype=torch.float32),
                  torch.tensor([1.0 / bc2_sqrts[i] for i in idx], dtype=torch.float32), block_tensor, block_index]
        pointers, numels_t, neg_steps, inv_bc2, block_tensor, block_index = [x.to(device) for x in tables]
        _adam8bit_step_kernel[(block_tensor.numel(),)](
            pointers[0], pointers[1], pointers[2], pointers[3], pointers[4], pointers[5], pointers[6], numels_t,
            neg_steps, inv_bc2, block_tensor, block_index, 1.0 - beta1, beta2, 1.0 - beta2, eps, weight_decay,
            1.0 - lr * weight_decay, 1.0 if grad_scale is None else grad_scale, P_KIND=_KIND[dtype], MASTER=master,
            MAXIMIZE=maximize, WEIGHT_DECAY=weight_decay != 0, DECOUPLED=decoupled_weight_decay,
            UNSCALE=grad_scale is not None, BLOCK=BLOCK, num_warps=NUM_WARPS)


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile check: every dtype combination with the common flags, and one with all on.
# ---------------------------------------------------------------------------------------------
_SIGNATURE = dict(
    {name: "*i64" for name in ("param_ptrs", "grad_ptrs", "m_code_ptrs", "m_scale_ptrs", "r_code_ptrs",
                               "r_scale_ptrs", "master_ptrs", "numels", "block_index")},
    neg_step_sizes="*fp32", inv_bc2_sqrts="*fp32", block_tensor="*i32",
    **{name: "fp32" for name in ("lerp_weight", "beta2", "one_minus_beta2", "eps", "weight_decay", "decay_factor",
                                 "grad_scale")},
    **{name: "constexpr" for name in ("P_KIND", "MASTER", "MAXIMIZE", "WEIGHT_DECAY", "DECOUPLED", "UNSCALE",
                                      "BLOCK")})


def _spec(p_kind, master, all_flags):
    flags = dict(MAXIMIZE=all_flags, WEIGHT_DECAY=True, DECOUPLED=not all_flags, UNSCALE=all_flags)
    return AotSpec(_adam8bit_step_kernel, _SIGNATURE, dict(P_KIND=p_kind, MASTER=master, BLOCK=BLOCK, **flags),
                   num_warps=NUM_WARPS, num_stages=1)


AOT_SPECS = [_spec(kind, master, flags) for kind, master in ((0, False), (1, False), (2, False), (1, True), (2, True))
             for flags in (False, True)]
