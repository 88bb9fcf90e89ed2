"""Training and evaluation loops shared by both pipelines (they must run the same schedule)."""
import contextlib
import math
import statistics
import time

import torch
import torch.nn.functional as F

from effops.demo import models


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def autocast(device, amp):
    """bf16 autocast when --amp is on, else nothing."""
    if not amp:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def epoch_batches(n, batch_size, epoch, seed, rank=0, world=1):
    """Index batches of one epoch: a permutation seeded by (seed, epoch), identical on every rank, cut
    to a multiple of the world size so every rank takes the same number of steps (DDP needs that);
    rank r takes every world-th index. Returns a list of index tensors."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    perm = torch.randperm(n, generator=g)
    perm = perm[: len(perm) - len(perm) % world][rank::world]
    return [perm[i:i + batch_size] for i in range(0, len(perm), batch_size)]


def optimizer_steps(batches, accum):
    """Group micro-batches into optimizer steps of `accum` micro-batches each (the last may be shorter)."""
    return [batches[i:i + accum] for i in range(0, len(batches), accum)]


SCHEDULES = ("cosine", "constant")
WARMUP_FRACTION = 0.05


def lr_factor(step, total_steps, schedule="cosine", warmup_fraction=WARMUP_FRACTION):
    """The learning rate of optimizer step `step` (0-based) of `total_steps`, as a fraction of the peak.

    cosine: linear warm-up over the first warmup_fraction of the steps, then a cosine decay from 1 towards 0
    (the last step takes a small, non-zero lr). The decay is what makes the final accuracy repeatable: at a constant lr the
    weights still move by lr-sized steps at the end, and eval-mode BatchNorm (running statistics, an
    average over the last few batches of weights that kept moving) can be off by many points on one
    seed and not the next. constant: the peak lr throughout (the demo's former recipe)."""
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ValueError("schedule must be one of %s, got %r" % (", ".join(SCHEDULES), schedule))
    warmup = max(1, int(round(warmup_fraction * total_steps)))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(step - warmup, total_steps - warmup) / max(1, total_steps - warmup)  # 0 right after warm-up
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_scheduler(optimizer, total_steps, schedule="cosine"):
    """A LambdaLR over `optimizer` following lr_factor (step it after every optimizer step)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, schedule))


def train_step(model, optimizer, x, y, micro_batches, *, device, amp, on_step=None):
    """One optimizer step over `micro_batches` (index tensors into x, y) with gradient accumulation.

    Under DDP (model has no_sync) gradients are all-reduced only on the last micro-batch. Returns the
    mean loss over the micro-batches."""
    model.train()
    inner = getattr(model, "module", model)  # under DDP, the model it wraps
    if getattr(inner, "batchnorm_frozen", False):
        models.freeze_batchnorm(inner)  # model.train() just put the BatchNorms back to batch statistics
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for i, idx in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            xb, yb = x[idx].to(device, non_blocking=True), y[idx].to(device, non_blocking=True)
            with autocast(device, amp):
                loss = F.cross_entropy(model(xb), yb)
            (loss / len(micro_batches)).backward()
        total += float(loss.detach())
    optimizer.step()
    if on_step is not None:
        on_step()
    return total / len(micro_batches)


def timed_train_step(*args, device, **kwargs):
    """train_step and its wall time in ms (synchronized on CUDA)."""
    _sync(device)
    start = time.perf_counter()
    loss = train_step(*args, device=device, **kwargs)
    _sync(device)
    return loss, (time.perf_counter() - start) * 1e3


@torch.no_grad()
def predict(model, x, *, device, amp=False, batch_size=512):
    model.eval()
    out = []
    for i in range(0, len(x), batch_size):
        with autocast(device, amp):
            out.append(model(x[i:i + batch_size].to(device)).float().argmax(1).cpu())
    return torch.cat(out)


def accuracy(model, x, y, *, device, amp=False):
    """Fraction of x classified as y."""
    return float((predict(model, x, device=device, amp=amp) == y).float().mean())


@torch.no_grad()
def inference_ms(models, x, *, device, amp=False, rounds=6, calls=4):
    """Median ms per forward of batch x for each model in {name: model}, interleaved over rounds so
    that a noisy machine hits all of them alike; the order turns every round, so no model always runs
    first (right after another model's allocations and cache traffic)."""
    x = x.to(device)
    samples = {name: [] for name in models}
    for m in models.values():
        m.eval()
        with autocast(device, amp):
            m(x)  # warm-up (first-call allocations, lazy packing)
    order = list(models.items())
    for r in range(rounds):
        for name, m in order[r % len(order):] + order[:r % len(order)]:
            with autocast(device, amp):
                _sync(device)
                start = time.perf_counter()
                for _ in range(calls):
                    m(x)
                _sync(device)
            samples[name].append((time.perf_counter() - start) * 1e3 / calls)
    return {name: statistics.median(s) for name, s in samples.items()}


def median_step_ms(step_ms, warmup=2):
    """Median step time, leaving out the first steps of a stage (allocations, lazy init)."""
    kept = step_ms[warmup:] if len(step_ms) > warmup else step_ms
    return statistics.median(kept) if kept else None
