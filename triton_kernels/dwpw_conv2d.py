"""Triton kernels for effops::dwpw_conv2d: depthwise conv -> activation -> 1x1 conv, fused.

Forward (`_dwpw_fwd_kernel`), one program per (BLOCK_P output pixels, BLOCK_O output channels, image):
for each chunk of BLOCK_C input channels it computes the depthwise output tile h[BLOCK_P, BLOCK_C] in
registers (KH x KW masked loads, fp32), applies the activation, and accumulates
acc[BLOCK_P, BLOCK_O] += tl.dot(act(h), Wpw[BLOCK_C, BLOCK_O]) (tensor cores in bf16/fp16). The
intermediate never reaches memory; inputs and outputs are addressed through their strides, so NCHW
and channels_last need no copies.

Backward (`_dwpw_bwd_kernel`), one program per (BLOCK_P pixels, BLOCK_C channels, image): it
recomputes h, then over chunks of BLOCK_O outputs g_a += tl.dot(gy, Wpw) and g_pw += tl.dot(gy^T, a);
g_h = g_a * act'(h); then g_dwb, g_dw (per tap, a reduction over pixels) and gx (a scatter over
taps). Partial sums from different programs meet in fp32 buffers through atomic adds.

Tiles are >= 16 in every tl.dot dimension (tensor cores). Under TRITON_INTERPRET=1 (tests on CPU
tensors) bf16 dots run in fp32: the interpreter computes bf16 dots wrongly (fp16 ones correctly, so
fp16 takes the GPU's 16-bit path there too).
"""
import os

import torch
import triton
import triton.language as tl

_INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
_ACTIVATIONS = {None: 0, "relu": 1, "relu6": 2, "gelu": 3, "silu": 4, "hardswish": 5}


@triton.jit
def _act(h, ACT: tl.constexpr):
    # NaN propagates, as in torch (the default min/max return the other operand).
    if ACT == 1:
        h = tl.maximum(h, 0.0, propagate_nan=tl.PropagateNan.ALL)
    elif ACT == 2:
        h = tl.minimum(tl.maximum(h, 0.0, propagate_nan=tl.PropagateNan.ALL), 6.0, propagate_nan=tl.PropagateNan.ALL)
    elif ACT == 3:
        h = 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))
    elif ACT == 4:
        h = h * tl.sigmoid(h)
    elif ACT == 5:
        r6 = tl.minimum(tl.maximum(h + 3.0, 0.0, propagate_nan=tl.PropagateNan.ALL), 6.0,
                        propagate_nan=tl.PropagateNan.ALL)
        h = h * r6 / 6.0
    return h


@triton.jit
def _act_backward(g, h, ACT: tl.constexpr):
    """g * act'(h), with torch's conventions (relu' = 0 at 0; relu6' = 0 at 0 and 6; hardswish' = 0 at -3 and
    1 at 3, as effops.reference.dwpw_conv2d.activation_backward defines it)."""
    if ACT == 1:
        g = tl.where(h > 0.0, g, 0.0)
    elif ACT == 2:
        g = tl.where((h > 0.0) & (h < 6.0), g, 0.0)
    elif ACT == 3:
        cdf = 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476))
        pdf = tl.exp(-0.5 * h * h) * 0.3989422804014327
        g = g * (cdf + h * pdf)
    elif ACT == 4:
        s = tl.sigmoid(h)
        g = g * s * (1.0 + h * (1.0 - s))
    elif ACT == 5:  # 0 up to -3 included, h / 3 + 1/2 on (-3, 3), 1 from 3 on (and for NaN)
        g = tl.where(h <= -3.0, 0.0, tl.where(h < 3.0, g * (h / 3.0 + 0.5), g))
    return g


@triton.jit
def _depthwise_tile(x_img, dw_ptr, dwb_ptr, offs_c, mask_c, oh, ow, mask_p, H, W, sxc, sxh, sxw, SH, SW, PH, PW,
                    DH, DW, KH: tl.constexpr, KW: tl.constexpr, HAS_DWB: tl.constexpr, BLOCK_P: tl.constexpr,
                    BLOCK_C: tl.constexpr):
    """h[BLOCK_P, BLOCK_C] (fp32): the depthwise conv at pixels (oh, ow) for channels offs_c."""
    h = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    # Loops, not tl.static_range: unrolled, the taps spilled registers (bf16 forward 0.3 KB at 3x3 and
    # 1.9 KB at 7x7 on sm_80, backward 0.2-0.6 KB) and a 7x7 backward took ~80 s to compile; as loops
    # the forward and the 16-bit backward spill nothing and compile in ~1.5 s (compile check, 2026-11-29).
    for kh in range(KH):
        ih = oh * SH - PH + kh * DH
        for kw in range(KW):
            iw = ow * SW - PW + kw * DW
            valid = mask_p & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            xv = tl.load(x_img + ih[:, None] * sxh + iw[:, None] * sxw + offs_c[None, :] * sxc,
                         mask=valid[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
            wv = tl.load(dw_ptr + offs_c * (KH * KW) + (kh * KW + kw), mask=mask_c, other=0.0).to(tl.float32)
            h += xv * wv[None, :]
    if HAS_DWB:
        h += tl.load(dwb_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    return h


@triton.jit
def _dot(a, b, LOWP: tl.constexpr):
    """a @ b: on tensor cores in the inputs' 16-bit type (LOWP), else in exact fp32."""
    if LOWP:
        return tl.dot(a, b)
    return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")


@triton.jit
def _dwpw_fwd_kernel(x_ptr, dw_ptr, dwb_ptr, pw_ptr, pwb_ptr, y_ptr, C, H, W, O, OH, OW,
                     sxn, sxc, sxh, sxw, syn, syc, syh, syw, SH, SW, PH, PW, DH, DW,
                     KH: tl.constexpr, KW: tl.constexpr, ACT: tl.constexpr, HAS_DWB: tl.constexpr,
                     HAS_PWB: tl.constexpr, LOWP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                     BLOCK_O: tl.constexpr):
    pid_p, pid_o, n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < OH * OW
    oh, ow = offs_p // OW, offs_p % OW
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    mask_o = offs_o < O
    x_img = x_ptr + n.to(tl.int64) * sxn
    acc = tl.zeros((BLOCK_P, BLOCK_O), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        h = _depthwise_tile(x_img, dw_ptr, dwb_ptr, offs_c, mask_c, oh, ow, mask_p, H, W, sxc, sxh, sxw, SH, SW, PH,
                            PW, DH, DW, KH, KW, HAS_DWB, BLOCK_P, BLOCK_C)
        a = _act(h, ACT)
        w = tl.load(pw_ptr + offs_o[None, :] * C + offs_c[:, None], mask=mask_c[:, None] & mask_o[None, :], other=0.0)
        acc += _dot(a.to(w.dtype), w, LOWP)
    if HAS_PWB:
        acc += tl.load(pwb_ptr + offs_o, mask=mask_o, other=0.0).to(tl.float32)[None, :]
    y = y_ptr + n.to(tl.int64) * syn + offs_o[None, :] * syc + oh[:, None] * syh + ow[:, None] * syw
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_o[None, :])


@triton.jit
def _dwpw_bwd_kernel(gy_ptr, x_ptr, dw_ptr, dwb_ptr, pw_ptr, gx_ptr, gdw_ptr, gpw_ptr, gdwb_ptr, gpwb_ptr,
                     C, H, W, O, OH, OW, sxn, sxc, sxh, sxw, sgn, sgc, sgh, sgw, SH, SW, PH, PW, DH, DW,
                     KH: tl.constexpr, KW: tl.constexpr, ACT: tl.constexpr, HAS_DWB: tl.constexpr,
                     NEED_X: tl.constexpr, NEED_DW: tl.constexpr, NEED_PW: tl.constexpr, NEED_DWB: tl.constexpr,
                     NEED_PWB: tl.constexpr, LOWP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                     BLOCK_O: tl.constexpr):
    pid_p, pid_c, n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < OH * OW
    oh, ow = offs_p // OW, offs_p % OW
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    x_img = x_ptr + n.to(tl.int64) * sxn
    h = _depthwise_tile(x_img, dw_ptr, dwb_ptr, offs_c, mask_c, oh, ow, mask_p, H, W, sxc, sxh, sxw, SH, SW, PH, PW,
                        DH, DW, KH, KW, HAS_DWB, BLOCK_P, BLOCK_C)
    a = _act(h, ACT)
    g = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    gy_img = gy_ptr + n.to(tl.int64) * sgn
    for o0 in range(0, O, BLOCK_O):
        offs_o = o0 + tl.arange(0, BLOCK_O)
        mask_o = offs_o < O
        gy = tl.load(gy_img + offs_o[None, :] * sgc + oh[:, None] * sgh + ow[:, None] * sgw,
                     mask=mask_p[:, None] & mask_o[None, :], other=0.0)  # [BLOCK_P, BLOCK_O]
        w = tl.load(pw_ptr + offs_o[:, None] * C + offs_c[None, :], mask=mask_o[:, None] & mask_c[None, :], other=0.0)
        if NEED_X or NEED_DW or NEED_DWB:
            g += _dot(gy, w, LOWP)
        if NEED_PW:
            part = _dot(tl.trans(gy), a.to(gy.dtype), LOWP)  # [BLOCK_O, BLOCK_C], summed over this tile's pixels
            tl.atomic_add(gpw_ptr + offs_o[:, None] * C + offs_c[None, :], part,
                          mask=mask_o[:, None] & mask_c[None, :])
        if NEED_PWB:
            if pid_c == 0:
                tl.atomic_add(gpwb_ptr + offs_o, tl.sum(gy.to(tl.float32), axis=0), mask=mask_o)
    if NEED_X or NEED_DW or NEED_DWB:
        g = _act_backward(g, h, ACT)
        g = tl.where(mask_p[:, None] & mask_c[None, :], g, 0.0)
        if NEED_DWB:
            tl.atomic_add(gdwb_ptr + offs_c, tl.sum(g, axis=0), mask=mask_c)
        gx_img = gx_ptr + n.to(tl.int64) * C * H * W  # gx: contiguous NCHW fp32
        for kh in range(KH):  # loops, not unrolled: see _depthwise_tile
            ih = oh * SH - PH + kh * DH
            for kw in range(KW):
                iw = ow * SW - PW + kw * DW
                valid = mask_p & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                m2 = valid[:, None] & mask_c[None, :]
                if NEED_DW:
                    xv = tl.load(x_img + ih[:, None] * sxh + iw[:, None] * sxw + offs_c[None, :] * sxc, mask=m2,
                                 other=0.0).to(tl.float32)
                    tl.atomic_add(gdw_ptr + offs_c * (KH * KW) + (kh * KW + kw), tl.sum(g * xv, axis=0), mask=mask_c)
                if NEED_X:
                    wv = tl.load(dw_ptr + offs_c * (KH * KW) + (kh * KW + kw), mask=mask_c, other=0.0).to(tl.float32)
                    tl.atomic_add(gx_img + offs_c[None, :] * (H * W) + ih[:, None] * W + iw[:, None],
                                  g * wv[None, :], mask=m2)


# ---------------------------------------------------------------------------------------------
# Launchers (registered as the "triton" kernels of effops::dwpw_conv2d and its backward)
# ---------------------------------------------------------------------------------------------
# (BLOCK_P, BLOCK_C, BLOCK_O, num_warps, num_stages). Forward: the first when O > 32 (a wider
# BLOCK_O reuses each depthwise tile more) and always in the interpreter (few, large programs), the
# second otherwise. A 128-pixel tile needed 173 KB of shared memory in fp32 (over sm_80's 163 KB).
# Backward: the first in the interpreter, the second on a GPU (the first spilled 1.1 KB per thread in
# the compile check; the second 0.2 KB in bf16). Tests run every configuration in the interpreter
# (test_triton_every_gpu_config), since the GPU's choices are not the interpreter's.
# fp32 forwards run with one stage (_fwd_stages): with two, Triton's pipeliner keeps every depthwise
# tap's x tile in shared memory, 424 KB for a 7x7 kernel (91 KB at 3x3), past any GPU's limit, while
# the 16-bit forward needs 4-8 KB either way (sm_80/sm_90 compiles, 2026-11-29).
CONFIGS = [(64, 32, 64, 4, 2), (64, 32, 32, 4, 2)]
BWD_CONFIGS = [(64, 32, 32, 4, 2), (32, 32, 64, 4, 2)]


def _geometry(x, dw_weight, stride, padding, dilation):
    N, C, H, W = x.shape
    KH, KW = dw_weight.shape[2:]
    OH = (H + 2 * padding[0] - dilation[0] * (KH - 1) - 1) // stride[0] + 1
    OW = (W + 2 * padding[1] - dilation[1] * (KW - 1) - 1) // stride[1] + 1
    return N, C, H, W, KH, KW, OH, OW


def _memory_format(x):
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _lowp(x):
    """Dots on tensor cores in x's 16-bit type (the interpreter: fp16 only, see the module docstring)."""
    return x.dtype == torch.float16 or (x.dtype == torch.bfloat16 and not _INTERPRETING)


def _fwd_stages(stages, lowp):
    return stages if lowp else 1  # see CONFIGS


def _forward_config(O):
    return CONFIGS[0] if _INTERPRETING or O > 32 else CONFIGS[1]


def _backward_config():
    return BWD_CONFIGS[0 if _INTERPRETING else 1]


def dwpw_conv2d_forward(x, dw_weight, pw_weight, dw_bias, pw_bias, stride, padding, dilation, activation):
    N, C, H, W, KH, KW, OH, OW = _geometry(x, dw_weight, stride, padding, dilation)
    O = pw_weight.shape[0]
    y = torch.empty((N, O, OH, OW), dtype=x.dtype, device=x.device, memory_format=_memory_format(x))
    dw = dw_weight.reshape(C, KH * KW).contiguous()
    pw = pw_weight.reshape(O, C).contiguous()
    bp, bc, bo, warps, stages = _forward_config(O)
    grid = (triton.cdiv(OH * OW, bp), triton.cdiv(O, bo), N)
    _dwpw_fwd_kernel[grid](x, dw, dw if dw_bias is None else dw_bias.contiguous(), pw,
                           pw if pw_bias is None else pw_bias.contiguous(), y, C, H, W, O, OH, OW, *x.stride(),
                           *y.stride(), *stride, *padding, *dilation, KH=KH, KW=KW, ACT=_ACTIVATIONS[activation],
                           HAS_DWB=dw_bias is not None, HAS_PWB=pw_bias is not None, LOWP=_lowp(x), BLOCK_P=bp,
                           BLOCK_C=bc, BLOCK_O=bo, num_warps=warps, num_stages=_fwd_stages(stages, _lowp(x)))
    return y


def dwpw_conv2d_backward(grad_y, x, dw_weight, pw_weight, dw_bias, stride, padding, dilation, activation,
                         needs_input_grad):
    N, C, H, W, KH, KW, OH, OW = _geometry(x, dw_weight, stride, padding, dilation)
    O = pw_weight.shape[0]
    need = list(needs_input_grad)
    f32 = dict(dtype=torch.float32, device=x.device)
    gx = torch.zeros((N, C, H, W), **f32) if need[0] else torch.empty(0, **f32)
    gdw = torch.zeros(C, KH * KW, **f32) if need[1] else torch.empty(0, **f32)
    gpw = torch.zeros(O, C, **f32) if need[2] else torch.empty(0, **f32)
    gdwb = torch.zeros(C, **f32) if need[3] else torch.empty(0, **f32)
    gpwb = torch.zeros(O, **f32) if need[4] else torch.empty(0, **f32)
    dw = dw_weight.reshape(C, KH * KW).contiguous()
    pw = pw_weight.reshape(O, C).contiguous()
    bp, bc, bo, warps, stages = _backward_config()
    grid = (triton.cdiv(OH * OW, bp), triton.cdiv(C, bc), N)
    _dwpw_bwd_kernel[grid](grad_y, x, dw, dw if dw_bias is None else dw_bias.contiguous(), pw, gx, gdw, gpw, gdwb,
                           gpwb, C, H, W, O, OH, OW, *x.stride(), *grad_y.stride(), *stride, *padding, *dilation,
                           KH=KH, KW=KW, ACT=_ACTIVATIONS[activation], HAS_DWB=dw_bias is not None,
                           NEED_X=need[0], NEED_DW=need[1], NEED_PW=need[2], NEED_DWB=need[3], NEED_PWB=need[4],
                           LOWP=_lowp(x), BLOCK_P=bp, BLOCK_C=bc, BLOCK_O=bo, num_warps=warps, num_stages=stages)
    dt = x.dtype
    return (gx.to(dt).contiguous(memory_format=_memory_format(x)) if need[0] else None,
            gdw.to(dt).reshape(dw_weight.shape) if need[1] else None,
            gpw.to(dt).reshape(pw_weight.shape) if need[2] else None,
            gdwb.to(dt) if need[3] else None,
            gpwb.to(dt) if need[4] else None)


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile specs: every kernel in every configuration (tools/gpu_compile_check.py)
# ---------------------------------------------------------------------------------------------
def _aot_specs():
    from effops.triton_kernels._aot import AotSpec

    ints = ["C", "H", "W", "O", "OH", "OW"]
    geo = ["SH", "SW", "PH", "PW", "DH", "DW"]
    fwd_sig = {"x_ptr": "*bf16", "dw_ptr": "*bf16", "dwb_ptr": "*bf16", "pw_ptr": "*bf16", "pwb_ptr": "*bf16",
               "y_ptr": "*bf16", **{k: "i32" for k in ints + ["sxn", "sxc", "sxh", "sxw", "syn", "syc", "syh", "syw"]
                                    + geo}}
    fwd_const = ["KH", "KW", "ACT", "HAS_DWB", "HAS_PWB", "LOWP", "BLOCK_P", "BLOCK_C", "BLOCK_O"]
    bwd_sig = {"gy_ptr": "*bf16", "x_ptr": "*bf16", "dw_ptr": "*bf16", "dwb_ptr": "*bf16", "pw_ptr": "*bf16",
               "gx_ptr": "*fp32", "gdw_ptr": "*fp32", "gpw_ptr": "*fp32", "gdwb_ptr": "*fp32", "gpwb_ptr": "*fp32",
               **{k: "i32" for k in ints + ["sxn", "sxc", "sxh", "sxw", "sgn", "sgc", "sgh", "sgw"] + geo}}
    bwd_const = ["KH", "KW", "ACT", "HAS_DWB", "NEED_X", "NEED_DW", "NEED_PW", "NEED_DWB", "NEED_PWB", "LOWP",
                 "BLOCK_P", "BLOCK_C", "BLOCK_O"]
    specs = []
    # 3x3 in every configuration; 7x7 (the largest kernel, the most shared memory) in the wider one.
    for (bp, bc, bo, w, s), ksize in [(c, 3) for c in CONFIGS] + [(CONFIGS[0], 7)]:
        for dtype, lowp in (("bf16", True), ("fp32", False)):
            sig = {k: (v.replace("bf16", dtype)) for k, v in fwd_sig.items()}
            sig.update({k: "constexpr" for k in fwd_const})
            consts = dict(KH=ksize, KW=ksize, ACT=2, HAS_DWB=True, HAS_PWB=True, LOWP=lowp, BLOCK_P=bp, BLOCK_C=bc,
                          BLOCK_O=bo)
            specs.append(AotSpec(_dwpw_fwd_kernel, sig, consts, w, _fwd_stages(s, lowp)))
    first_bwd = len(specs)
    for bp, bc, bo, w, s in BWD_CONFIGS:
        for dtype, lowp in (("bf16", True), ("fp32", False)):
            sig = {k: (v.replace("bf16", dtype)) for k, v in bwd_sig.items()}
            sig.update({k: "constexpr" for k in bwd_const})
            consts = dict(KH=3, KW=3, ACT=3, HAS_DWB=True, NEED_X=True, NEED_DW=True, NEED_PW=True, NEED_DWB=True,
                          NEED_PWB=True, LOWP=lowp, BLOCK_P=bp, BLOCK_C=bc, BLOCK_O=bo)
            specs.append(AotSpec(_dwpw_bwd_kernel, sig, consts, w, s))
    # Every other activation once, forward and backward, in the first configuration (bf16 tensor cores).
    for act in (1, 4, 5):
        for kernel, base in ((_dwpw_fwd_kernel, specs[0]), (_dwpw_bwd_kernel, specs[first_bwd])):
            specs.append(AotSpec(kernel, base.signature, dict(base.constexprs, ACT=act), base.num_warps,
                                 base.num_stages))
    return specs


AOT_SPECS = _aot_specs()
