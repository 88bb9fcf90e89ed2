"""Reference: one Adam/AdamW step with 8-bit moments, in plain PyTorch: dequantize, update, requantize.

The definition of correct for every adam8bit_step kernel; each kernel does these operations in this
order.

Block-wise quantization. A tensor's elements, in row-major order, are cut into blocks of BLOCK = 256
(the last one shorter). Each block stores one fp32 scale and one 8-bit code per element.

* First moment m (signed): scale a = max |m| over the block; code c in [-127, 127];
  m = sign(c) * c^2 * (a / 127^2), i.e. |m| / a = (|c| / 127)^2.
* Second moment v (non-negative): the code is of r = sqrt(v). Scale s = max r over the block;
  code c in [0, 255]; r = (c + 1)^2 * (s / 2^16), i.e. r / s = ((c + 1) / 256)^2, and v = r^2.

Why these maps. bitsandbytes' and torchao's 8-bit Adam use a "dynamic" map (a sign bit, a run of
zeros marking the exponent, a linear fraction: about constant relative precision from 1 down to
1e-7 of the block's absmax), signed for m and unsigned for v, applied by searching a 256-entry table
for the nearest value. A moment's values in a block spread over orders of magnitude, so a linear
map would send most of them to zero; what matters is fine steps near zero and coarse ones near the
absmax. A power map gives that too (code spacing proportional to sqrt(|x|), relative step 2 / |c|)
and is analytic both ways: decoding is one multiply by an exact integer (c^2 is exact in fp32),
encoding a square root and a rounding, no table search per element, so the CPU kernel stays a few
vector instructions per element and exactly reproducible here.
The second moment gets two more things, both from its role as a denominator: (1) it is stored as
sqrt(v), which halves the orders of magnitude the map must cover (v's square map reaches
2^-32 ~ 2.3e-10 of the block's largest v); (2) its map has no zero (code 0 means (1/256)^2 of the
scale, as the 4-bit optimizer of Li et al. 2023 does): a small v rounded to zero under a non-zero m
would make m / (sqrt(v) + eps) a step of m / eps; rounding small v up only shortens their steps.
Rounding is to the nearest code in the square-root domain (torch.round: half to even, as the
kernels' vector rounding).

The step (fp32 math; grad_scale, maximize, weight decay, bias corrections as effops/reference/adam.py):
    m, v = dequantize(codes, scales)
    m = lerp(m, g, 1 - beta1);  v = v * beta2 + (1 - beta2) * g * g
    p += -step_size * m / (sqrt(v) * (1 / sqrt(1 - beta2^t)) + eps)
    codes, scales = quantize(m, v)
The update uses the new m and v before they are quantized; only what is stored is rounded.
"""
import torch

from effops.reference.adam import bias_corrections

BLOCK = 256
SIGNED_MAX = 127      # first moment: codes -127..127
UNSIGNED_LEVELS = 256  # second moment: codes 0..255 stand for (c + 1) / 256


def num_blocks(numel):
    return (numel + BLOCK - 1) // BLOCK


def _per_element(scales, numel):
    return scales.repeat_interleave(BLOCK)[:numel]


def _block_max(x):
    """Max of each BLOCK of the flat tensor x (x >= 0; the short last block padded with zeros)."""
    pad = num_blocks(x.numel()) * BLOCK - x.numel()
    return torch.nn.functional.pad(x, (0, pad)).view(-1, BLOCK).amax(dim=1)


def _inverse(scales):
    """1 / scale in fp32, 0 where the scale is 0 (an all-zero block: every code 0)."""
    return torch.where(scales > 0, 1.0 / scales, torch.zeros_like(scales))


def dequantize_signed(codes, scales):
    """Flat fp32 first moment from int8 codes and fp32 block scales."""
    c = codes.float()
    return (c * c.abs()) * _per_element(scales / float(SIGNED_MAX * SIGNED_MAX), codes.numel())


def dequantize_unsigned_sqrt(codes, scales):
    """(r, v) with r = sqrt(v), flat fp32, from uint8 codes and fp32 block scales of r."""
    c1 = codes.float() + 1.0
    r = (c1 * c1) * _per_element(scales * 2.0 ** -16, codes.numel())
    return r, r * r


def quantize_signed(m):
    """(int8 codes, fp32 scales) of the flat fp32 tensor m."""
    scales = _block_max(m.abs())
    x = m.abs() * _per_element(_inverse(scales), m.numel())
    c = torch.round(torch.sqrt(x) * float(SIGNED_MAX)).clamp_(0, SIGNED_MAX)
    return torch.where(m < 0, -c, c).to(torch.int8), scales


def quantize_unsigned_sqrt(r):
    """(uint8 codes, fp32 scales) of the flat fp32 tensor r = sqrt(v) >= 0."""
    scales = _block_max(r)
    x = r * _per_element(_inverse(scales), r.numel())
    c = torch.round(torch.sqrt(x) * float(UNSIGNED_LEVELS)) - 1.0
    return c.clamp_(0, UNSIGNED_LEVELS - 1).to(torch.uint8), scales


def quantize_state(exp_avg, exp_avg_sq):
    """The four state tensors (exp_avg codes, scales, exp_avg_sq codes, scales) of fp32-able moments
    of any shape (a torch AdamW checkpoint loaded into the 8-bit optimizer)."""
    m = exp_avg.detach().reshape(-1).float()
    v = exp_avg_sq.detach().reshape(-1).float()
    m_codes, m_scales = quantize_signed(m)
    v_codes, v_scales = quantize_unsigned_sqrt(torch.sqrt(v))
    return m_codes, m_scales, v_codes, v_scales


def adam8bit_step(params, grads, exp_avg_codes, exp_avg_scales, exp_avg_sq_codes, exp_avg_sq_scales,
                  master_params, steps, *, lr, beta1, beta2, eps, weight_decay, maximize,
                  decoupled_weight_decay, grad_scale=None):
    """Update every tensor in place. Codes are flat (numel,) int8 (exp_avg) / uint8 (exp_avg_sq);
    scales flat fp32 (num_blocks(numel),). steps: float step counts, already incremented.
    master_params[i]: None or the fp32 copy of a bf16/fp16 param (stepped, then rounded into it)."""
    for i, param in enumerate(params):
        n = param.numel()
        if n == 0:
            continue
        master = master_params[i]
        theta = (master if master is not None else param).reshape(-1).float().clone()
        grad = grads[i].reshape(-1).float()
        if grad_scale is not None:
            grad = grad / grad_scale
            grads[i].copy_(grad.view_as(grads[i]))
        if maximize:
            grad = -grad
        if weight_decay != 0:
            if decoupled_weight_decay:
                theta.mul_(1 - lr * weight_decay)
            else:
                grad = grad.add(theta, alpha=weight_decay)

        # The same torch ops as effops/reference/adam.py (whose order the kernels follow).
        m = dequantize_signed(exp_avg_codes[i], exp_avg_scales[i])
        _, v = dequantize_unsigned_sqrt(exp_avg_sq_codes[i], exp_avg_sq_scales[i])
        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)

        bias_correction1, bias_correction2_sqrt = bias_corrections(beta1, beta2, steps[i])
        r = v.sqrt()
        # a multiply by 1 / sqrt(1 - beta2^t) (computed in double, rounded once to fp32), not
        # adam.py's division: one division per element fewer in the kernels
        denom = (r * (1.0 / bias_correction2_sqrt)).add_(eps)
        theta.addcdiv_(m, denom, value=-(lr / bias_correction1))

        m_codes, m_scales = quantize_signed(m)
        v_codes, v_scales = quantize_unsigned_sqrt(r)
        exp_avg_codes[i].copy_(m_codes)
        exp_avg_scales[i].copy_(m_scales)
        exp_avg_sq_codes[i].copy_(v_codes)
        exp_avg_sq_scales[i].copy_(v_scales)
        if master is not None:
            master.copy_(theta.view_as(master))
        param.copy_(theta.view_as(param))
