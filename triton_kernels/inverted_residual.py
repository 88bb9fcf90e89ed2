"""Triton kernel for effops::inverted_residual (forward): expand 1x1 -> act -> depthwise k x k -> act ->
project 1x1 [+ x], fused; effops/reference/inverted_residual.py defines it.

One program per (BLOCK_P output pixels, BLOCK_O output channels, image). For each chunk of BLOCK_H
hidden channels it builds the depthwise output d[BLOCK_P, BLOCK_H] in registers: per tap, the expanded
activations at the tap's input pixels, act(x[pixels, :] @ We[:, chunk] + be) by tl.dot over chunks of
BLOCK_CIN input channels, zero outside the image (the depthwise pads the ACTIVATED tensor), times the
tap's weights; then act(d + bd), and acc[BLOCK_P, BLOCK_O] += tl.dot(d, Wp[chunk, :]). The expanded and
depthwise tensors never reach memory. This first version recomputes the expand once per tap and per
output-channel block (KH x KW x ceil(Cout / BLOCK_O) times the expand's arithmetic) instead of sharing
a halo tile between taps: correct and simple, its speed unmeasured (no GPU here); a halo tile in shared
memory is the open work. Inputs and outputs are addressed through their strides (NCHW, channels_last).

Squeeze-excitation (d * gate(mean_hw(d)) before the project) needs d's mean over the whole image first:
two passes, as the CPU kernel. `_inverted_residual_sums_kernel`, one program per (BLOCK_P pixels, BLOCK_H
hidden channels, image), computes the same d tile (`_depthwise_chunk`, shared with the forward) and
stores its sum over the block's pixels (fp32 partial sums, added by torch: no atomics, the same means on
every run); the op layer computes the gate from the means (N x hidden values, torch); the forward with
HAS_SCALE multiplies d by it per (image, channel) before the project dot.

Tiles are >= 16 in every tl.dot dimension. Under TRITON_INTERPRET=1 (tests on CPU tensors) bf16 dots run
in fp32 (the interpreter computes bf16 dots wrongly; triton_kernels/dwpw_conv2d.py).
"""
import torch
import triton
import triton.language as tl

from effops.triton_kernels.dwpw_conv2d import _ACTIVATIONS, _act, _dot, _lowp, _memory_format


@triton.jit
def _expanded_tap(x_img, ew_ptr, eb_ptr, offs_h, mask_h, ih, iw, valid, CIN, CH, sxc, sxh, sxw,
                  ACT: tl.constexpr, EXPAND: tl.constexpr, HAS_EB: tl.constexpr, LOWP: tl.constexpr,
                  BLOCK_P: tl.constexpr, BLOCK_CIN: tl.constexpr, BLOCK_H: tl.constexpr):
    """e[BLOCK_P, BLOCK_H] (fp32): the expanded activations at input pixels (ih, iw), 0 where not valid."""
    pix = ih[:, None] * sxh + iw[:, None] * sxw
    if EXPAND:
        e = tl.zeros((BLOCK_P, BLOCK_H), dtype=tl.float32)
        for c0 in range(0, CIN, BLOCK_CIN):
            offs_c = c0 + tl.arange(0, BLOCK_CIN)
            mask_c = offs_c < CIN
            xv = tl.load(x_img + pix + offs_c[None, :] * sxc, mask=valid[:, None] & mask_c[None, :], other=0.0)
            w = tl.load(ew_ptr + offs_h[None, :] * CIN + offs_c[:, None], mask=mask_c[:, None] & mask_h[None, :],
                        other=0.0)  # [BLOCK_CIN, BLOCK_H]
            e += _dot(xv, w.to(xv.dtype), LOWP)
        if HAS_EB:
            e += tl.load(eb_ptr + offs_h, mask=mask_h, other=0.0).to(tl.float32)[None, :]
        e = _act(e, ACT)
    else:
        e = tl.load(x_img + pix + offs_h[None, :] * sxc, mask=valid[:, None] & mask_h[None, :],
                    other=0.0).to(tl.float32)
    return tl.where(valid[:, None], e, 0.0)


@triton.jit
def _depthwise_chunk(x_img, ew_ptr, eb_ptr, dw_ptr, db_ptr, offs_h, mask_h, oh, ow, mask_p, CIN, CH, H, W,
                     sxc, sxh, sxw, SH, SW, PH, PW, KH: tl.constexpr, KW: tl.constexpr, ACT: tl.constexpr,
                     EXPAND: tl.constexpr, HAS_EB: tl.constexpr, HAS_DB: tl.constexpr, LOWP: tl.constexpr,
                     BLOCK_P: tl.constexpr, BLOCK_CIN: tl.constexpr, BLOCK_H: tl.constexpr):
    """d[BLOCK_P, BLOCK_H] (fp32): act(depthwise(act(expand(x))) + bd) at output pixels (oh, ow), hidden
    channels offs_h; rows where mask_p is false hold act(bd), not 0 (callers mask them)."""
    d = tl.zeros((BLOCK_P, BLOCK_H), dtype=tl.float32)
    for kh in range(KH):  # loops, not unrolled (triton_kernels/dwpw_conv2d.py: spills, compile time)
        ih = oh * SH - PH + kh
        for kw in range(KW):
            iw = ow * SW - PW + kw
            valid = mask_p & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            e = _expanded_tap(x_img, ew_ptr, eb_ptr, offs_h, mask_h, ih, iw, valid, CIN, CH, sxc, sxh, sxw,
                              ACT, EXPAND, HAS_EB, LOWP, BLOCK_P, BLOCK_CIN, BLOCK_H)
            wd = tl.load(dw_ptr + offs_h * (KH * KW) + (kh * KW + kw), mask=mask_h, other=0.0).to(tl.float32)
            d += e * wd[None, :]
    if HAS_DB:
        d += tl.load(db_ptr + offs_h, mask=mask_h, other=0.0).to(tl.float32)[None, :]
    return _act(d, ACT)


@triton.jit
def _inverted_residual_fwd_kernel(x_ptr, ew_ptr, eb_ptr, dw_ptr, db_ptr, pw_ptr, pb_ptr, scale_ptr, y_ptr,
                                  CIN, CH, COUT, H, W, OH, OW, sxn, sxc, sxh, sxw, syn, syc, syh, syw,
                                  SH, SW, PH, PW, KH: tl.constexpr, KW: tl.constexpr, ACT: tl.constexpr,
                                  EXPAND: tl.constexpr, HAS_EB: tl.constexpr, HAS_DB: tl.constexpr,
                                  HAS_PB: tl.constexpr, HAS_SCALE: tl.constexpr, RESIDUAL: tl.constexpr,
                                  LOWP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_CIN: tl.constexpr,
                                  BLOCK_H: tl.constexpr, BLOCK_O: tl.constexpr):
    """y = project(d [* scale]) [+ x]; HAS_SCALE: d times scale[n, channel] (fp32, contiguous [N, CH]: the
    squeeze-excitation gate), between the activation and the project dot."""
    pid_p, pid_o, n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < OH * OW
    oh, ow = offs_p // OW, offs_p % OW
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    mask_o = offs_o < COUT
    x_img = x_ptr + n.to(tl.int64) * sxn
    acc = tl.zeros((BLOCK_P, BLOCK_O), dtype=tl.float32)
    for h0 in range(0, CH, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mask_h = offs_h < CH
        d = _depthwise_chunk(x_img, ew_ptr, eb_ptr, dw_ptr, db_ptr, offs_h, mask_h, oh, ow, mask_p, CIN, CH, H, W,
                             sxc, sxh, sxw, SH, SW, PH, PW, KH, KW, ACT, EXPAND, HAS_EB, HAS_DB, LOWP, BLOCK_P,
                             BLOCK_CIN, BLOCK_H)
        if HAS_SCALE:
            d = d * tl.load(scale_ptr + n.to(tl.int64) * CH + offs_h, mask=mask_h, other=0.0)[None, :]
        wp = tl.load(pw_ptr + offs_o[None, :] * CH + offs_h[:, None], mask=mask_h[:, None] & mask_o[None, :],
                     other=0.0)  # [BLOCK_H, BLOCK_O]
        acc += _dot(d.to(wp.dtype), wp, LOWP)
    if HAS_PB:
        acc += tl.load(pb_ptr + offs_o, mask=mask_o, other=0.0).to(tl.float32)[None, :]
    if RESIDUAL:  # stride 1, COUT == CIN: the output pixel's own input
        acc += tl.load(x_img + oh[:, None] * sxh + ow[:, None] * sxw + offs_o[None, :] * sxc,
                       mask=mask_p[:, None] & mask_o[None, :], other=0.0).to(tl.float32)
    y = y_ptr + n.to(tl.int64) * syn + offs_o[None, :] * syc + oh[:, None] * syh + ow[:, None] * syw
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_o[None, :])


@triton.jit
def _inverted_residual_sums_kernel(x_ptr, ew_ptr, eb_ptr, dw_ptr, db_ptr, sums_ptr, CIN, CH, H, W, OH, OW,
                                   sxn, sxc, sxh, sxw, SH, SW, PH, PW, KH: tl.constexpr, KW: tl.constexpr,
                                   ACT: tl.constexpr, EXPAND: tl.constexpr, HAS_EB: tl.constexpr,
                                   HAS_DB: tl.constexpr, LOWP: tl.constexpr, BLOCK_P: tl.constexpr,
                                   BLOCK_CIN: tl.constexpr, BLOCK_H: tl.constexpr):
    """The squeeze-excitation's first pass: sums[n, pid_p, channel] = the sum of d over this program's
    BLOCK_P output pixels (fp32, [N, cdiv(OH * OW, BLOCK_P), CH]). One program per (pixels, hidden chunk,
    image); no project. Partial sums, not atomics: the means come out the same on every run."""
    pid_p, pid_h, n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < OH * OW
    oh, ow = offs_p // OW, offs_p % OW
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = offs_h < CH
    x_img = x_ptr + n.to(tl.int64) * sxn
    d = _depthwise_chunk(x_img, ew_ptr, eb_ptr, dw_ptr, db_ptr, offs_h, mask_h, oh, ow, mask_p, CIN, CH, H, W,
                         sxc, sxh, sxw, SH, SW, PH, PW, KH, KW, ACT, EXPAND, HAS_EB, HAS_DB, LOWP, BLOCK_P,
                         BLOCK_CIN, BLOCK_H)
    s = tl.sum(tl.where(mask_p[:, None], d, 0.0), axis=0)
    row = (n.to(tl.int64) * tl.num_programs(0) + pid_p) * CH
    tl.store(sums_ptr + row + offs_h, s, mask=mask_h)


# (BLOCK_P, BLOCK_CIN, BLOCK_H, BLOCK_O, num_warps, num_stages): one configuration; fp32 with one stage
# (as the dwpw forward: with two, the pipeliner keeps every tap's tiles in shared memory).
CONFIG = (32, 32, 32, 32, 4, 2)


def _geometry(x, expand_weight, dw_weight, stride, padding):
    """Sizes and the weights as the kernels read them: (N, CIN, H, W, CH, KH, KW, OH, OW, ew, dw)."""
    N, CIN, H, W = x.shape
    CH, _, KH, KW = dw_weight.shape
    OH = (H + 2 * padding[0] - KH) // stride[0] + 1
    OW = (W + 2 * padding[1] - KW) // stride[1] + 1
    dw = dw_weight.reshape(CH, KH * KW).contiguous()
    ew = dw if expand_weight is None else expand_weight.reshape(CH, CIN).contiguous()
    return N, CIN, H, W, CH, KH, KW, OH, OW, ew, dw


def inverted_residual_forward(x, expand_weight, expand_bias, dw_weight, dw_bias, project_weight, project_bias,
                              stride, padding, activation, residual, scale=None):
    """The block's output; scale (fp32 [N, hidden], or None): d is multiplied by scale[n, channel] before the
    project conv (the squeeze-excitation gate, computed from inverted_residual_means)."""
    N, CIN, H, W, CH, KH, KW, OH, OW, ew, dw = _geometry(x, expand_weight, dw_weight, stride, padding)
    COUT = project_weight.shape[0]
    y = torch.empty((N, COUT, OH, OW), dtype=x.dtype, device=x.device, memory_format=_memory_format(x))
    pw = project_weight.reshape(COUT, CH).contiguous()
    if scale is not None:
        scale = scale.to(torch.float32).contiguous()
    bp, bc, bh, bo, warps, stages = CONFIG
    lowp = _lowp(x)
    grid = (triton.cdiv(OH * OW, bp), triton.cdiv(COUT, bo), N)
    _inverted_residual_fwd_kernel[grid](
        x, ew, dw if expand_bias is None else expand_bias.contiguous(), dw,
        dw if dw_bias is None else dw_bias.contiguous(), pw, pw if project_bias is None else project_bias.contiguous(),
        dw if scale is None else scale, y, CIN, CH, COUT, H, W, OH, OW, *x.stride(), *y.stride(), *stride, *padding,
        KH=KH, KW=KW, ACT=_ACTIVATIONS[activation], EXPAND=expand_weight is not None, HAS_EB=expand_bias is not None,
        HAS_DB=dw_bias is not None, HAS_PB=project_bias is not None, HAS_SCALE=scale is not None, RESIDUAL=residual,
        LOWP=lowp, BLOCK_P=bp, BLOCK_CIN=bc, BLOCK_H=bh, BLOCK_O=bo, num_warps=warps,
        num_stages=stages if lowp else 1)
    return y


def inverted_residual_means(x, expand_weight, expand_bias, dw_weight, dw_bias, stride, padding, activation):
    """d's mean over each image's output pixels, per hidden channel: fp32 [N, hidden] (the squeeze-excitation's
    first pass; the expanded and depthwise tensors never reach memory). The kernel writes one partial sum per
    block of BLOCK_P pixels; torch adds them."""
    N, CIN, H, W, CH, KH, KW, OH, OW, ew, dw = _geometry(x, expand_weight, dw_weight, stride, padding)
    bp, bc, bh, _, warps, stages = CONFIG
    lowp = _lowp(x)
    grid = (triton.cdiv(OH * OW, bp), triton.cdiv(CH, bh), N)
    sums = torch.empty((N, grid[0], CH), dtype=torch.float32, device=x.device)
    _inverted_residual_sums_kernel[grid](
        x, ew, dw if expand_bias is None else expand_bias.contiguous(), dw,
        dw if dw_bias is None else dw_bias.contiguous(), sums, CIN, CH, H, W, OH, OW, *x.stride(), *stride, *padding,
        KH=KH, KW=KW, ACT=_ACTIVATIONS[activation], EXPAND=expand_weight is not None, HAS_EB=expand_bias is not None,
        HAS_DB=dw_bias is not None, LOWP=lowp, BLOCK_P=bp, BLOCK_CIN=bc, BLOCK_H=bh, num_warps=warps,
        num_stages=stages if lowp else 1)
    return sums.sum(1) / (OH * OW)


def _aot_specs():
    from effops.triton_kernels._aot import AotSpec

    bp, bc, bh, bo, warps, stages = CONFIG
    shape = ["CIN", "CH", "COUT", "H", "W", "OH", "OW", "sxn", "sxc", "sxh", "sxw", "syn", "syc", "syh", "syw",
             "SH", "SW", "PH", "PW"]
    fwd_consts = ["KH", "KW", "ACT", "EXPAND", "HAS_EB", "HAS_DB", "HAS_PB", "HAS_SCALE", "RESIDUAL", "LOWP",
                  "BLOCK_P", "BLOCK_CIN", "BLOCK_H", "BLOCK_O"]
    fwd_ptrs = ["x_ptr", "ew_ptr", "eb_ptr", "dw_ptr", "db_ptr", "pw_ptr", "pb_ptr", "scale_ptr", "y_ptr"]
    sums_shape = [a for a in shape if a not in ("COUT", "syn", "syc", "syh", "syw")]
    sums_consts = ["KH", "KW", "ACT", "EXPAND", "HAS_EB", "HAS_DB", "LOWP", "BLOCK_P", "BLOCK_CIN", "BLOCK_H"]
    sums_ptrs = ["x_ptr", "ew_ptr", "eb_ptr", "dw_ptr", "db_ptr"]

    def signature(ptrs, ints, consts, dtype, fp32_ptrs):
        return {**{p: "*" + ("fp32" if p in fp32_ptrs else dtype) for p in ptrs}, **{i: "i32" for i in ints},
                **{c: "constexpr" for c in consts}}

    specs = []
    # MobileNetV2's block (3x3 relu6, residual) in bf16 (tensor cores) and fp32; a 5x5 hardswish block
    # (MobileNetV3 / MNASNet) and one without expansion in bf16. With squeeze-excitation (scale): the
    # EfficientNet block (3x3 silu) in bf16 and fp32, MobileNetV3's 5x5 hardswish one with residual, and
    # EfficientNet-B0's first block (no expansion).
    for dtype, lowp, k, act, expand, residual, scaled in (
            ("bf16", True, 3, 2, True, True, False), ("fp32", False, 3, 2, True, True, False),
            ("bf16", True, 5, 5, True, False, False), ("bf16", True, 3, 4, False, False, False),
            ("bf16", True, 3, 4, True, False, True), ("fp32", False, 3, 4, True, True, True),
            ("bf16", True, 5, 5, True, True, True), ("bf16", True, 3, 4, False, False, True)):
        specs.append(AotSpec(_inverted_residual_fwd_kernel,
                             signature(fwd_ptrs, shape, fwd_consts, dtype, ["scale_ptr"] if scaled else []),
                             dict(KH=k, KW=k, ACT=act, EXPAND=expand, HAS_EB=expand, HAS_DB=True, HAS_PB=True,
                                  HAS_SCALE=scaled, RESIDUAL=residual, LOWP=lowp, BLOCK_P=bp, BLOCK_CIN=bc,
                                  BLOCK_H=bh, BLOCK_O=bo),
                             warps, stages if lowp else 1))
    # The squeeze-excitation's means pass for the same blocks.
    for dtype, lowp, k, act, expand in (("bf16", True, 3, 4, True), ("fp32", False, 3, 4, True),
                                        ("bf16", True, 5, 5, True), ("bf16", True, 3, 4, False)):
        specs.append(AotSpec(_inverted_residual_sums_kernel,
                             signature(sums_ptrs + ["sums_ptr"], sums_shape, sums_consts, dtype, ["sums_ptr"]),
                             dict(KH=k, KW=k, ACT=act, EXPAND=expand, HAS_EB=expand, HAS_DB=True, LOWP=lowp,
                                  BLOCK_P=bp, BLOCK_CIN=bc, BLOCK_H=bh),
                             warps, stages if lowp else 1))
    return specs


AOT_SPECS = _aot_specs()
