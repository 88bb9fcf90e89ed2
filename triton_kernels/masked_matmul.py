"""Triton kernels for effops::masked_linear: y = x @ (W * mask)^T + b and its backward.

Block-sparse masks (constant over B x B blocks, B in 16/32/64), walked through the block-CSR index the
op builds from the mask (effops::masked_linear_index: ptr / idx per block-row, and per block-column):
* `_block_mm_kernel`: out[M, R] = A[M, C] @ W'^T (+ bias). Program (m-tile of BM rows, block-row br of
  W') walks only the kept blocks of br through the block-CSR index (ptr, idx): one (BM x B) @ (B x B)
  tensor-core dot per kept block, fp32 accumulator, no atomics (each program owns its output tile).
  W' is W for the forward (index per block-row) and W^T for grad_x (index per block-column), given by
  strides, so the transposed product needs no copy.
* `_block_grad_weight_kernel`: one program per kept block (coordinates from the block list), reducing
  gy[:, n-block]^T @ x[:, k-block] over M in BM chunks: the sampled product, nothing for pruned blocks.

2:4 masks (K a multiple of 4): `_sparse24_mm_kernel` (forward) and `_sparse24_mm_t_kernel` (grad_x) read
the weight compressed (two values per group of 4 inputs plus their int8 positions, built per call: the
weight changes every training step), expand each tile in registers and run a dense tensor-core dot: half the weight bytes, the
same FLOPs (Triton has no sparse tensor-core instruction). grad_weight goes through the masked path below.

Any other mask (unstructured): `_masked_mm_kernel`, a tiled matmul (BM x BR output tile, BC-deep
K steps) that loads the weight tile and the uint8 mask tile and zeroes pruned weights in registers
(never materialising W * mask); with OUT_MASKED it masks the output tile instead, which gives the
weight gradient (gy^T @ x) * mask. This path is dense work: the win is only for the block pattern.

fp32 inputs use IEEE dots (torch's CUDA matmul default is not TF32 for fp32), fp16/bf16 use tensor cores.
"""

import torch
import triton
import triton.language as tl

from effops._shapes import with_leading_dims
from effops.triton_kernels._aot import AotSpec


@triton.jit
def _block_mm_kernel(a_ptr, w_ptr, bias_ptr, out_ptr, ptr_ptr, idx_ptr, M, C, R,
                     stride_am, stride_wr, stride_wc,
                     BLOCK: tl.constexpr, BM: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr):
    pid_m = tl.program_id(0)
    br = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rr = br * BLOCK + tl.arange(0, BLOCK)
    offs = tl.arange(0, BLOCK)
    start = tl.load(ptr_ptr + br)
    end = tl.load(ptr_ptr + br + 1)
    acc = tl.zeros((BM, BLOCK), dtype=tl.float32)
    for j in range(start, end):
        rc = tl.load(idx_ptr + j) * BLOCK + offs
        a = tl.load(a_ptr + rm[:, None] * stride_am + rc[None, :], mask=(rm[:, None] < M) & (rc[None, :] < C),
                    other=0.0)
        # (c, r) tile of W', i.e. W'^T: ready for a @ W'^T
        wt = tl.load(w_ptr + rc[:, None] * stride_wc + rr[None, :] * stride_wr,
                     mask=(rc[:, None] < C) & (rr[None, :] < R), other=0.0)
        if IEEE:
            acc = tl.dot(a, wt, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, wt, acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rr, mask=rr < R, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm[:, None] * R + rr[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rr[None, :] < R))


@triton.jit
def _block_grad_weight_kernel(gy_ptr, x_ptr, gw_ptr, rows_ptr, cols_ptr, M, N, K,
                              BLOCK: tl.constexpr, BM: tl.constexpr, IEEE: tl.constexpr):
    pid = tl.program_id(0)
    rn = tl.load(rows_ptr + pid) * BLOCK + tl.arange(0, BLOCK)
    rk = tl.load(cols_ptr + pid) * BLOCK + tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for m0 in range(0, M, BM):
        rm = m0 + tl.arange(0, BM)
        gyt = tl.load(gy_ptr + rm[None, :] * N + rn[:, None], mask=(rm[None, :] < M) & (rn[:, None] < N), other=0.0)
        x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        if IEEE:
            acc = tl.dot(gyt, x, acc, input_precision="ieee")
        else:
            acc = tl.dot(gyt, x, acc)
    tl.store(gw_ptr + rn[:, None] * K + rk[None, :], acc.to(gw_ptr.dtype.element_ty),
             mask=(rn[:, None] < N) & (rk[None, :] < K))


@triton.jit
def _masked_mm_kernel(a_ptr, b_ptr, mask_ptr, bias_ptr, out_ptr, M, C, R,
                      stride_am, stride_ac, stride_br, stride_bc, stride_mr, stride_mc,
                      BM: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, OUT_MASKED: tl.constexpr,
                      HAS_BIAS: tl.constexpr, IEEE: tl.constexpr):
    """out[M, R] = A[M, C] @ B'^T with B'[r, c] = b[r * stride_br + c * stride_bc], masked by
    mask[r * stride_mr + c * stride_mc] (OUT_MASKED=False) or the output by mask[m * stride_mr + r * stride_mc]."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rr = pid_r * BR + tl.arange(0, BR)
    acc = tl.zeros((BM, BR), dtype=tl.float32)
    for c0 in range(0, C, BC):
        rc = c0 + tl.arange(0, BC)
        a = tl.load(a_ptr + rm[:, None] * stride_am + rc[None, :] * stride_ac,
                    mask=(rm[:, None] < M) & (rc[None, :] < C), other=0.0)
        inside = (rc[:, None] < C) & (rr[None, :] < R)
        bt = tl.load(b_ptr + rc[:, None] * stride_bc + rr[None, :] * stride_br, mask=inside, other=0.0)
        if not OUT_MASKED:
            keep = tl.load(mask_ptr + rc[:, None] * stride_mc + rr[None, :] * stride_mr, mask=inside, other=0)
            bt = tl.where(keep != 0, bt, tl.zeros_like(bt))
        if IEEE:
            acc = tl.dot(a, bt, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, bt, acc)
    inside = (rm[:, None] < M) & (rr[None, :] < R)
    if OUT_MASKED:
        keep = tl.load(mask_ptr + rm[:, None] * stride_mr + rr[None, :] * stride_mc, mask=inside, other=0)
        acc = tl.where(keep != 0, acc, 0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rr, mask=rr < R, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm[:, None] * R + rr[None, :], acc.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _expand_24(vals_ptr, pos_ptr, rn, rh, N, KH):
    """Dense (BN, 2 * BH) weight tile from the 2:4 compressed form: vals / pos are (N, K/2), two kept
    values per group of 4 inputs and their positions 0..3 in the group (pruned slots hold value 0)."""
    inside = (rn[:, None] < N) & (rh[None, :] < KH)
    v = tl.load(vals_ptr + rn[:, None] * KH + rh[None, :], mask=inside, other=0.0).to(tl.float32)
    p = tl.load(pos_ptr + rn[:, None] * KH + rh[None, :], mask=inside, other=0).to(tl.int32)
    BN: tl.constexpr = v.shape[0]
    BH: tl.constexpr = v.shape[1]
    v3 = tl.reshape(v, (BN, BH // 2, 2))
    p3 = tl.reshape(p, (BN, BH // 2, 2))
    d0 = tl.sum(tl.where(p3 == 0, v3, 0.0), axis=2)
    d1 = tl.sum(tl.where(p3 == 1, v3, 0.0), axis=2)
    d2 = tl.sum(tl.where(p3 == 2, v3, 0.0), axis=2)
    d3 = tl.sum(tl.where(p3 == 3, v3, 0.0), axis=2)
    # join(join(d0, d2), join(d1, d3)) puts d_j at index j of each group of 4 after the reshape.
    dense = tl.join(tl.join(d0, d2), tl.join(d1, d3))
    return tl.reshape(dense, (BN, BH * 2))


@triton.jit
def _sparse24_mm_kernel(a_ptr, vals_ptr, pos_ptr, bias_ptr, out_ptr, M, N, K,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, HAS_BIAS: tl.constexpr,
                        IEEE: tl.constexpr):
    """out[M, N] = a[M, K] @ W^T with W in 2:4 compressed form: half the weight bytes are read."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        a = tl.load(a_ptr + rm[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        w = _expand_24(vals_ptr, pos_ptr, rn, k0 // 2 + tl.arange(0, BK // 2), N, K // 2).to(a.dtype)
        if IEEE:
            acc = tl.dot(a, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(w), acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm[:, None] * N + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _sparse24_mm_t_kernel(g_ptr, vals_ptr, pos_ptr, out_ptr, M, N, K,
                          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr):
    """out[M, K] = g[M, N] @ W with W in 2:4 compressed form (grad_x)."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rk = pid_k * BK + tl.arange(0, BK)
    acc = tl.zeros((BM, BK), dtype=tl.float32)
    for n0 in range(0, N, BN):
        rn = n0 + tl.arange(0, BN)
        g = tl.load(g_ptr + rm[:, None] * N + rn[None, :], mask=(rm[:, None] < M) & (rn[None, :] < N), other=0.0)
        w = _expand_24(vals_ptr, pos_ptr, rn, pid_k * (BK // 2) + tl.arange(0, BK // 2), N, K // 2).to(g.dtype)
        if IEEE:
            acc = tl.dot(g, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(g, w, acc)
    tl.store(out_ptr + rm[:, None] * K + rk[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rk[None, :] < K))


# Tiles: BM rows of the batch per program; the dense-with-mask path uses 64 x 64 x 64 tiles.
BM_BLOCK = 64
TILE = 64


def _block_mm_warps(block):
    # 64-wide blocks with 4 warps spilled registers in the sm_80/sm_90 compile check; 8 warps do not.
    return 8 if block == 64 else 4


MASKED_MM_WARPS = 8  # the 64 x 64 fp32 (IEEE) tile spilled 5.7 KB of stack with 4 warps


def _masked_mm_depth(fp32):
    # fp32 (IEEE dots) with a 64-deep K step still spilled ~400 B with 8 warps: step 32 deep instead.
    return 32 if fp32 else TILE


def _cdiv(a, b):
    return (a + b - 1) // b


def _block_mm(a, w, bias, ptr, idx, block, transpose_w):
    n, k = w.shape
    r, c = (k, n) if transpose_w else (n, k)
    s_wr, s_wc = (1, k) if transpose_w else (k, 1)
    m = a.shape[0]
    out = torch.empty((m, r), dtype=a.dtype, device=a.device)
    grid = (_cdiv(m, BM_BLOCK), _cdiv(r, block))
    _block_mm_kernel[grid](a, w, bias if bias is not None else out, out, ptr, idx, m, c, r, a.stride(0), s_wr, s_wc,
                           BLOCK=block, BM=BM_BLOCK, HAS_BIAS=bias is not None, IEEE=a.dtype == torch.float32,
                           num_warps=_block_mm_warps(block))
    return out


def _masked_mm(a, b, mask_u8, bias, out_shape, c, strides, out_masked):
    """One launch of _masked_mm_kernel: out[m, r] = sum over c of A'[m, c] B'[r, c] (masked);
    strides = (am, ac, br, bc, mr, mc). The reduction length c is passed, not guessed from the strides:
    with a single output row the transposed operand's strides look like a plain one's."""
    m, r = out_shape
    out = torch.empty(out_shape, dtype=b.dtype, device=b.device)
    grid = (_cdiv(m, TILE), _cdiv(r, TILE))
    _masked_mm_kernel[grid](a, b, mask_u8, bias if bias is not None else out, out, m, c, r, *strides,
                            BM=TILE, BR=TILE, BC=_masked_mm_depth(b.dtype == torch.float32), OUT_MASKED=out_masked,
                            HAS_BIAS=bias is not None,
                            IEEE=b.dtype == torch.float32, num_warps=MASKED_MM_WARPS)
    return out


def _compress_24(weight, mask):
    """(vals, pos) of a 2:4 mask: per group of 4 inputs the two kept values first (a group with fewer
    kept fills up with pruned slots holding 0) and their positions; shapes (N, K/2)."""
    n, k = weight.shape
    m4 = mask.reshape(n, k // 4, 4).to(torch.bool)
    pos = torch.sort((~m4).to(torch.int8), dim=-1, stable=True).indices[..., :2]
    vals = torch.gather(weight.reshape(n, k // 4, 4), -1, pos) * torch.gather(m4, -1, pos).to(weight.dtype)
    return vals.reshape(n, k // 2).contiguous(), pos.reshape(n, k // 2).to(torch.int8).contiguous()


def _uses_24(mask, weight):
    """A 2:4 mask (at most 2 kept of every 4 consecutive inputs) over in_features a multiple of 4."""
    n, k = weight.shape
    return k % 4 == 0 and bool((mask.reshape(n, k // 4, 4) != 0).sum(-1).le(2).all())


def _mask_u8(mask):
    """The mask as contiguous uint8 (what the dense-with-mask kernel loads)."""
    return (mask if mask.dtype == torch.bool else mask != 0).contiguous().view(torch.uint8)


def _block_coo(ptr, idx):
    """(block-row, block-column) of every kept block, in block-CSR order (one program per block)."""
    rows = torch.repeat_interleave(torch.arange(ptr.numel() - 1, device=ptr.device), ptr.diff())
    return rows.contiguous(), idx


def masked_linear(x, weight, mask, bias, block, rows_ptr, rows_idx):
    """The "triton" kernel of effops::masked_linear. block: the mask's block size (0: not block-constant);
    (rows_ptr, rows_idx): the block-CSR index of the kept blocks per block-row (read when block)."""
    n, k = weight.shape
    x2 = x.reshape(-1, k).contiguous()
    w = weight.contiguous()
    b = None if bias is None else bias.contiguous()
    if block:
        y = _block_mm(x2, w, b, rows_ptr, rows_idx, block, False)
    elif _uses_24(mask, w):
        vals, pos = _compress_24(w, mask)
        m = x2.shape[0]
        y = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
        _sparse24_mm_kernel[(_cdiv(m, TILE), _cdiv(n, TILE))](
            x2, vals, pos, b if b is not None else y, y, m, n, k, BM=TILE, BN=TILE,
            BK=_masked_mm_depth(x2.dtype == torch.float32),
            HAS_BIAS=b is not None, IEEE=x2.dtype == torch.float32, num_warps=MASKED_MM_WARPS)
    else:
        y = _masked_mm(x2, w, _mask_u8(mask), b, (x2.shape[0], n), k, (k, 1, k, 1, k, 1), False)
    return with_leading_dims(y, x)


def masked_linear_backward(grad_y, x, weight, mask, needs_input_grad, block, rows_ptr, rows_idx, cols_ptr, cols_idx):
    """The "triton" kernel of effops::masked_linear_backward: (grad_x, grad_weight, grad_bias), None where
    not needed. (cols_ptr, cols_idx): the block-CSR index per block-column (grad_x's product)."""
    need_x, need_w, need_b = needs_input_grad
    n, k = weight.shape
    g2 = grad_y.reshape(-1, n).contiguous()
    x2 = x.reshape(-1, k).contiguous()
    w = weight.contiguous()
    m = g2.shape[0]
    grad_x = grad_w = None
    if block:
        if need_x:
            grad_x = _block_mm(g2, w, None, cols_ptr, cols_idx, block, True).reshape(x.shape)
        if need_w:
            rows, cols = _block_coo(rows_ptr, rows_idx)
            grad_w = torch.zeros_like(w)
            if rows.numel():
                _block_grad_weight_kernel[(rows.numel(),)](g2, x2, grad_w, rows, cols, m, n, k, BLOCK=block,
                                                           BM=BM_BLOCK, IEEE=w.dtype == torch.float32)
    elif _uses_24(mask, w):
        if need_x:
            vals, pos = _compress_24(w, mask)
            grad_x = torch.empty((m, k), dtype=g2.dtype, device=g2.device)
            _sparse24_mm_t_kernel[(_cdiv(m, TILE), _cdiv(k, TILE))](
                g2, vals, pos, grad_x, m, n, k, BM=TILE, BN=_masked_mm_depth(g2.dtype == torch.float32), BK=TILE,
                IEEE=g2.dtype == torch.float32,
                num_warps=MASKED_MM_WARPS)
            grad_x = grad_x.reshape(x.shape)
        if need_w:  # (gy^T @ x) * mask through the dense-with-mask kernel
            grad_w = _masked_mm(g2, x2, _mask_u8(mask), None, (n, k), m, (1, n, 1, k, k, 1), True)
    else:
        mask_u8 = _mask_u8(mask)
        if need_x:  # grad_x[M, K] = gy[M, N] @ (W * mask): B'[r=k, c=n] = W[n, k]
            grad_x = _masked_mm(g2, w, mask_u8, None, (m, k), n, (n, 1, 1, k, 1, k), False).reshape(x.shape)
        if need_w:  # grad_w[N, K] = (gy^T @ x) * mask: A'[n, m] = gy[m, n], B'[k, m] = x[m, k]
            grad_w = _masked_mm(g2, x2, mask_u8, None, (n, k), m, (1, n, 1, k, k, 1), True)
    grad_b = g2.sum(0) if need_b else None
    return grad_x, grad_w, grad_b


def _specs():
    specs = []
    for dt in ("fp16", "bf16", "fp32"):
        p = "*" + dt
        for block in (16, 32, 64):
            specs.append(AotSpec(_block_mm_kernel, dict(
                a_ptr=p, w_ptr=p, bias_ptr=p, out_ptr=p, ptr_ptr="*i64", idx_ptr="*i64", M="i32", C="i32",
                R="i32", stride_am="i32", stride_wr="i32", stride_wc="i32", BLOCK="constexpr", BM="constexpr",
                HAS_BIAS="constexpr", IEEE="constexpr"),
                dict(BLOCK=block, BM=BM_BLOCK, HAS_BIAS=True, IEEE=dt == "fp32"), num_warps=_block_mm_warps(block)))
            specs.append(AotSpec(_block_grad_weight_kernel, dict(
                gy_ptr=p, x_ptr=p, gw_ptr=p, rows_ptr="*i64", cols_ptr="*i64", M="i32", N="i32", K="i32",
                BLOCK="constexpr", BM="constexpr", IEEE="constexpr"),
                dict(BLOCK=block, BM=BM_BLOCK, IEEE=dt == "fp32")))
        for out_masked in (False, True):
            specs.append(AotSpec(_masked_mm_kernel, dict(
                a_ptr=p, b_ptr=p, mask_ptr="*u8", bias_ptr=p, out_ptr=p, M="i32", C="i32", R="i32",
                stride_am="i32", stride_ac="i32", stride_br="i32", stride_bc="i32", stride_mr="i32",
                stride_mc="i32", BM="constexpr", BR="constexpr", BC="constexpr", OUT_MASKED="constexpr",
                HAS_BIAS="constexpr", IEEE="constexpr"),
                dict(BM=TILE, BR=TILE, BC=_masked_mm_depth(dt == "fp32"), OUT_MASKED=out_masked, HAS_BIAS=not out_masked,
                     IEEE=dt == "fp32"), num_warps=MASKED_MM_WARPS))
        specs.append(AotSpec(_sparse24_mm_kernel, dict(
            a_ptr=p, vals_ptr=p, pos_ptr="*i8", bias_ptr=p, out_ptr=p, M="i32", N="i32", K="i32",
            BM="constexpr", BN="constexpr", BK="constexpr", HAS_BIAS="constexpr", IEEE="constexpr"),
            dict(BM=TILE, BN=TILE, BK=_masked_mm_depth(dt == "fp32"), HAS_BIAS=True, IEEE=dt == "fp32"),
            num_warps=MASKED_MM_WARPS))
        specs.append(AotSpec(_sparse24_mm_t_kernel, dict(
            g_ptr=p, vals_ptr=p, pos_ptr="*i8", out_ptr=p, M="i32", N="i32", K="i32",
            BM="constexpr", BN="constexpr", BK="constexpr", IEEE="constexpr"),
            dict(BM=TILE, BN=_masked_mm_depth(dt == "fp32"), BK=TILE, IEEE=dt == "fp32"), num_warps=MASKED_MM_WARPS))
    return specs


AOT_SPECS = _specs()
