"""Drop-in replacements for torch.optim.Adam / AdamW with a fused one-pass step, their 8-bit-state
variants, and what an optimizer's state costs in memory."""
from effops._lazy import lazy_getattr

__all__ = ["Adam", "AdamW", "Adam8bit", "AdamW8bit", "state_bytes", "state_bytes_per_param"]
__getattr__ = lazy_getattr(__name__, {
    "Adam": "effops.optim.adam:Adam",
    "AdamW": "effops.optim.adam:AdamW",
    "Adam8bit": "effops.optim.adam8bit:Adam8bit",
    "AdamW8bit": "effops.optim.adam8bit:AdamW8bit",
    "state_bytes": "effops.optim.memory:state_bytes",
    "state_bytes_per_param": "effops.optim.memory:state_bytes_per_param",
})
