"""Data-parallel setup for `torchrun --nproc_per_node N -m effops.demo`: gloo on CPU, NCCL on GPUs."""
import gc
import os

import torch
import torch.distributed as dist
from torch import nn


def world():
    """(rank, world size) from torchrun's environment; (0, 1) when run as a plain process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def setup(device):
    """Join the process group when launched by torchrun; returns (rank, world size, device).

    On CUDA each process takes the GPU of its LOCAL_RANK."""
    rank, size = world()
    if size == 1:
        return rank, size, torch.device(device)
    device = torch.device(device)
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, size, device


def wrap(model, device):
    """DistributedDataParallel around model when a process group is up, else the model itself."""
    if not (dist.is_available() and dist.is_initialized()):
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def all_equal(value):
    """True when every rank holds the same float (used to check that ranks agree on accuracy)."""
    if not (dist.is_available() and dist.is_initialized()):
        return True
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return all(v == values[0] for v in values)


def teardown():
    """Leave the process group together, once every DDP/FSDP module of this process is released.

    A wrapped module's reducer holds the process group. Left alive to interpreter exit, the group's gloo
    threads are torn down during finalization, try to take the GIL, and abort the process ("terminate
    called without an active exception"; about 1 in 16 two-process runs). So callers drop their
    wrappers first (let the function that built them return), the collect here frees any cycle still
    holding one, and the barrier makes every rank destroy the group at the same point."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
