"""Model-level workflows: each walks a model and swaps modules for effops ones."""
from effops._lazy import lazy_getattr

__all__ = ["fuse_separable", "prune", "GradualPruner", "quantize"]
__getattr__ = lazy_getattr(__name__, {
    "fuse_separable": "effops.transforms.fuse_separable:fuse_separable",
    "prune": "effops.transforms.prune:prune",
    "GradualPruner": "effops.transforms.prune:GradualPruner",
    "quantize": "effops.transforms.quantize:quantize",
})
