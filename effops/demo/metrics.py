"""What the closing table counts: nonzero parameters, checkpoint bytes, and which backend ran each op."""
import collections
import io

import torch

# Tensors that describe a layer but are not its learned weights (`packed`: InvertedResidual's weights in
# its kernel's order, derived from the convs' weights).
_NOT_WEIGHTS = ("mask", "scale", "running_mean", "running_var", "num_batches_tracked", "packed")


def _module_weights(module):
    """The learned tensors a module itself holds (not its children's), as they act in the forward:
    a masked weight times its mask (effops SparseLinear, and SparseConv1x1 whose (out, in) mask
    covers a 4-D weight), torch.nn.utils.prune's `weight` rather than `weight_orig`, the int8 values
    of a quantized layer."""
    if hasattr(module, "_packed_params") and callable(getattr(module, "weight", None)):
        # torch.ao dynamic quantized Linear: weights live packed, exposed through methods.
        w, b = module.weight(), module.bias()
        yield w.int_repr() if w.is_quantized else w
        if b is not None:
            yield b
        return
    tensors = dict(module.named_parameters(recurse=False))
    tensors.update((n, b) for n, b in module.named_buffers(recurse=False) if b is not None)
    if "weight" not in tensors and isinstance(getattr(module, "weight", None), torch.Tensor):
        # The weight as the forward uses it, exposed as an attribute: effops Int8Linear's unpacked int8
        # weight, torch.nn.utils.prune's weight_orig * weight_mask.
        tensors = {n: t for n, t in tensors.items() if not n.startswith("weight")}
        tensors["weight"] = module.weight
    mask = tensors.get("mask")
    for name, t in tensors.items():
        if any(name.endswith(s) for s in _NOT_WEIGHTS) or not (t.is_floating_point() or t.dtype == torch.int8):
            continue
        if name == "weight" and mask is not None:
            t = t * mask.reshape(t.shape[0], -1).reshape(t.shape[:2] + (1,) * (t.dim() - 2)).to(t.dtype)
        yield t


def count_params(model):
    """(nonzero, total) learned values over the whole model, counted as they act in the forward."""
    nonzero = total = 0
    for module in model.modules():
        for t in _module_weights(module):
            nonzero += int(torch.count_nonzero(t.detach()))
            total += t.numel()
    return nonzero, total


def checkpoint_bytes(model):
    """Size of torch.save(model.state_dict()): what a checkpoint of this model takes on disk."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def record_backends():
    """Count, per effops op, which backend the registry chose while the block runs: a context manager
    yielding {op: {backend: calls}} (effops._backends.record_choices)."""
    from effops import _backends
    return _backends.record_choices()


def summarize_backends(seen):
    """{op: "cpu" or "cpu 120, reference 3"} from record_backends' counts."""
    return {op: ", ".join(name if len(c) == 1 else "%s %d" % (name, n)
                          for name, n in collections.Counter(c).most_common())
            for op, c in sorted(seen.items())}
