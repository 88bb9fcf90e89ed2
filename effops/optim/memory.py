"""How many bytes an optimizer keeps per parameter: the figure that decides whether a model fits.

Counted from the tensors the optimizer actually holds (``optimizer.state``: moments, 8-bit codes and
their scales, master copies, step counts), not from a formula, so it works for any
``torch.optim.Optimizer`` (torch's own included) and shows what a setting really costs.
"""
import torch


def _tensors(value):
    if isinstance(value, torch.Tensor):
        if hasattr(type(value), "__tensor_flatten__"):
            # A wrapper subclass (torchao's 8-bit states, DTensor: this process's shard) holds no
            # storage of its own: count the plain tensors inside it.
            names, _ = value.__tensor_flatten__()
            for name in names:
                yield from _tensors(getattr(value, name))
        else:
            yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def state_bytes(optimizer):
    """Bytes of every tensor in optimizer.state, each storage counted once (views of one buffer share it)."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError("optimizer must be a torch.optim.Optimizer, got %s" % type(optimizer).__name__)
    seen, total = set(), 0
    for param_state in optimizer.state.values():
        for t in _tensors(param_state):
            storage = t.untyped_storage()
            key = (storage.data_ptr(), t.device)
            if key in seen:
                continue
            seen.add(key)
            total += storage.nbytes()
    return total


def state_bytes_per_param(optimizer):
    """state_bytes(optimizer) divided by the number of elements of the optimizer's params (all groups);
    0.0 for an optimizer with no param elements. Before the first step most optimizers hold no state
    yet: call it after a step. torch.optim.AdamW on fp32 params: 8 (two fp32 moments) plus a few bytes
    per tensor for the step counts."""
    numel = sum(p.numel() for group in optimizer.param_groups for p in group["params"])
    total = state_bytes(optimizer)
    return total / numel if numel else 0.0
