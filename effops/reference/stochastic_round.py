"""Reference: stochastic rounding of fp32 to bf16 with counter-based random bits, in plain PyTorch.

The definition every backend follows (csrc/cpu/stochastic_round.h, triton_kernels/adam_step.py):
for element i (its row-major index in the tensor) and a 32-bit seed per tensor and step,

    bits(i) = mix(i ^ seed) & 0xffff
    mix(x):   x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15; x *= 0x1b873593; x ^= x >> 16   (mod 2^32)
    bf16(x) = (fp32_bits(x) + bits(i)) >> 16

Adding 16 random bits below the 16 kept ones carries into them with probability (discarded bits) /
2^16, so x is rounded away from zero with that probability and toward zero otherwise: unbiased, so
updates smaller than bf16's resolution still move the parameter on average. A counter-based
generator (a hash of the element index and the seed, no state) gives the same bits on every backend
and in any order of evaluation. NaN becomes the quiet NaN 0x7fc0.
"""
import torch

MIX1 = 0x7feb352d
MIX2 = 0x1b873593  # both below 2^31: products of a 32-bit value fit int64
MASK = 0xFFFFFFFF


def mix32(x):
    """The 32-bit mix of an int64 tensor of values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = (x * MIX1) & MASK
    x = x ^ (x >> 15)
    x = (x * MIX2) & MASK
    return x ^ (x >> 16)


def mix32_int(x):
    """mix32 of one Python int (host-side seeds)."""
    return int(mix32(torch.tensor([x & MASK], dtype=torch.int64))[0])


def random_bits(numel, seed, device=None):
    """The 16 random bits of elements 0..numel-1 for a 32-bit seed (int64 tensor)."""
    i = torch.arange(numel, dtype=torch.int64, device=device) & MASK
    return mix32(i ^ (seed & MASK)) & 0xFFFF


def round_to_bf16(x, seed):
    """x (fp32, any shape, taken in row-major order) stochastically rounded to bf16."""
    flat = x.reshape(-1)
    bits = flat.view(torch.int32).to(torch.int64) & MASK
    bits = ((bits + random_bits(flat.numel(), seed, flat.device)) >> 16) & 0xFFFF
    upper = (bits << 16).to(torch.int64)
    upper = torch.where(upper >= 2 ** 31, upper - 2 ** 32, upper).to(torch.int32)  # back to int32's range
    out = upper.view(torch.float32).to(torch.bfloat16)  # exact: the low 16 bits are zero
    out = torch.where(torch.isnan(flat), torch.full_like(out, float("nan")), out)
    return out.view(x.shape)
