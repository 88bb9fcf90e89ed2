"""Triton kernels for the depthwise middle of effops::inverted_residual's backward (the recomputing backward
in csrc/bindings/inverted_residual_backward.cpp; its CPU counterpart is csrc/cpu/inverted_residual_depthwise.h).
Between the block's two 1x1 convolutions, whose backward stays torch's (cuBLAS/cuDNN GEMMs), as does the
squeeze-excitation's. With e = act(pre_e), pre_e = x @ We + be (e = x without an expand conv):

    forward:   d = act(depthwise(e) + bd)                                   (_depthwise_act_kernel)
    backward:  g_pre_d = g_d * act'(pre_d), pre_d recomputed;
               g_dw[c, tap] = sum over images and pixels of g_pre_d * e at the tap's input pixel,
               g_db[c] = sum of g_pre_d                                     (_depthwise_act_grad_kernel)
               g_e = the transposed depthwise of g_pre_d; g_in = g_e * act'(pre_e) with an expand conv,
               else g_e                                                     (_depthwise_transpose_kernel)

The kernels read x, not e: like the forward kernel (triton_kernels/inverted_residual.py, whose _expanded_tap
they share), each recomputes the expanded activations it needs per tap, act(x[pixels, :] @ We[:, chunk] + be) by
tl.dot over BLOCK_CIN input channels, so neither e nor pre_e is ever in memory (the gradient at pre_e, which the
expand conv's backward reads, is). That costs KH x KW expand products per tile in the forward and twice that in
the gradient kernel (pre_d, then each tap's e for the weight gradient), and one in the transpose (pre_e).
Without an expand conv the same helper loads x itself.

Each kernel runs one program per (BLOCK_P pixels, BLOCK_C channels, image): the forward and the gradient
kernel over output pixels, the transpose over input pixels. Tiles are [BLOCK_P, BLOCK_C] in fp32 registers,
taps outside the image are 0 (the depthwise pads the activated tensor), tensors addressed through their strides
(NCHW and channels_last alike), image offsets in int64, offsets within an image in int32 (the op declines inputs
past 2**31 elements per image). Tiles are >= 16 in every tl.dot dimension.

The backward is two passes instead of the CPU kernel's one because a GPU program cannot own the scatter of
its output pixels' gradients into overlapping input pixels without atomics: the first pass writes g_pre_d
(fp32, the size of d, so no rounding between the two passes) and per-program partial sums of the weight and
bias gradients; the second gathers each input pixel's taps from g_pre_d. Partial sums, summed by torch,
and a gather instead of atomic adds: the gradients come out the same on every run. (Gathering with pre_d
recomputed per tap instead of stored would cost KH x KW times the first pass's work.)

Under TRITON_INTERPRET=1 (tests on CPU tensors) bf16 dots run in fp32 (_lowp: the interpreter computes bf16
dots wrongly), and the interpreter converts fp32 to bf16 by truncation where a GPU rounds to nearest even: the
bf16 stores there round on the bits first (RNE_BF16, off in every GPU build), so the interpreter tests see the
GPU's rounding. (Truncation's bias toward zero, summed over pixels by the expand weight's gradient, doubled
its error against torch's.)
"""
import torch
import triton
import triton.language as tl

from effops.triton_kernels.dwpw_conv2d import (_ACTIVATIONS, _INTERPRETING, _act, _act_backward, _lowp,
                                               _memory_format)
from effops.triton_kernels.inverted_residual import _expanded_tap, _geometry


@triton.jit
def _stored(x, dtype: tl.constexpr, RNE_BF16: tl.constexpr):
    """x (fp32) in dtype, for a store. RNE_BF16 (bf16 in the interpreter, whose own conversion truncates): rounded
    to nearest even on the bits first, so that the conversion after it is exact and tests see the GPU's rounding."""
    if RNE_BF16:
        u = x.to(tl.uint32, bitcast=True)
        x = ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _tile(P, PW_, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's tile: (image, pixel offsets, their rows and columns in a P-pixel image PW_ wide, pixel
    mask, channel offsets, channel mask)."""
    pid_p, pid_c, n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    return n, offs_p, offs_p // PW_, offs_p % PW_, offs_p < P, offs_c, offs_c < C


@triton.jit
def _e_tap(x_img, ew_ptr, eb_ptr, offs_c, mask_c, oh, ow, mask_p, kh, kw, CIN, C, H, W, sxc, sxh, sxw, SH, SW, PH,
           PW, ACT: tl.constexpr, EXPAND: tl.constexpr, HAS_EB: tl.constexpr, LOWP: tl.constexpr,
           BLOCK_P: tl.constexpr, BLOCK_CIN: tl.constexpr, BLOCK_C: tl.constexpr):
    """e[BLOCK_P, BLOCK_C] (fp32) at tap (kh, kw) of output pixels (oh, ow): 0 outside the image."""
    ih = oh * SH - PH + kh
    iw = ow * SW - PW + kw
    valid = mask_p & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    return _expanded_tap(x_img, ew_ptr, eb_ptr, offs_c, mask_c, ih, iw, valid, CIN, C, sxc, sxh, sxw, ACT, EXPAND,
                         HAS_EB, LOWP, BLOCK_P, BLOCK_CIN, BLOCK_C)


@triton.jit
def _pre_d(x_img, ew_ptr, eb_ptr, dw_ptr, db_ptr, offs_c, mask_c, oh, ow, mask_p, CIN, C, H, W, sxc, sxh, sxw, SH,
           SW, PH, PW, KH: tl.constexpr, KW: tl.constexpr, ACT: tl.constexpr, EXPAND: tl.constexpr,
           HAS_EB: tl.constexpr, HAS_DB: tl.constexpr, LOWP: tl.constexpr, BLOCK_P: tl.constexpr,
           BLOCK_CIN: tl.constexpr, BLOCK_C: tl.constexpr):
    """pre_d[BLOCK_P, BLOCK_C] = depthwise(e) + bd (fp32) at output pixels (oh, ow)."""
    pre = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for kh in range(KH):  # loops, not unrolled (triton_kernels/dwpw_conv2d.py: spills, compile time)
        for kw in range(KW):
            e = _e_tap(x_img, ew_ptr, eb_ptr, offs_c, mask_c, oh, ow, mask_p, kh, kw, CIN, C, H, W, sxc, sxh, sxw,
                       SH, SW, PH, PW, ACT, EXPAND, HAS_EB, LOWP, BLOCK_P, BLOCK_CIN, BLOCK_C)
            wv = tl.load(dw_ptr + offs_c * (KH * KW) + (kh * KW + kw), mask=mask_c, other=0.0).to(tl.float32)
            pre += e * wv[None, :]
    if HAS_DB:
        pre += tl.load(db_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    return pre


@triton.jit
def _depthwise_act_kernel(x_ptr, ew_ptr, eb_ptr, dw_ptr, db_ptr, d_ptr, CIN, C, H, W, OH, OW, sxn, sxc, sxh, sxw,
                          sdn, sdc, sdh, sdw, SH, SW, PH, PW, KH: tl.constexpr, KW: tl.constexpr, ACT: tl.constexpr,
                          EXPAND: tl.constexpr, HAS_EB: tl.constexpr, HAS_DB: tl.constexpr, LOWP: tl.constexpr,
                          RNE_BF16: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_CIN: tl.constexpr,
                          BLOCK_C: tl.constexpr):
    """d = act(depthwise(e) + bd) for BLOCK_P output pixels and BLOCK_C channels of one image."""
    n, offs_p, oh, ow, mask_p, offs_c, mask_c = _tile(OH * OW, OW, C, BLOCK_P, BLOCK_C)
    pre = _pre_d(x_ptr + n.to(tl.int64) * sxn, ew_ptr, eb_ptr, dw_ptr, db_ptr, offs_c, mask_c, oh, ow, mask_p, CIN, C,
                 H, W, sxc, sxh, sxw, SH, SW, PH, PW, KH, KW, ACT, EXPAND, HAS_EB, HAS_DB, LOWP, BLOCK_P, BLOCK_CIN,
                 BLOCK_C)
    d = d_ptr + n.to(tl.int64) * sdn + offs_c[None, :] * sdc + oh[:, None] * sdh + ow[:, None] * sdw
    tl.store(d, _stored(_act(pre, ACT), d_ptr.dtype.element_ty, RNE_BF16), mask=mask_p[:, None] & mask_c[None, :])


@triton.jit
def _depthwise_act_grad_kernel(gd_ptr, x_ptr, ew_ptr, eb_ptr, dw_ptr, db_ptr, gpre_ptr, gdw_ptr, gdb_ptr, CIN, C, H,
                               W, OH, OW, sgn, sgc, sgh, sgw, sxn, sxc, sxh, sxw, spn, spc, sph, spw, SH, SW, PH, PW,
                               KH: tl.constexpr, KW: tl.constexpr, ACT: tl.constexpr, EXPAND: tl.constexpr,
                               HAS_EB: tl.constexpr, HAS_DB: tl.constexpr, LOWP: tl.constexpr, BLOCK_P: tl.constexpr,
                               BLOCK_CIN: tl.constexpr, BLOCK_C: tl.constexpr):
    """The first backward pass over BLOCK_P output pixels and BLOCK_C channels of one image: g_pre_d (fp32,
    stored), and this program's sums over its pixels of g_pre_d (gdb: [row, C]) and of g_pre_d times e at each
    tap (gdw: [row, KH * KW, C]), row = image * cdiv(OH * OW, BLOCK_P) + pixel block."""
    n, offs_p, oh, ow, mask_p, offs_c, mask_c = _tile(OH * OW, OW, C, BLOCK_P, BLOCK_C)
    mask = mask_p[:, None] & mask_c[None, :]
    x_img = x_ptr + n.to(tl.int64) * sxn
    pre = _pre_d(x_img, ew_ptr, eb_ptr, dw_ptr, db_ptr, offs_c, mask_c, oh, ow, mask_p, CIN, C, H, W, sxc, sxh, sxw,
                 SH, SW, PH, PW, KH, KW, ACT, EXPAND, HAS_EB, HAS_DB, LOWP, BLOCK_P, BLOCK_CIN, BLOCK_C)
    gd = tl.load(gd_ptr + n.to(tl.int64) * sgn + offs_c[None, :] * sgc + oh[:, None] * sgh + ow[:, None] * sgw,
                 mask=mask, other=0.0).to(tl.float32)
    g = tl.where(mask, _act_backward(gd, pre, ACT), 0.0)  # 0 off the tile: its rows hold act'(bias), not 0
    tl.store(gpre_ptr + n.to(tl.int64) * spn + offs_c[None, :] * spc + oh[:, None] * sph + ow[:, None] * spw, g,
             mask=mask)
    row = n.to(tl.int64) * tl.num_programs(0) + tl.program_id(0)
    tl.store(gdb_ptr + row * C + offs_c, tl.sum(g, axis=0), mask=mask_c)
    for kh in range(KH):
        for kw in range(KW):
            e = _e_tap(x_img, ew_ptr, eb_ptr, offs_c, mask_c, oh, ow, mask_p, kh, kw, CIN, C, H, W, sxc, sxh, sxw,
                       SH, SW, PH, PW, ACT, EXPAND, HAS_EB, LOWP, BLOCK_P, BLOCK_CIN, BLOCK_C)
            tl.store(gdw_ptr + (row * (KH * KW) + kh * KW + kw) * C + offs_c, tl.sum(g * e, axis=0), mask=mask_c)


@triton.jit
def _depthwise_transpose_kernel(gpre_ptr, dw_ptr, x_ptr, ew_ptr, eb_ptr, gin_ptr, CIN, C, H, W, OH, OW, spn, spc,
                                sph, spw, sxn, sxc, sxh, sxw, sin, sic, sih, siw, SH, SW, PH, PW, KH: tl.constexpr,
                                KW: tl.constexpr, ACT: tl.constexpr, EXPAND: tl.constexpr, HAS_EB: tl.constexpr,
                                LOWP: tl.constexpr, RNE_BF16: tl.constexpr, BLOCK_P: tl.constexpr,
                                BLOCK_CIN: tl.constexpr, BLOCK_C: tl.constexpr):
    """The second backward pass over BLOCK_P input pixels and BLOCK_C channels of one image: g_in = the taps'
    g_pre_d times their weights, gathered, times act'(pre_e) with an expand conv (pre_e recomputed). Input pixel
    ih is tap kh of output row oh when ih + PH - kh = oh * SH."""
    n, offs_p, ih, iw, mask_p, offs_c, mask_c = _tile(H * W, W, C, BLOCK_P, BLOCK_C)
    mask = mask_p[:, None] & mask_c[None, :]
    gpre_img = gpre_ptr + n.to(tl.int64) * spn
    g = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for kh in range(KH):
        th = ih + PH - kh
        oh = th // SH
        # th >= 0 first: the remainder of a negative th is not the same under C (GPU) and numpy (interpreter)
        valid_h = (th >= 0) & (th - oh * SH == 0) & (oh < OH)
        for kw in range(KW):
            tw = iw + PW - kw
            ow = tw // SW
            valid = mask_p & valid_h & (tw >= 0) & (tw - ow * SW == 0) & (ow < OW)
            gp = tl.load(gpre_img + oh[:, None] * sph + ow[:, None] * spw + offs_c[None, :] * spc,
                         mask=valid[:, None] & mask_c[None, :], other=0.0)
            wv = tl.load(dw_ptr + offs_c * (KH * KW) + (kh * KW + kw), mask=mask_c, other=0.0).to(tl.float32)
            g += gp * wv[None, :]
    if EXPAND:  # pre_e at the pixels themselves: the expand product without its activation
        pre = _expanded_tap(x_ptr + n.to(tl.int64) * sxn, ew_ptr, eb_ptr, offs_c, mask_c, ih, iw, mask_p, CIN, C,
                            sxc, sxh, sxw, 0, EXPAND, HAS_EB, LOWP, BLOCK_P, BLOCK_CIN, BLOCK_C)
        g = _act_backward(g, pre, ACT)
    gin = gin_ptr + n.to(tl.int64) * sin + offs_c[None, :] * sic + ih[:, None] * sih + iw[:, None] * siw
    tl.store(gin, _stored(g, gin_ptr.dtype.element_ty, RNE_BF16), mask=mask)


# (BLOCK_P, BLOCK_CIN, BLOCK_C, num_warps, num_stages): one configuration for the three kernels. 8 warps give each
# thread 8 values of a 64 x 32 tile. One stage: with more, the pipeliner would keep each tap's tiles in shared
# memory, as it did for the fp32 dwpw forward. The tile is the interpreter's too (few programs). Not tuned on a
# GPU: none here.
CONFIG = (64, 32, 32, 8, 1)


def _rne_bf16(t):
    return _INTERPRETING and t.dtype == torch.bfloat16


def _activation(name):
    return _ACTIVATIONS[None if name == "none" else name]


def _flags(x, expand_weight, expand_bias, dw_bias, activation):
    return dict(ACT=_activation(activation), EXPAND=expand_weight is not None, HAS_EB=expand_bias is not None,
                LOWP=_lowp(x))


def depthwise_act(x, expand_weight, expand_bias, dw_weight, dw_bias, stride, padding, activation):
    """d = act(depthwise(e) + dw_bias), e = act(expand(x)) (x itself when expand_weight is None), in x's dtype and
    memory format; e is recomputed per tile, never stored."""
    N, CIN, H, W, C, KH, KW, OH, OW, ew, dw = _geometry(x, expand_weight, dw_weight, stride, padding)
    d = torch.empty((N, C, OH, OW), dtype=x.dtype, device=x.device, memory_format=_memory_format(x))
    bp, bcin, bc, warps, stages = CONFIG
    grid = (triton.cdiv(OH * OW, bp), triton.cdiv(C, bc), N)
    _depthwise_act_kernel[grid](x, ew, dw if expand_bias is None else expand_bias.contiguous(), dw,
                                dw if dw_bias is None else dw_bias.contiguous(), d, CIN, C, H, W, OH, OW, *x.stride(),
                                *d.stride(), *stride, *padding, KH=KH, KW=KW, HAS_DB=dw_bias is not None,
                                RNE_BF16=_rne_bf16(x), BLOCK_P=bp, BLOCK_CIN=bcin, BLOCK_C=bc, num_warps=warps,
                                num_stages=stages, **_flags(x, expand_weight, expand_bias, dw_bias, activation))
    return d


def depthwise_act_backward(grad_d, x, expand_weight, expand_bias, dw_weight, dw_bias, stride, padding, activation):
    """(the gradient at pre_e = expand(x), or at x without an expand conv, in x's dtype and memory format;
    dw_weight's gradient; dw_bias' gradient, both in dw_weight's dtype) from grad_d, the gradient at
    d = act(depthwise(e) + dw_bias), e = act(pre_e); e and pre_e are recomputed per tile, never stored."""
    N, CIN, H, W, C, KH, KW, OH, OW, ew, dw = _geometry(x, expand_weight, dw_weight, stride, padding)
    eb = dw if expand_bias is None else expand_bias.contiguous()
    flags = _flags(x, expand_weight, expand_bias, dw_bias, activation)
    bp, bcin, bc, warps, stages = CONFIG
    grid = (triton.cdiv(OH * OW, bp), triton.cdiv(C, bc), N)
    f32 = dict(dtype=torch.float32, device=x.device)
    g_pre = torch.empty((N, C, OH, OW), memory_format=_memory_format(x), **f32)
    g_dw = torch.empty((N * grid[0], KH * KW, C), **f32)
    g_db = torch.empty((N * grid[0], C), **f32)
    _depthwise_act_grad_kernel[grid](grad_d, x, ew, eb, dw, dw if dw_bias is None else dw_bias.contiguous(), g_pre,
                                     g_dw, g_db, CIN, C, H, W, OH, OW, *grad_d.stride(), *x.stride(), *g_pre.stride(),
                                     *stride, *padding, KH=KH, KW=KW, HAS_DB=dw_bias is not None, BLOCK_P=bp,
                                     BLOCK_CIN=bcin, BLOCK_C=bc, num_warps=warps, num_stages=stages, **flags)
    g_in = torch.empty((N, C, H, W), dtype=x.dtype, device=x.device, memory_format=_memory_format(x))
    grid = (triton.cdiv(H * W, bp), triton.cdiv(C, bc), N)
    _depthwise_transpose_kernel[grid](g_pre, dw, x, ew, eb, g_in, CIN, C, H, W, OH, OW, *g_pre.stride(), *x.stride(),
                                      *g_in.stride(), *stride, *padding, KH=KH, KW=KW, RNE_BF16=_rne_bf16(x),
                                      BLOCK_P=bp, BLOCK_CIN=bcin, BLOCK_C=bc, num_warps=warps, num_stages=stages,
                                      **flags)
    dt = dw_weight.dtype
    return g_in, g_dw.sum(0).t().reshape(dw_weight.shape).to(dt), g_db.sum(0).to(dt)


def _aot_specs():
    from effops.triton_kernels._aot import AotSpec

    bp, bcin, bc, warps, stages = CONFIG
    ints = ["CIN", "C", "H", "W", "OH", "OW", "SH", "SW", "PH", "PW"] + [p + s for p in ("sx", "sd", "sg", "sp", "si")
                                                                      for s in "nchw"]
    fp32_ptrs = ["gpre_ptr", "gdw_ptr", "gdb_ptr"]
    specs = []
    # MobileNetV2's 3x3 relu6 block in bf16 (tensor-core expand products) and fp32, MobileNetV3 / MNASNet's 5x5
    # hardswish and EfficientNet's 3x3 silu in bf16, a 7x7 gelu in fp16 (the largest kernel), and a block without
    # expansion (EfficientNet-B0's first, 3x3 silu, bf16): every kernel each time.
    for dtype, k, act, expand in (("bf16", 3, 2, True), ("fp32", 3, 2, True), ("bf16", 5, 5, True),
                                  ("bf16", 3, 4, True), ("fp16", 7, 3, True), ("bf16", 3, 4, False)):
        for kernel in (_depthwise_act_kernel, _depthwise_act_grad_kernel, _depthwise_transpose_kernel):
            names = kernel.arg_names
            sig = {a: ("*fp32" if a in fp32_ptrs else "*" + dtype) if a.endswith("_ptr") else
                   "i32" if a in ints else "constexpr" for a in names}
            consts = dict(KH=k, KW=k, ACT=act, EXPAND=expand, HAS_EB=expand, LOWP=dtype != "fp32", BLOCK_P=bp,
                          BLOCK_CIN=bcin, BLOCK_C=bc)
            consts.update({c: v for c, v in (("HAS_DB", True), ("RNE_BF16", False)) if c in names})
            specs.append(AotSpec(kernel, sig, consts, warps, stages, "%s[%s k%d act%d%s|w%d s%d]" % (
                kernel.fn.__name__, dtype, k, act, "" if expand else " noexpand", warps, stages)))
    return specs


AOT_SPECS = _aot_specs()
