"""Model-level workflows: each walks a model and swaps modules for effops ones.

Imported eagerly for the same reason as effops.ops: each function shares its module's name.
"""
from effops.transforms.fuse import fuse
from effops.transforms.fuse_inverted_residual import fuse_inverted_residual
from effops.transforms.fuse_separable import fuse_separable
from effops.transforms.prune import GradualPruner, prune
from effops.transforms._report import TransformReport
from effops.transforms.quantize import quantize

__all__ = ["fuse", "fuse_inverted_residual", "fuse_separable", "prune", "GradualPruner", "quantize", "TransformReport"]
