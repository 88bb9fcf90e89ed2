"""The effops demo: `python -m effops.demo` (`make demo`).

Trains a small MobileNet-style CNN on scikit-learn's handwritten digits (or an image folder) with
effops pieces (SeparableConv2d, fused AdamW, gradual pruning to SparseLinear, int8 Linear) beside the
same model and schedule in plain PyTorch, and prints per stage the test accuracy, nonzero
parameters, checkpoint bytes and time per training step / inference batch of both. See docs/demo.md.
"""
