"""SparseMultiheadAttention: nn.MultiheadAttention with its projections as SparseLinear layers.

nn.MultiheadAttention reads `in_proj_weight` and `out_proj.weight` itself (F.multi_head_attention_forward),
so a mask on them is never enforced and no sparse kernel runs. This module is a drop-in for the common
case, self- or cross-attention with equal query / key / value widths (ViT, BERT,
nn.TransformerEncoderLayer): the in-projection is one SparseLinear of shape (3 E, E), the rows of q, k
and v stacked as in `in_proj_weight`, the out-projection another, both through effops.ops.masked_linear
(masks enforced, pruned weights skipped); attention runs through F.scaled_dot_product_attention, or
explicitly when `need_weights=True` asks for the weights.

Why one packed in-projection rather than three layers: `from_mha` keeps the attention's Parameter objects
(`in_proj_weight` becomes `in_proj.weight`), so an optimizer built before pruning keeps training them,
as for every layer `effops.prune` swaps; and self-attention (query is key is value) runs one product.
Cross-attention projects with row slices of the same weight and mask (the op then reads the slice's mask
on each call instead of the layer's prebuilt index).

Not taken (from_mha raises): kdim / vdim other than embed_dim, add_bias_kv, add_zero_attn.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from effops.nn.sparse_linear import SparseLinear
from effops.ops import masked_linear


class SparseMultiheadAttention(nn.Module):
    """forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
    average_attn_weights=True, is_causal=False) -> (output, weights or None), as nn.MultiheadAttention.

    in_proj: SparseLinear (or nn.Linear where left dense) of shape (3 * embed_dim, embed_dim): rows
    [0, E) project the query, [E, 2E) the key, [2E, 3E) the value. out_proj: SparseLinear or nn.Linear.
    `in_proj_weight` / `in_proj_bias` are read-only aliases of in_proj's parameters (what
    nn.TransformerEncoderLayer's native fast path reads; pruned weights are zero in them, so that path,
    where taken, computes the same values densely; effops.prune turns it off).
    """

    _qkv_same_embed_dim = True  # read by nn.TransformerEncoderLayer / nn.TransformerEncoder
    bias_k = bias_v = None
    add_zero_attn = False
    merge_masks = nn.MultiheadAttention.merge_masks  # nn.TransformerEncoderLayer's fast path calls it

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, batch_first=False, *, pattern=None,
                 block_size=None, device=None, dtype=None):
        super().__init__()
        _check_config(embed_dim, num_heads, dropout)
        self.embed_dim, self.kdim, self.vdim = embed_dim, embed_dim, embed_dim
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.dropout, self.batch_first = float(dropout), bool(batch_first)
        kw = dict(bias=bias, pattern=pattern, block_size=block_size, device=device, dtype=dtype)
        self.in_proj = SparseLinear(embed_dim, 3 * embed_dim, **kw)
        self.out_proj = SparseLinear(embed_dim, embed_dim, **kw)
        with torch.no_grad():  # nn.MultiheadAttention's initialization
            nn.init.xavier_uniform_(self.in_proj.weight)
            if bias:
                self.in_proj.bias.zero_()
                self.out_proj.bias.zero_()
        self.in_proj.apply_mask_()

    @classmethod
    def from_mha(cls, mha, masks, *, pattern=None, block_size=None):
        """A SparseMultiheadAttention sharing `mha`'s Parameter objects (an optimizer built before keeps
        working); pruned weights are zeroed in place.

        masks: (in_mask, out_mask), in_mask of in_proj_weight's shape (3E, E), out_mask of (E, E); None
        leaves that projection dense. Or a sparsity in [0, 1]: magnitude masks as effops.prune makes them
        (with pattern / block_size).
        """
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError("mha must be an nn.MultiheadAttention, got %s" % type(mha).__name__)
        why = unsupported_reason(mha)
        if why:
            raise ValueError("SparseMultiheadAttention does not take this nn.MultiheadAttention: %s" % why)
        if isinstance(masks, (int, float)) and not isinstance(masks, bool):
            from effops.transforms.prune import prune  # the scores live there (prune imports this module)
            holder = nn.ModuleDict({"attn": mha})
            prune(holder, masks, pattern=pattern or "unstructured", block_size=block_size or 32)
            if not isinstance(holder["attn"], cls):
                raise ValueError("effops.prune left this nn.MultiheadAttention dense (a subclass?)")
            return holder["attn"]
        if not isinstance(masks, (tuple, list)) or len(masks) != 2:
            raise TypeError("masks must be a sparsity or a pair (in_mask, out_mask), got %r" % (masks,))
        in_mask, out_mask = masks
        in_proj = nn.Linear(mha.embed_dim, 3 * mha.embed_dim, bias=False, device="meta")
        in_proj.weight, in_proj.bias = mha.in_proj_weight, mha.in_proj_bias
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.embed_dim, module.kdim, module.vdim = mha.embed_dim, mha.embed_dim, mha.embed_dim
        module.num_heads, module.head_dim = mha.num_heads, mha.head_dim
        module.dropout, module.batch_first = float(mha.dropout), bool(mha.batch_first)
        hint = dict(pattern=pattern, block_size=block_size)
        module.in_proj = in_proj if in_mask is None else SparseLinear.from_linear(in_proj, in_mask, **hint)
        module.out_proj = mha.out_proj if out_mask is None else SparseLinear.from_linear(mha.out_proj, out_mask, **hint)
        module.train(mha.training)
        return module

    @property
    def in_proj_weight(self):
        return self.in_proj.weight

    @property
    def in_proj_bias(self):
        return self.in_proj.bias

    def extra_repr(self):
        return "embed_dim=%d, num_heads=%d, dropout=%g, batch_first=%s" % (
            self.embed_dim, self.num_heads, self.dropout, self.batch_first)

    def _project(self, x, part, parts=1):
        """x through rows [part E, (part + parts) E) of the in-projection."""
        if parts == 3:
            return self.in_proj(x)
        rows = slice(part * self.embed_dim, (part + parts) * self.embed_dim)
        lin = self.in_proj
        bias = None if lin.bias is None else lin.bias[rows]
        if isinstance(lin, SparseLinear):
            return masked_linear(x, lin.weight[rows], lin.mask[rows], bias)
        return F.linear(x, lin.weight[rows], bias)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        batched = _check_inputs(self, query, key, value)
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # (L, N, E) -> (N, L, E) views; the products take any strides
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        n, tgt, src = query.shape[0], query.shape[1], key.shape[1]
        heads, hd = self.num_heads, self.head_dim

        # (N, L, k * E) -> k tensors of (N, H, L, D)
        def split(t, k):
            return t.unflatten(-1, (k, heads, hd)).permute(2, 0, 3, 1, 4).unbind(0)
        if query is key and key is value:
            q, k, v = split(self._project(query, 0, 3), 3)
        elif key is value:
            (q,), (k, v) = split(self._project(query, 0), 1), split(self._project(key, 1, 2), 2)
        else:
            (q,), (k,), (v,) = (split(self._project(t, i), 1) for i, t in enumerate((query, key, value)))

        mask, is_causal = _attention_mask(key_padding_mask, attn_mask, is_causal, need_weights,
                                          n, heads, tgt, src, query.dtype)
        dropout_p = self.dropout if self.training else 0.0
        # A query whose every key is masked attends to nothing: zero weights and a zero attention output
        # (the output is out_proj's bias), on both paths below. Torch gives NaN through explicit weights and
        # zero through SDPA's fused kernels; effops defines one answer.
        empty = None if mask is None else torch.isneginf(mask).all(dim=-1, keepdim=True)
        weights = None
        if need_weights:  # as F.multi_head_attention_forward computes them
            scores = torch.matmul(q * (1.0 / math.sqrt(hd)), k.transpose(-2, -1))
            weights = torch.softmax(scores if mask is None else scores + mask, dim=-1)
            if empty is not None:
                weights = weights.masked_fill(empty, 0.0)
            attn = torch.matmul(F.dropout(weights, p=dropout_p) if dropout_p > 0.0 else weights, v)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                weights = weights.squeeze(0)
        else:
            attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal)
            if empty is not None:
                attn = attn.masked_fill(empty, 0.0)
        # (N, H, L, D) -> (N, L, E) or (L, N, E)
        attn = attn.permute(0, 2, 1, 3) if self.batch_first or not batched else attn.permute(2, 0, 1, 3)
        out = self.out_proj(attn.reshape(*attn.shape[:2], self.embed_dim))
        return (out if batched else out.squeeze(0)), weights


def unsupported_reason(mha):
    """None if SparseMultiheadAttention takes this nn.MultiheadAttention, else why not."""
    if not mha._qkv_same_embed_dim:
        return "kdim / vdim differ from embed_dim (separate q / k / v weights)"
    if mha.bias_k is not None:
        return "add_bias_kv=True"
    if mha.add_zero_attn:
        return "add_zero_attn=True"
    return None


def _check_config(embed_dim, num_heads, dropout):
    for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError("%s must be a positive int, got %r" % (name, value))
    if embed_dim % num_heads:
        raise ValueError("embed_dim (%d) must be divisible by num_heads (%d)" % (embed_dim, num_heads))
    if not 0.0 <= dropout <= 1.0:
        raise ValueError("dropout must be in [0, 1], got %r" % (dropout,))


def _check_inputs(module, query, key, value):
    """True for batched (3-D) inputs, False for unbatched (2-D); ValueError/TypeError otherwise."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError("%s must be a torch.Tensor, got %s" % (name, type(t).__name__))
        if t.is_nested:
            raise ValueError("%s is a nested tensor: SparseMultiheadAttention takes padded tensors with "
                             "key_padding_mask (set nn.TransformerEncoder.use_nested_tensor = False)" % name)
    if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
        raise ValueError("query, key and value must all be 3-D (batched) or 2-D (unbatched), got shapes %s, %s, %s"
                         % (tuple(query.shape), tuple(key.shape), tuple(value.shape)))
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.shape[-1] != module.embed_dim:
            raise ValueError("%s's last dim must be embed_dim=%d, got shape %s" % (name, module.embed_dim, tuple(t.shape)))
    if key.shape != value.shape:
        raise ValueError("key and value must have the same shape, got %s and %s" % (tuple(key.shape), tuple(value.shape)))
    batch = 0 if module.batch_first else 1
    if query.dim() == 3 and query.shape[batch] != key.shape[batch]:
        raise ValueError("query and key must have the same batch size, got shapes %s and %s"
                         % (tuple(query.shape), tuple(key.shape)))
    return query.dim() == 3


def _float_mask(mask, name, dtype):
    """A bool mask (True: not attended) as -inf / 0 in `dtype`; a float mask as is (added to the scores)."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError("%s must be a torch.Tensor, got %s" % (name, type(mask).__name__))
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))
    if not mask.is_floating_point():
        raise TypeError("%s must be bool or floating point, got %s" % (name, mask.dtype))
    return mask


def _attention_mask(key_padding_mask, attn_mask, is_causal, need_weights, n, heads, tgt, src, dtype):
    """(mask to add to the (N, H, L, S) scores or None, is_causal for SDPA), as nn.MultiheadAttention
    combines them: is_causal is a hint that attn_mask is causal, taken as such only where no padding mask
    and no weights are asked for."""
    if is_causal and attn_mask is None:
        raise ValueError("is_causal=True needs attn_mask (the causal mask), as nn.MultiheadAttention does")
    if is_causal and key_padding_mask is None and not need_weights:
        return None, True
    mask = None
    if attn_mask is not None:
        attn_mask = _float_mask(attn_mask, "attn_mask", dtype)
        if attn_mask.dim() == 2 and attn_mask.shape == (tgt, src):
            mask = attn_mask.view(1, 1, tgt, src)
        elif attn_mask.dim() == 3 and attn_mask.shape == (n * heads, tgt, src):
            mask = attn_mask.view(n, heads, tgt, src)
        else:
            raise ValueError("attn_mask must have shape %s or %s, got %s"
                             % ((tgt, src), (n * heads, tgt, src), tuple(attn_mask.shape)))
    if key_padding_mask is not None:
        kpm = _float_mask(key_padding_mask, "key_padding_mask", dtype)
        if kpm.shape != (n, src):
            raise ValueError("key_padding_mask must have shape %s, got %s" % ((n, src), tuple(kpm.shape)))
        kpm = kpm.view(n, 1, 1, src)
        mask = kpm if mask is None else mask + kpm
    return mask, False
