"""Triton kernels for the depthwise middle of effops::inverted_residual's backward (the recomputing backward
in csrc/bindings/inverted_residual_backward.cpp; its CPU counterpart is csrc/cpu/inverted_residual_depthwise.h).
Between the block's two 1x1 convolutions, whose backward stays torch's (cuBLAS/cuDNN GEMMs), as does the
squeeze-excitation's:

    forward:   d = act(depthwise(e) + bd)                                   (_depthwise_act_kernel)
    backward:  g_pre_d = g_d * act'(pre_d), pre_d recomputed from e;
               g_dw[c, tap] = sum over images and pixels of g_pre_d * e at the tap's input pixel,
               g_db[c] = sum of g_pre_d                                     (_depthwise_act_grad_kernel)
               g_e = the transposed depthwise of g_pre_d; g_in = g_e * act'(pre_e) where the block has an
               expand conv (pre_e: its output before the activation), else g_e (e is x)
                                                                            (_depthwise_transpose_kernel)

Each kernel runs one program per (BLOCK_P pixels, BLOCK_C channels, image): the forward and the gradient
kernel over output pixels, the transpose over input pixels. Tiles are [BLOCK_P, BLOCK_C] in fp32 registers,
loaded per tap with masks (taps outside the image read 0: the depthwise pads the activated tensor), tensors
addressed through their strides (NCHW and channels_last alike), image offsets in int64, offsets within an
image in int32 (the op declines inputs past 2**31 elements per image). There is no tl.dot here, so tiles
need not be multiples of 16.

The backward is two passes instead of the CPU kernel's one because a GPU program cannot own the scatter of
its output pixels' gradients into overlapping input pixels without atomics: the first pass writes g_pre_d
(fp32, the size of d, so no rounding between the two passes) and per-program partial sums of the weight and
bias gradients; the second gathers each input pixel's taps from g_pre_d. Partial sums, summed by torch,
and a gather instead of atomic adds: the gradients come out the same on every run. (Gathering with pre_d
recomputed per tap instead of stored would cost KH x KW times the first pass's loads.)

Under TRITON_INTERPRET=1 (tests on CPU tensors) the interpreter converts fp32 to bf16 by truncation, where a GPU
rounds to nearest even: the bf16 stores there round on the bits first (RNE_BF16, off in every GPU build), so the
interpreter tests see the GPU's rounding. (Truncation's bias toward zero, summed over pixels by the expand
weight's gradient, doubled its error against torch's.)
"""
import torch
import triton
import triton.language as tl

from effops.triton_kernels.dwpw_conv2d import (_ACTIVATIONS, _INTERPRETING, _act, _act_backward, _depthwise_tile,
                                               _memory_format)


@triton.jit
def _stored(x, dtype: tl.constexpr, RNE_BF16: tl.constexpr):
    """x (fp32) in dtype, for a store. RNE_BF16 (bf16 in the interpreter, whose own conversion truncates): rounded
    to nearest even on the bits first, so that the conversion after it is exact and tests see the GPU's rounding."""
    if RNE_BF16:
        u = x.to(tl.uint32, bitcast=True)
        x = ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _act_grad(g, h, ACT: tl.constexpr):
    """g * act'(h) as torch's *_backward ops give it (torch 2.13; hardswish's edges since 2.7, pytorch/pytorch#148049):
    relu' (threshold_backward) 0 up to 0 included, relu6' (hardtanh_backward) 0 up to 0 and from 6 on, hardswish'
    0 up to -3 included, h / 3 + 1/2 on (-3, 3), 1 from 3 on. dwpw_conv2d's _act_backward has hardswish's older
    closed [-3, 3] band (-1/2 at -3, 3/2 at 3); gelu and silu are its. (At NaN these three give g, as torch's
    scalar loops do; its vectorized ones differ there.)"""
    if ACT == 1:
        return tl.where(h <= 0.0, 0.0, g)
    elif ACT == 2:
        return tl.where((h <= 0.0) | (h >= 6.0), 0.0, g)
    elif ACT == 5:
        return tl.where(h <= -3.0, 0.0, tl.where(h < 3.0, g * (h / 3.0 + 0.5), g))
    return _act_backward(g, h, ACT)


@triton.jit
def _depthwise_act_kernel(e_ptr, dw_ptr, db_ptr, d_ptr, C, H, W, OH, OW, sen, sec, seh, sew, sdn, sdc, sdh, sdw,
                          SH, SW, PH, PW, KH: tl.constexpr, KW: tl.constexpr, ACT: tl.constexpr,
                          HAS_DB: tl.constexpr, RNE_BF16: tl.constexpr, BLOCK_P: tl.constexpr,
                          BLOCK_C: tl.constexpr):
    """d = act(depthwise(e) + bd) for BLOCK_P output pixels and BLOCK_C channels of one image."""
    pid_p, pid_c, n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < OH * OW
    oh, ow = offs_p // OW, offs_p % OW
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    e_img = e_ptr + n.to(tl.int64) * sen
    pre = _depthwise_tile(e_img, dw_ptr, db_ptr, offs_c, mask_c, oh, ow, mask_p, H, W, sec, seh, sew, SH, SW, PH, PW,
                          1, 1, KH, KW, HAS_DB, BLOCK_P, BLOCK_C)
    d = d_ptr + n.to(tl.int64) * sdn + offs_c[None, :] * sdc + oh[:, None] * sdh + ow[:, None] * sdw
    tl.store(d, _stored(_act(pre, ACT), d_ptr.dtype.element_ty, RNE_BF16), mask=mask_p[:, None] & mask_c[None, :])


@triton.jit
def _depthwise_act_grad_kernel(gd_ptr, e_ptr, dw_ptr, db_ptr, gpre_ptr, gdw_ptr, gdb_ptr, C, H, W, OH, OW,
                               sgn, sgc, sgh, sgw, sen, sec, seh, sew, spn, spc, sph, spw, SH, SW, PH, PW,
                               KH: tl.constexpr, KW: tl.constexpr, ACT: tl.constexpr, HAS_DB: tl.constexpr,
                               BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """The first backward pass over BLOCK_P output pixels and BLOCK_C channels of one image: g_pre_d (fp32,
    stored), and this program's sums over its pixels of g_pre_d (gdb: [row, C]) and of g_pre_d times e at each
    tap (gdw: [row, KH * KW, C]), row = image * cdiv(OH * OW, BLOCK_P) + pixel block."""
    pid_p, pid_c, n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < OH * OW
    oh, ow = offs_p // OW, offs_p % OW
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    mask = mask_p[:, None] & mask_c[None, :]
    e_img = e_ptr + n.to(tl.int64) * sen
    pre = _depthwise_tile(e_img, dw_ptr, db_ptr, offs_c, mask_c, oh, ow, mask_p, H, W, sec, seh, sew, SH, SW, PH, PW,
                          1, 1, KH, KW, HAS_DB, BLOCK_P, BLOCK_C)
    gd = tl.load(gd_ptr + n.to(tl.int64) * sgn + offs_c[None, :] * sgc + oh[:, None] * sgh + ow[:, None] * sgw,
                 mask=mask, other=0.0).to(tl.float32)
    g = tl.where(mask, _act_grad(gd, pre, ACT), 0.0)  # 0 off the tile: its rows hold act'(bias), not 0
    tl.store(gpre_ptr + n.to(tl.int64) * spn + offs_c[None, :] * spc + oh[:, None] * sph + ow[:, None] * spw, g,
             mask=mask)
    row = n.to(tl.int64) * tl.num_programs(0) + pid_p
    tl.store(gdb_ptr + row * C + offs_c, tl.sum(g, axis=0), mask=mask_c)
    for kh in range(KH):  # loops, not unrolled (as _depthwise_tile: spills and compile time)
        ih = oh * SH - PH + kh
        for kw in range(KW):
            iw = ow * SW - PW + kw
            valid = mask_p & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            ev = tl.load(e_img + ih[:, None] * seh + iw[:, None] * sew + offs_c[None, :] * sec,
                         mask=valid[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
            tl.store(gdw_ptr + (row * (KH * KW) + kh * KW + kw) * C + offs_c, tl.sum(g * ev, axis=0), mask=mask_c)


@triton.jit
def _depthwise_transpose_kernel(gpre_ptr, dw_ptr, pre_ptr, gin_ptr, C, H, W, OH, OW, spn, spc, sph, spw,
                                sen, sec, seh, sew, sin, sic, sih, siw, SH, SW, PH, PW, KH: tl.constexpr,
                                KW: tl.constexpr, ACT: tl.constexpr, HAS_PRE: tl.constexpr, RNE_BF16: tl.constexpr,
                                BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """The second backward pass over BLOCK_P input pixels and BLOCK_C channels of one image: g_in = (the taps'
    g_pre_d times their weights, gathered) * act'(pre_e) (HAS_PRE; pre_e addressed by the s_e strides), else
    without the derivative. Input pixel ih is tap kh of output row oh when ih + PH - kh = oh * SH."""
    pid_p, pid_c, n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < H * W
    ih, iw = offs_p // W, offs_p % W
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
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
    if HAS_PRE:
        pre = tl.load(pre_ptr + n.to(tl.int64) * sen + offs_c[None, :] * sec + ih[:, None] * seh + iw[:, None] * sew,
                      mask=mask, other=0.0).to(tl.float32)
        g = _act_grad(g, pre, ACT)
    gin = gin_ptr + n.to(tl.int64) * sin + offs_c[None, :] * sic + ih[:, None] * sih + iw[:, None] * siw
    tl.store(gin, _stored(g, gin_ptr.dtype.element_ty, RNE_BF16), mask=mask)


# (BLOCK_P, BLOCK_C, num_warps, num_stages): one configuration for the three kernels. 8 warps give each thread 8
# values of a 64 x 32 tile: 80-128 registers, no spill, on sm_80 (the compile check); with 4 warps (16 values
# each) 145-226, too many for more than two blocks per SM. One stage: there is no tl.dot to pipeline. The tile
# is the interpreter's too (few programs). Not tuned on a GPU: none here.
CONFIG = (64, 32, 8, 1)


def _geometry(e, dw_weight, stride, padding):
    N, C, H, W = e.shape
    KH, KW = dw_weight.shape[2:]
    OH = (H + 2 * padding[0] - KH) // stride[0] + 1
    OW = (W + 2 * padding[1] - KW) // stride[1] + 1
    return N, C, H, W, KH, KW, OH, OW


def _rne_bf16(t):
    return _INTERPRETING and t.dtype == torch.bfloat16


def _activation(name):
    return _ACTIVATIONS[None if name == "none" else name]


def depthwise_act(e, dw_weight, dw_bias, stride, padding, activation):
    """d = act(depthwise(e) + dw_bias), in e's dtype and memory format."""
    N, C, H, W, KH, KW, OH, OW = _geometry(e, dw_weight, stride, padding)
    d = torch.empty((N, C, OH, OW), dtype=e.dtype, device=e.device, memory_format=_memory_format(e))
    dw = dw_weight.reshape(C, KH * KW).contiguous()
    bp, bc, warps, stages = CONFIG
    grid = (triton.cdiv(OH * OW, bp), triton.cdiv(C, bc), N)
    _depthwise_act_kernel[grid](e, dw, dw if dw_bias is None else dw_bias.contiguous(), d, C, H, W, OH, OW,
                                *e.stride(), *d.stride(), *stride, *padding, KH=KH, KW=KW,
                                ACT=_activation(activation), HAS_DB=dw_bias is not None, RNE_BF16=_rne_bf16(e),
                                BLOCK_P=bp, BLOCK_C=bc, num_warps=warps, num_stages=stages)
    return d


def depthwise_act_backward(grad_d, e, pre_e, dw_weight, dw_bias, stride, padding, activation):
    """(the gradient at pre_e, or at e when pre_e is None, in e's dtype and memory format; dw_weight's gradient;
    dw_bias' gradient, both in dw_weight's dtype) from grad_d, the gradient at d = act(depthwise(e) + dw_bias)."""
    N, C, H, W, KH, KW, OH, OW = _geometry(e, dw_weight, stride, padding)
    dw = dw_weight.reshape(C, KH * KW).contiguous()
    act = _activation(activation)
    bp, bc, warps, stages = CONFIG
    grid = (triton.cdiv(OH * OW, bp), triton.cdiv(C, bc), N)
    f32 = dict(dtype=torch.float32, device=e.device)
    g_pre = torch.empty((N, C, OH, OW), memory_format=_memory_format(e), **f32)
    g_dw = torch.empty((N * grid[0], KH * KW, C), **f32)
    g_db = torch.empty((N * grid[0], C), **f32)
    _depthwise_act_grad_kernel[grid](grad_d, e, dw, dw if dw_bias is None else dw_bias.contiguous(), g_pre, g_dw,
                                     g_db, C, H, W, OH, OW, *grad_d.stride(), *e.stride(), *g_pre.stride(), *stride,
                                     *padding, KH=KH, KW=KW, ACT=act, HAS_DB=dw_bias is not None, BLOCK_P=bp,
                                     BLOCK_C=bc, num_warps=warps, num_stages=stages)
    g_in = torch.empty((N, C, H, W), dtype=e.dtype, device=e.device, memory_format=_memory_format(e))
    pre = e if pre_e is None else pre_e
    grid = (triton.cdiv(H * W, bp), triton.cdiv(C, bc), N)
    _depthwise_transpose_kernel[grid](g_pre, dw, pre, g_in, C, H, W, OH, OW, *g_pre.stride(), *pre.stride(),
                                      *g_in.stride(), *stride, *padding, KH=KH, KW=KW, ACT=act,
                                      HAS_PRE=pre_e is not None, RNE_BF16=_rne_bf16(e), BLOCK_P=bp, BLOCK_C=bc,
                                      num_warps=warps, num_stages=stages)
    dt = dw_weight.dtype
    return g_in, g_dw.sum(0).t().reshape(dw_weight.shape).to(dt), g_db.sum(0).to(dt)


def _aot_specs():
    from effops.triton_kernels._aot import AotSpec

    bp, bc, warps, stages = CONFIG
    geo = ["C", "H", "W", "OH", "OW"]
    conv = ["SH", "SW", "PH", "PW"]

    def strides(*prefixes):
        return [p + s for p in prefixes for s in "nchw"]

    kernels = (  # (kernel, pointers (fp32 ones marked), strides, the constexpr flag beside ACT)
        (_depthwise_act_kernel, ["e_ptr", "dw_ptr", "db_ptr", "d_ptr"], [], strides("se", "sd"), "HAS_DB"),
        (_depthwise_act_grad_kernel, ["gd_ptr", "e_ptr", "dw_ptr", "db_ptr"], ["gpre_ptr", "gdw_ptr", "gdb_ptr"],
         strides("sg", "se", "sp"), "HAS_DB"),
        (_depthwise_transpose_kernel, ["dw_ptr", "pre_ptr", "gin_ptr"], ["gpre_ptr"], strides("sp", "se", "si"),
         "HAS_PRE"),
    )
    specs = []
    # MobileNetV2's 3x3 relu6 block in bf16 and fp32, MobileNetV3 / MNASNet's 5x5 hardswish and EfficientNet's
    # 3x3 silu in bf16, a 7x7 gelu in fp16 (the largest kernel), every kernel each time.
    for dtype, k, act in (("bf16", 3, 2), ("fp32", 3, 2), ("bf16", 5, 5), ("bf16", 3, 4), ("fp16", 7, 3)):
        for kernel, ptrs, fp32_ptrs, strd, flag in kernels:
            names = kernel.arg_names
            sig = {}
            for a in names:
                if a in ptrs:
                    sig[a] = "*" + dtype
                elif a in fp32_ptrs:
                    sig[a] = "*fp32"
                elif a in geo + strd + conv:
                    sig[a] = "i32"
                else:
                    sig[a] = "constexpr"
            consts = {"KH": k, "KW": k, "ACT": act, flag: True, "BLOCK_P": bp, "BLOCK_C": bc}
            if "RNE_BF16" in names:
                consts["RNE_BF16"] = False
            specs.append(AotSpec(kernel, sig, consts, warps, stages,
                                 "%s[%s k%d act%d|w%d s%d]" % (kernel.fn.__name__, dtype, k, act, warps, stages)))
    return specs


AOT_SPECS = _aot_specs()
