"""Reference: symmetric row-wise int8 quantization and int8 GEMMs. The definition of correct for every
quantize_rowwise / int8_linear / int8_mm kernel.

Quantization (per row of the last dim):   scale = absmax / 127   (fp32; 1.0 for a row whose scale
would be 0, so a row of zeros gets a valid scale and no division by zero);  q = clamp(round_half_even
(x / scale), -127, 127). The fp32 arithmetic is exactly the kernels' (IEEE division, no reciprocal),
so every backend reproduces the int8 values bit for bit.

Also here: the packed weight layout the module keeps (the CPU kernel's order) with its pack/unpack,
and the module's "dynamic" linear (quantize the activations per row, int8 GEMM, dequantize) with its
straight-through input gradient.
"""
import torch
import torch.nn.functional as F

# Largest K for which no int32 accumulator can overflow: K * 128 * 128 < 2**31.
MAX_K = (2 ** 31 - 1) // (128 * 128)

# Packed weight layout: N padded to a multiple of PACK_NR, K to a multiple of PACK_KG, then
# (N/PACK_NR, K/PACK_KG, PACK_NR, PACK_KG): for each panel of 16 output channels, for each group of 4
# input features, the 16 channels' 4 bytes side by side. One 32-byte load then holds 8 channels x 4 k,
# the operand order of the AVX2 vpmaddubsw micro-kernel (csrc/cpu/int8_gemm.h).
PACK_NR = 16
PACK_KG = 4


def quantize_rowwise(x, bits=8):
    """(q int8, scale fp32) with q of x's shape and scale of shape x.shape[:-1]; x ~= q * scale[..., None].

    bits=7 (Int8Linear's weight_bits=7): the same with qmax = 63 in place of 127, i.e. scale = absmax / 63
    and q in [-63, 63]. A row holding NaN or inf: q = 0, scale NaN."""
    qmax = 2 ** (bits - 1) - 1
    x32 = x.float().contiguous()
    absmax = x32.abs().amax(dim=-1)  # NaN or inf where the row holds one
    scale = absmax / float(qmax)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(x32 / scale.unsqueeze(-1)).clamp(-qmax, qmax)
    # A row with NaN or inf has no scale: q = 0 and scale NaN, so whatever is computed from it is NaN
    # (as F.linear on such a row gives NaN or inf), never finite values that look valid.
    finite = torch.isfinite(absmax)
    q = torch.where(finite.unsqueeze(-1), q, 0.0).to(torch.int8)
    return q, torch.where(finite, scale, torch.full_like(scale, float("nan")))


def int8_mm(a, b):
    """a (M, K) int8 @ b (K, N) int8 -> (M, N) int32, exactly a.int() @ b.int().

    Computed in fp64, which is exact here: every partial sum is an integer of magnitude at most
    K * 2**14 <= 2**31 < 2**53 (K <= MAX_K), and fp64 matmul also runs on CUDA, where integer matmul does not.
    """
    return (a.double() @ b.double()).to(torch.int32)


def int8_linear(x_int8, x_scale, w_int8, w_scale, bias=None, out_dtype=torch.float32):
    """(x_int8 @ w_int8^T) * x_scale[..., None] * w_scale + bias, int32 accumulation, fp32 epilogue."""
    # The integer product back in x's leading dims first, so the epilogue makes the output a tensor of
    # its own (as F.linear's), not a view of a 2-D result.
    acc = int8_mm(x_int8.reshape(-1, x_int8.shape[-1]), w_int8.t()).reshape(*x_int8.shape[:-1], w_int8.shape[0])
    y = acc.float() * x_scale.unsqueeze(-1).float() * w_scale.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


# ---------------------------------------------------------------------------------------------
# Packed weights (Int8Linear's storage)
# ---------------------------------------------------------------------------------------------
def _ceil_to(n, m):
    return (n + m - 1) // m * m


def pack_weight(w_int8):
    """(N, K) int8 -> (N_pad/16, K_pad/4, 16, 4) int8 in the layout described at PACK_NR, zero padded."""
    n, k = w_int8.shape
    w = F.pad(w_int8, (0, _ceil_to(k, PACK_KG) - k, 0, _ceil_to(n, PACK_NR) - n))
    np_, kp = w.shape
    return w.reshape(np_ // PACK_NR, PACK_NR, kp // PACK_KG, PACK_KG).permute(0, 2, 1, 3).contiguous()


def unpack_weight(packed, out_features, in_features):
    """Inverse of pack_weight: (N, K) int8."""
    panels, groups = packed.shape[0], packed.shape[1]
    w = packed.permute(0, 2, 1, 3).reshape(panels * PACK_NR, groups * PACK_KG)
    return w[:out_features, :in_features]


def weight_correction(w_packed):
    """int32 (N_pad,): -128 * the column sums of a packed weight (any int8 values), the starting sums of
    the CPU kernels that multiply a + 128 (unsigned) by the weights (see csrc/cpu/int8_gemm.h). Exact in
    int32: |column sum| <= 128 K, so |-128 x it| <= 16384 K < 2**31 for K <= MAX_K."""
    return w_packed.sum(dim=(1, 3), dtype=torch.int32).reshape(-1) * -128


def int8_linear_dynamic(x, w_packed, w_scale, bias, out_features, weight_only, w_corr=None, weight_bits=8):
    """Int8Linear's forward on float x (..., K): output in x's dtype.

    w_corr (weight_correction(w_packed)) and weight_bits (7: every weight in [-63, 63]) only select faster
    CPU kernels computing the same integers; the definition does not depend on them.

    weight_only=False: x quantized per row at run time, int8 x int8 GEMM, dequantized epilogue.
    weight_only=True: x stays floating; y = x @ (w_int8 * w_scale)^T + bias computed in fp32.
    """
    w = unpack_weight(w_packed, out_features, x.shape[-1])
    if weight_only:
        w_deq = w.float() * w_scale.float().unsqueeze(1)
        return F.linear(x.float(), w_deq, None if bias is None else bias.float()).to(x.dtype)
    q, s = quantize_rowwise(x)
    return int8_linear(q, s, w, w_scale, bias, out_dtype=x.dtype)


def int8_linear_dynamic_straight_through(x, w_packed, w_scale, bias, out_features, weight_only, w_corr=None,
                                         weight_bits=8):
    """int8_linear_dynamic's values with its straight-through gradient, in torch's own autograd: for
    torch.func transforms and forward-mode AD, which differentiate torch ops (not a custom op's formula).

    y = smooth + (exact - smooth).detach(), smooth = x @ (w_int8 * w_scale)^T + bias in fp32: the value
    is the op's (to fp32 rounding), the derivative the dequantized weight's (and the bias's).
    """
    w = unpack_weight(w_packed, out_features, x.shape[-1])
    w_deq = w.float() * w_scale.float().unsqueeze(1)
    smooth = F.linear(x.float(), w_deq, None if bias is None else bias.float())
    exact = int8_linear_dynamic(x, w_packed, w_scale, bias, out_features, weight_only, w_corr, weight_bits).float()
    return (smooth + (exact - smooth).detach()).to(x.dtype)


def int8_linear_dynamic_backward(grad_y, w_packed, w_scale, in_features, need_bias):
    """(grad_x, grad_bias or None): the straight-through gradient of int8_linear_dynamic.

    The rounding of x is treated as identity, so grad_x = grad_y @ (w_int8 * w_scale) (the dequantized
    weight), in fp32 and cast to grad_y's dtype. Written out: op kernels run below the autograd key.
    """
    w = unpack_weight(w_packed, w_scale.shape[0], in_features)
    w_deq = w.float() * w_scale.float().unsqueeze(1)
    g = grad_y.float()
    grad_x = (g @ w_deq).to(grad_y.dtype)
    grad_b = g.reshape(-1, g.shape[-1]).sum(0) if need_bias else None
    return grad_x, grad_b
