"""Drop-in replacements for torch.optim.Adam / AdamW with a fused one-pass step."""
from effops._lazy import lazy_getattr

__all__ = ["Adam", "AdamW", "state_bytes", "state_bytes_per_param"]
__getattr__ = lazy_getattr(__name__, {
    "Adam": "effops.optim.adam:Adam",
    "AdamW": "effops.optim.adam:AdamW",
    "state_bytes": "effops.optim.memory:state_bytes",
    "state_bytes_per_param": "effops.optim.memory:state_bytes_per_param",
})
