"""The argument checks only Python can make (each failure names the argument and what was expected);
the ops check tensors in C++."""
import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def tensor(name, value, *, ndim=None, min_ndim=None, dtypes=None, device=None):
    """Check that `value` is a tensor with the given rank, dtype and device; returns it."""
    if not isinstance(value, torch.Tensor):
        raise TypeError("%s must be a torch.Tensor, got %s" % (name, type(value).__name__))
    if ndim is not None and value.dim() != ndim:
        raise ValueError("%s must be %d-D, got shape %s" % (name, ndim, tuple(value.shape)))
    if min_ndim is not None and value.dim() < min_ndim:
        raise ValueError("%s must have at least %d dims, got shape %s" % (name, min_ndim, tuple(value.shape)))
    if dtypes is not None and value.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError("%s must have dtype in (%s), got %s" % (name, names, str(value.dtype).replace("torch.", "")))
    if device is not None and value.device != device:
        raise ValueError("%s must be on %s like the input, got %s" % (name, device, value.device))
    return value


def int_pair(name, value, *, minimum):
    """An int or a pair of ints, each >= minimum; returns a list of two ints."""
    items = [value, value] if isinstance(value, int) else list(value) if isinstance(value, (tuple, list)) else None
    if items is None or len(items) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        raise TypeError("%s must be an int or a pair of ints, got %r" % (name, value))
    if any(v < minimum for v in items):
        raise ValueError("%s must be >= %d, got %r" % (name, minimum, value))
    return items


def choice(name, value, allowed):
    if value not in allowed:
        raise ValueError("%s must be one of %s, got %r" % (name, allowed, value))
    return value
