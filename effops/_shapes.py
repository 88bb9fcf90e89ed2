"""Shape helpers shared by the op layer and the kernel launchers (triton_kernels/), which import nothing
from the op layer: plain PyTorch only."""
import torch


def with_leading_dims(y, x):
    """A kernel's (tokens, features) output y as (*x.shape[:-1], features), as F.linear returns it: not
    a view of y (y itself for 2-D x; else an _unsafe_view, as torch's matmul does), since a module
    output that is a view breaks in-place use under FSDP2 (its pre-backward hook is dropped)."""
    if x.dim() == 2:
        return y
    return torch.ops.aten._unsafe_view(y, (*x.shape[:-1], y.shape[-1]))
