"""Triton kernels, installed as `effops.triton_kernels` (the top-level name `triton_kernels` belongs to
Triton's own kernel library). Importing a module here imports Triton: the op layer does it lazily.

Every module lists `AOT_SPECS`: each kernel in each of its tuning configurations, with the argument
signature, so `tools/gpu_compile_check.py` can compile it ahead of time for real GPUs.
"""
