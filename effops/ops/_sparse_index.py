"""What a mask looks like, and the compressed indices the sparse kernels walk: built once per mask change.

`mask_info(mask)` validates a mask (only 0 and 1) and describes it: density, the largest block size b in
(64, 32, 16) over which it is constant (partial blocks at the edges included), whether it is 2:4 along
the input dimension. Its lazily built indices:

* `block_rows(b)`: block-CSR of the kept b x b blocks per block-row of the weight (forward product);
* `block_cols(b)`: the same per block-column, i.e. of the transposed weight (grad_x product);
* `csr()` / `csc()`: kept (row, column) lists per weight row / per weight column (unstructured path).

The cache is keyed on the mask tensor itself: its identity (a weak reference, so a new tensor that
happens to reuse a freed one's memory is never mistaken for it), data pointer, version counter (bumped
by every in-place write, e.g. `mask.copy_(new)`), shape, strides and dtype. After a version bump the
mask is compared with the cached copy, so rewriting the same values (DDP's buffer broadcast each step)
costs one comparison, not a rebuild. Inference tensors have no version counter: their descriptions are
rebuilt on every call.
"""
import weakref

import torch
import torch.nn.functional as F

from effops._backends import shared_cpu

BLOCK_SIZES = (64, 32, 16)
PATTERNS = ("unstructured", "block", "2:4")

_cache = {}  # id(mask) -> (weakref to mask, key, MaskInfo)
stats = {"builds": 0}  # how many descriptions were built (tests check the cache through it)


class MaskInfo:
    """Facts about one mask version and its compressed indices (int64, on the mask's device)."""

    def __init__(self, mask):
        m = mask if mask.dtype == torch.bool else mask != 0
        # A private copy: mask_info compares it with the mask after a version bump (see there).
        self.bool_mask = m.clone(memory_format=torch.contiguous_format) if m is mask else m.contiguous()
        self.shape = tuple(m.shape)
        self.nnz = int(m.sum())
        self.numel = m.numel()
        self.density = self.nnz / self.numel if self.numel else 1.0
        self.block = next((b for b in BLOCK_SIZES if _block_constant(self.bool_mask, b)), 0)
        self.is_2_4 = _is_n_m(self.bool_mask, 2, 4)
        self._built = {}
        self.packs = {}  # backend-owned weight packs for this mask (see ops/masked_linear.py)

    def _memo(self, key, build):
        if key not in self._built:
            self._built[key] = build()
        return self._built[key]

    def block_mask(self, b):
        """[ceil(N/b), ceil(K/b)] bool: which blocks are kept (valid for a block-constant mask)."""
        return self._memo(("blocks", b), lambda: _block_counts(self.bool_mask, b) > 0)

    def block_rows(self, b):
        return self._memo(("rows", b), lambda: _csr(self.block_mask(b)))

    def block_cols(self, b):
        return self._memo(("cols", b), lambda: _csr(self.block_mask(b).t()))

    def block_coo(self, b):
        """(block-row, block-column) of every kept block, in block_rows order (for per-block programs)."""
        return self._memo(("coo", b), lambda: tuple(t.contiguous() for t in self.block_mask(b).nonzero(as_tuple=True)))

    def csr_to_csc(self):
        """Permutation taking values in csr() order to csc() order (cheaper than indexing W^T)."""
        def build():
            rows, cols = self.bool_mask.nonzero(as_tuple=True)
            return torch.argsort(cols * self.shape[0] + rows)
        return self._memo("csr_to_csc", build)

    def mask_u8(self):
        """The mask as a contiguous uint8 tensor (what the dense-with-mask Triton kernel loads)."""
        return self._memo("u8", lambda: self.bool_mask.to(torch.uint8))

    def csr(self):
        return self._memo("csr", lambda: _csr(self.bool_mask))

    def csc(self):
        return self._memo("csc", lambda: _csr(self.bool_mask.t()))

    def probe_positions(self):
        """Row-major flat indices of one kept entry in every row and one in every column that keeps any
        (at most N + K; for Tensor.take, which reads any strides; see cached_weight_form): an update
        that changes all kept weights of some row or some column (an optimizer step changes nearly all;
        a sparse-input gradient whole columns) changes a probed one; one that changes only a few
        scattered weights may not."""
        def build():
            m = self.bool_mask
            if m.numel() == 0:
                return torch.zeros(0, dtype=torch.long, device=m.device)
            n, k = m.shape
            first_col = m.to(torch.uint8).argmax(dim=1)  # first kept column of each row (0 if none)
            first_row = m.to(torch.uint8).argmax(dim=0)
            rows = torch.arange(n, device=m.device)[m.any(dim=1)]
            cols = torch.arange(k, device=m.device)[m.any(dim=0)]
            flat = torch.cat([rows * k + first_col[rows], first_row[cols] * k + cols])
            return torch.unique(flat)
        return self._memo("probes", build)

    def matches(self, pattern, block_size=None):
        """None when the mask fits `pattern` (and block_size), else why not."""
        if pattern == "block":
            b = block_size or 32
            if not _block_constant(self.bool_mask, b):
                return "it is not constant over %d x %d blocks" % (b, b)
        elif pattern == "2:4" and not self.is_2_4:
            return "some group of 4 consecutive inputs keeps more than 2 weights"
        return None


def _block_counts(m, b):
    """Kept entries per b x b block, edge blocks partial."""
    n, k = m.shape
    nb, kb = -(-n // b), -(-k // b)
    padded = F.pad(m.to(torch.int32), (0, kb * b - k, 0, nb * b - n))
    return padded.view(nb, b, kb, b).sum(dim=(1, 3))


def _block_constant(m, b):
    n, k = m.shape
    if n == 0 or k == 0:
        return True
    counts = _block_counts(m, b)
    rows = torch.full((counts.shape[0],), b, dtype=torch.int32, device=m.device)
    cols = torch.full((counts.shape[1],), b, dtype=torch.int32, device=m.device)
    rows[-1] = n - (counts.shape[0] - 1) * b
    cols[-1] = k - (counts.shape[1] - 1) * b
    full = rows[:, None] * cols[None, :]
    return bool(((counts == 0) | (counts == full)).all())


def _is_n_m(m, n_keep, group):
    n, k = m.shape
    if m.numel() == 0:
        return True  # nothing kept breaks the pattern (and view(0, -1, group) cannot infer its -1)
    padded = F.pad(m.to(torch.int32), (0, -k % group))
    return bool((padded.view(n, -1, group).sum(-1) <= n_keep).all())


def _csr(m):
    """(ptr [rows + 1], idx [nnz]) of a 2-D bool matrix, column indices ascending within a row."""
    rows, cols = m.nonzero(as_tuple=True)
    counts = torch.bincount(rows, minlength=m.shape[0])
    ptr = torch.zeros(m.shape[0] + 1, dtype=torch.int64, device=m.device)
    torch.cumsum(counts, 0, out=ptr[1:])
    return ptr, cols.contiguous()


def check_binary(mask):
    """ValueError unless a non-bool mask holds only 0 and 1."""
    if mask.dtype != torch.bool and mask.numel() and not bool(((mask == 0) | (mask == 1)).all()):
        bad = mask[(mask != 0) & (mask != 1)].flatten()[0].item()
        raise ValueError("mask must hold only 0 and 1 (or be bool), found %r" % bad)


def _key(mask):
    return (mask.data_ptr(), mask._version, tuple(mask.shape), mask.stride(), mask.dtype, mask.device)


def mask_info(mask):
    """The cached MaskInfo of `mask`, rebuilt when the mask changed (ValueError for non-binary masks)."""
    if mask.is_inference():
        check_binary(mask)
        stats["builds"] += 1
        return MaskInfo(mask)
    key = _key(mask)
    entry = _cache.get(id(mask))
    if entry is not None and entry[0]() is mask:
        if entry[1] == key and not shared_cpu(mask):  # (a shared mask is compared by value below)
            return entry[2]
        # Written in place with the same values (DDP broadcasting buffers every step, set_mask with
        # an equal mask): one comparison pass instead of rebuilding indices and weight packs.
        if entry[1][2:] == key[2:] and torch.equal(entry[2].bool_mask, mask if mask.dtype == torch.bool else mask != 0):
            _cache[id(mask)] = (entry[0], key, entry[2])
            return entry[2]
    check_binary(mask)
    info = MaskInfo(mask)
    stats["builds"] += 1
    if not torch.__future__.get_swap_module_params_on_conversion():
        _cache[id(mask)] = (weakref.ref(mask, _forget(id(mask))), key, info)
    else:  # a weak reference would make torch.utils.swap_tensors refuse the mask: held strongly, a few
        _cache[id(mask)] = (_Strong(mask), key, info)
        _strong.append(id(mask))
        while len(_strong) > MAX_STRONG:
            old = _cache.get(_strong[0])
            if old is not None and isinstance(old[0], _Strong):
                _cache.pop(_strong[0], None)
            _strong.pop(0)
    return info


class _Strong:
    """A strong reference called as a weak one is (the entry's mask under
    torch.__future__.set_swap_module_params_on_conversion(True))."""

    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __call__(self):
        return self.obj


MAX_STRONG = 64  # masks held strongly at most (the oldest entries go first)
_strong = []


def forget_mask(mask):
    """Drop mask's cache entry (and with it the weak reference to mask)."""
    entry = _cache.get(id(mask))
    if entry is not None and entry[0]() is mask:
        _cache.pop(id(mask), None)


def _forget(ident):
    """Weak-reference callback dropping a dead mask's entry (not a newer one under the same id)."""
    def callback(ref, cache=_cache):
        entry = cache.get(ident) if cache is not None else None
        if entry is not None and entry[0] is ref:
            del cache[ident]
    return callback



def linear_operands(x, weight, bias):
    """What every masked_linear kernel takes: x as a contiguous (tokens, in_features) matrix and the
    weight and bias contiguous (leading batch dims are restored by the caller)."""
    return (x.reshape(-1, weight.shape[1]).contiguous(), weight.contiguous(),
            None if bias is None else bias.contiguous())


# ---------------------------------------------------------------------------------------------
# Forms derived from a weight (W * mask, packed panels, CSR values), cached on the mask's description
# ---------------------------------------------------------------------------------------------
def _distributed():
    return torch.distributed.is_available() and torch.distributed.is_initialized()


MIN_PROBED_NUMEL = 1 << 16  # in a distributed run, smaller weights rebuild per call (cheaper than a probe)


def cached_weight_form(info, w, tag, build):
    """build() (a form derived from weight w and this mask), kept in info.packs[tag] and reused while w
    is unchanged. One entry per tag, so the extra memory is at most one form per mask.

    Unchanged means the same memory, version counter and metadata. In a distributed run, also the same
    values at one kept weight of every row and every column (probe_positions): FSDP2 refills a layer's
    unsharded parameters at each all-gather under torch.autograd._unsafe_preserve_version_counter,
    often at the same address, which the version counter cannot see (stale weights in training and
    eval before this check). There, on CPU the probe gathers N + K weights a reuse (10-100 us on large
    layers, far less than a rebuild; weights under MIN_PROBED_NUMEL elements rebuild instead); on other
    devices the form is rebuilt every call (DDP runs too), since comparing values would stall the
    device at every layer. Weights in shared CPU memory (share_memory_(): Hogwild training, evaluation
    in worker processes) are written by other processes behind this one's counter: rebuilt every call.
    Outside these nothing rewrites parameters behind their version counter but writes through `.data`,
    which are not seen (documented: write weights under torch.no_grad()). Inference tensors (no version
    counter) rebuild per call.
    An entry built under inference_mode holds inference tensors, which autograd cannot save: it serves
    inference-mode calls only (a frozen weight under a trainable input after an eval pass)."""
    if w.is_inference() or shared_cpu(w):
        return build()
    probed = _distributed()
    if probed and (w.device.type != "cpu" or w.numel() < MIN_PROBED_NUMEL):
        return build()
    inference = torch.is_inference_mode_enabled()
    # The entry holds the tensor itself: its memory cannot be freed and reused by another tensor with the
    # same address and version while the entry exists. Views and detach() share memory and counter.
    key = (w.data_ptr(), w._version, w.dtype, tuple(w.shape), w.stride(), w.device)
    cached = info.packs.get(tag)
    if cached is not None and cached[1] == key and (inference or not cached[3]):
        if not probed or (cached[4] is not None and torch.equal(cached[4], _probe(info, w))):
            return cached[2]  # (the probes are compared as bits: a NaN weight matches itself)
    value = build()
    info.packs[tag] = (w, key, value, inference, _probe(info, w) if probed else None)
    return value


_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _probe(info, w):
    values = (w.detach() if w.requires_grad else w).take(info.probe_positions())
    return values.view(_BITS[values.element_size()]) if values.is_floating_point() else values
