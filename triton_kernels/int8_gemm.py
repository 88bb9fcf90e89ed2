"""Triton int8 kernels: row-wise quantization, and the int8 GEMM with int32 accumulation and a fused
dequantizing epilogue.

_quantize_rowwise_kernel: one program per row, two passes over the row in BLOCK_K chunks: the absmax,
then q = clamp(round_half_even(x / scale), -127, 127) with scale = absmax / 127 (1 for a zero row;
NaN, with q = 0, for a row holding NaN or inf).
IEEE division (div_rn, not the fast `/`) and round-half-even by the 1.5 * 2**23 trick keep it bit
identical to effops/reference/int8.py.

_int8_gemm_kernel: C = A @ B with A (M, K) int8 and B (K, N) int8 given by strides (w^T for a linear
layer) or, with PACKED_B, in Int8Linear's packed layout (element (k, n) at
(n // 16) * KP * 16 + (k // 4) * 64 + (n % 16) * 4 + k % 4, KP = K rounded up to 4). Each program
owns a BLOCK_M x BLOCK_N tile of C and walks K in BLOCK_K steps with an int8 tl.dot into int32
accumulators (tensor-core IMMA / IGMMA on sm_80 / sm_90). The epilogue either stores the int32 sums
(int8_mm) or applies the row scale, the column scale and the bias in fp32 and casts to the output
pointer's dtype, before the only store (int8_linear).

On GPU the tile configuration is autotuned over CONFIGS (all listed in AOT_SPECS for the compile
check); under TRITON_INTERPRET=1 (tests on CPU tensors) one large tile keeps the interpreter fast.
"""
import os

import torch
import triton
import triton.language as tl

from effops._shapes import with_leading_dims
from effops.reference.int8 import PACK_KG, PACK_NR


@triton.jit
def _quantize_rowwise_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    x_row = x_ptr + row.to(tl.int64) * stride_x
    q_row = q_ptr + row.to(tl.int64) * stride_q
    absmax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    probe = tl.zeros((BLOCK_K,), dtype=tl.float32)  # sums x * 0: NaN exactly when the row has NaN or inf
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        absmax = tl.maximum(absmax, tl.abs(x))
        probe += x * 0.0
    finite = tl.sum(probe, axis=0) == 0.0
    scale = tl.math.div_rn(tl.max(absmax, axis=0), 127.0)
    scale = tl.where(scale > 0.0, scale, 1.0)
    scale = tl.where(finite, scale, float("nan"))  # a row with NaN or inf: scale NaN, q = 0
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        v = tl.math.div_rn(x, scale)
        v = (v + 12582912.0) - 12582912.0  # round half to even: fp32 adds at 1.5 * 2**23 keep no fraction
        v = tl.minimum(tl.maximum(v, -127.0), 127.0)
        v = tl.where(finite, v, 0.0)
        tl.store(q_row + offs, v.to(tl.int8), mask=offs < K)
    tl.store(s_ptr + row, scale)


@triton.jit
def _int8_gemm_kernel(a_ptr, b_ptr, c_ptr, xs_ptr, ws_ptr, bias_ptr, M, N, K, KP,
                      stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      PACKED_B: tl.constexpr, DEQUANT: tl.constexpr, HAS_BIAS: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # Loads wrap rows/columns past the edge (rm % M) instead of masking them: only the K edge needs a
    # mask, and the stores mask the rest. Offsets are int32 (the launcher declines tensors of 2**31
    # elements or more) and built once, then advanced per K step: per-element 64-bit addresses inside
    # the loop cost registers (the first version spilled in every configuration).
    # No contiguity hints on the wrapped rows and columns: where M or N is the contiguous dim (a
    # column-major a, int8_mm's b) the wrapped edge tile is not contiguous, and a vector load across the
    # wrap could read past the allocation. Row-major operands vectorize along K, which needs no hint.
    rm_ld = rm % M
    rn_ld = rn % N
    a_ptrs = a_ptr + rm_ld[:, None] * stride_am + rk[None, :] * stride_ak
    if PACKED_B:
        b_ptrs = b_ptr + ((rn_ld[None, :] // 16) * KP * 16 + (rk[:, None] // 4) * 64
                          + (rn_ld[None, :] % 16) * 4 + rk[:, None] % 4)
        b_step = BLOCK_K * 16  # BLOCK_K / 4 groups of 64 bytes
    else:
        b_ptrs = b_ptr + rk[:, None] * stride_bk + rn_ld[None, :] * stride_bn
        b_step = BLOCK_K * stride_bk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=rk[None, :] < K - k0, other=0)
        b = tl.load(b_ptrs, mask=rk[:, None] < K - k0, other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += b_step
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    c_ptrs = c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    if DEQUANT:
        # Same order as the reference: (acc * x_scale) * w_scale + bias, in fp32.
        xs = tl.load(xs_ptr + rm, mask=rm < M, other=0.0)
        ws = tl.load(ws_ptr + rn, mask=rn < N, other=0.0)
        y = acc.to(tl.float32) * xs[:, None] * ws[None, :]
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + rn, mask=rn < N, other=0.0)[None, :]
        tl.store(c_ptrs, y.to(c_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(c_ptrs, acc, mask=mask)


# Tile configurations for the GPU: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages).
# int8 mma needs K tiles of 32. Kept: the configurations whose ahead-of-time compile (unit strides,
# sm_80 and sm_90) shows no register spills. Dropped after the compile check showed 100-3800 bytes of
# spill stack: 128x256x64 w8, 256x128x64 w8, 128x128x128 w8, 128x64x64 w4 s4, 64x128x64 w4 s4,
# 64x64x128 w4, 32x64x128 w4, 16x128x128 w4. Every kept one still sits at ~255 registers per thread.
CONFIGS = [
    (128, 128, 64, 8, 4),
    (128, 128, 64, 8, 3),
    (64, 64, 64, 4, 2),
]
_INTERPRETER_CONFIG = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64)
_QUANT_BLOCK = 1024

_int8_gemm_autotuned = triton.autotune(
    configs=[triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), num_warps=w, num_stages=s)
             for bm, bn, bk, w, s in CONFIGS],
    key=["M", "N", "K", "PACKED_B", "DEQUANT"],
)(_int8_gemm_kernel)


def _interpreting(t):
    return t.device.type == "cpu" or os.environ.get("TRITON_INTERPRET") == "1"


def _launch_gemm(a, b_ptr_tensor, out, n, k, strides_b, packed, xs=None, ws=None, bias=None):
    m = a.shape[0]
    dequant = xs is not None
    args = (a, b_ptr_tensor, out, xs if dequant else out, ws if dequant else out, bias if bias is not None else out,
            m, n, k, -(-k // PACK_KG) * PACK_KG, a.stride(0), a.stride(1), strides_b[0], strides_b[1],
            out.stride(0), out.stride(1))
    flags = dict(PACKED_B=packed, DEQUANT=dequant, HAS_BIAS=bias is not None)
    if _interpreting(a):  # (tests on a GPU also come here, to launch each of CONFIGS in turn)
        c = _INTERPRETER_CONFIG
        grid = (triton.cdiv(m, c["BLOCK_M"]), triton.cdiv(n, c["BLOCK_N"]))
        _int8_gemm_kernel[grid](*args, **c, **flags)
    else:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
        _int8_gemm_autotuned[grid](*args, **flags)
    return out


# ---------------------------------------------------------------------------------------------
# Launchers (the Triton routes of effops/ops/{quantize_rowwise,int8_gemm}.py)
# ---------------------------------------------------------------------------------------------
def quantize_rowwise(x):
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    q = torch.empty((x2.shape[0], k), dtype=torch.int8, device=x.device)
    s = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
    if x2.shape[0]:
        _quantize_rowwise_kernel[(x2.shape[0],)](x2, q, s, k, x2.stride(0), q.stride(0),
                                                 BLOCK_K=min(_QUANT_BLOCK, triton.next_power_of_2(k)))
    return q.reshape(x.shape), s.reshape(x.shape[:-1])


def int8_mm(a, b):
    out = torch.empty((a.shape[0], b.shape[1]), dtype=torch.int32, device=a.device)
    if out.numel():
        _launch_gemm(a, b, out, b.shape[1], a.shape[1], (b.stride(0), b.stride(1)), packed=False)
    return out


def int8_linear(x_int8, x_scale, w_int8, w_scale, bias, out_dtype):
    k, n = x_int8.shape[-1], w_int8.shape[0]
    x2 = x_int8.reshape(-1, k)
    out = torch.empty((x2.shape[0], n), dtype=out_dtype, device=x_int8.device)
    if out.numel():
        _launch_gemm(x2, w_int8, out, n, k, (w_int8.stride(1), w_int8.stride(0)), packed=False,
                     xs=x_scale.reshape(-1).contiguous(), ws=w_scale.contiguous(),
                     bias=None if bias is None else bias.contiguous())
    return with_leading_dims(out, x_int8)


def int8_linear_dynamic(x, w_packed, w_scale, bias, out_features):
    k = x.shape[-1]
    q, s = quantize_rowwise(x.reshape(-1, k))
    out = torch.empty((q.shape[0], out_features), dtype=x.dtype, device=x.device)
    if out.numel():
        _launch_gemm(q, w_packed, out, out_features, k, (0, 0), packed=True, xs=s, ws=w_scale, bias=bias)
    return with_leading_dims(out, x)


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile specs: every kernel in every configuration (tools/gpu_compile_check.py)
# ---------------------------------------------------------------------------------------------
def _aot_specs():
    from effops.triton_kernels._aot import AotSpec

    gemm_sig = {"a_ptr": "*i8", "b_ptr": "*i8", "c_ptr": "*bf16", "xs_ptr": "*fp32", "ws_ptr": "*fp32",
                "bias_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32", "KP": "i32",
                "stride_am": "i32", "stride_ak": "i32", "stride_bk": "i32", "stride_bn": "i32",
                "stride_cm": "i32", "stride_cn": "i32", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
                "BLOCK_K": "constexpr", "PACKED_B": "constexpr", "DEQUANT": "constexpr", "HAS_BIAS": "constexpr"}
    # Unit strides as constexprs: Triton's JIT specializes integer arguments equal to 1, so this is the
    # code that runs for contiguous tensors (A row-major; int8_linear's w (N, K) row-major, i.e.
    # stride_bk = 1; int8_mm's b (K, N) row-major, i.e. stride_bn = 1; C row-major).
    def spec(sig, consts, w, s):
        unit = {name: 1 for name in consts.pop("_unit")}
        return AotSpec(_int8_gemm_kernel, dict(sig, **{n: "constexpr" for n in unit}), dict(consts, **unit), w, s)

    specs = []
    for bm, bn, bk, w, s in CONFIGS:
        tile = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
        # int8_linear (bf16 out, bias) and int8_mm (int32 out): the two epilogues.
        specs.append(spec(gemm_sig, dict(tile, PACKED_B=False, DEQUANT=True, HAS_BIAS=True,
                                         _unit=("stride_ak", "stride_bk", "stride_cn")), w, s))
        specs.append(spec(dict(gemm_sig, c_ptr="*i32"), dict(tile, PACKED_B=False, DEQUANT=False, HAS_BIAS=False,
                                                             _unit=("stride_ak", "stride_bn", "stride_cn")), w, s))
    bm, bn, bk, w, s = CONFIGS[0]
    specs.append(spec(dict(gemm_sig, c_ptr="*fp32"), dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PACKED_B=True,
                                                          DEQUANT=True, HAS_BIAS=False,
                                                          _unit=("stride_ak", "stride_cn")), w, s))
    specs.append(AotSpec(_quantize_rowwise_kernel,
                         {"x_ptr": "*bf16", "q_ptr": "*i8", "s_ptr": "*fp32", "K": "i32", "stride_x": "i32",
                          "stride_q": "i32", "BLOCK_K": "constexpr"}, dict(BLOCK_K=_QUANT_BLOCK), 4, 1))
    return specs


AOT_SPECS = _aot_specs()
