"""Drop-in replacements for torch.optim.Adam / AdamW with a fused one-pass step."""
from effops._lazy import lazy_getattr

__all__ = ["Adam", "AdamW"]
__getattr__ = lazy_getattr(__name__, {
    "Adam": "effops.optim.adam:Adam",
    "AdamW": "effops.optim.adam:AdamW",
})
