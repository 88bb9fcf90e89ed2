"""effops.optim.AdamW under DDP and FSDP2 (fully_shard): two CPU processes on gloo, file:// init.

Each worker trains the same model twice, once with effops.optim.AdamW and once with
torch.optim.AdamW(foreach=False), and checks that the full parameters agree; the FSDP2 worker also
saves the sharded model + optimizer state with torch.distributed.checkpoint, loads it into fresh
sharded copies and checks that training resumes with the same numbers.
"""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from effops.demo.distributed import teardown

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")
WORLD = 2
TOL = dict(atol=1e-5, rtol=1e-5)


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 33), torch.nn.Tanh(), torch.nn.Linear(33, 7))


def _batch(rank, step):
    g = torch.Generator().manual_seed(100 * step + rank)  # each rank its own data
    return torch.randn(8, 16, generator=g), torch.randn(8, 7, generator=g)


def _train(model, opt, rank, steps, start=0):
    for i in range(start, start + steps):
        x, y = _batch(rank, i)
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()


def _full(model):
    return torch.cat([(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().flatten()
                      for p in model.parameters()])


def _in_group(rank, init_file, body, *args):
    """body(rank, *args) inside a gloo group; the group is destroyed after body returned, so that no
    DDP/FSDP module of body's outlives it (see teardown)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=WORLD)
    try:
        body(rank, *args)
    finally:
        teardown()


def _ddp_body(rank):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from effops.optim import AdamW
    ours, ref = DDP(_model()), DDP(_model())
    _train(ours, AdamW(ours.parameters(), lr=1e-2, amsgrad=True), rank, 10)
    _train(ref, torch.optim.AdamW(ref.parameters(), lr=1e-2, amsgrad=True, foreach=False), rank, 10)
    torch.testing.assert_close(_full(ours), _full(ref), **TOL)
    assert not torch.equal(_full(ours), _full(_model()))


def _sharded(seed=0):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # An explicit CPU mesh: without one fully_shard builds its mesh on the current accelerator, so on a
    # machine with a GPU it would move the shards to CUDA while this test's data and gloo stay on CPU.
    mesh = init_device_mesh("cpu", (WORLD,))
    model = _model(seed)
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _fsdp_body(rank, ckpt_dir):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
    from torch.distributed.tensor import DTensor

    from effops.optim import AdamW
    ours, ref = _sharded(), _sharded()
    opt = AdamW(ours.parameters(), lr=1e-2, weight_decay=0.05)
    _train(ours, opt, rank, 5)
    _train(ref, torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.05, foreach=False), rank, 5)
    torch.testing.assert_close(_full(ours), _full(ref), **TOL)
    p0 = next(ours.parameters())
    assert isinstance(p0, DTensor) and isinstance(opt.state[p0]["exp_avg"], DTensor)  # sharded state

    dcp.save({"model": get_model_state_dict(ours), "optim": get_optimizer_state_dict(ours, opt)},
             checkpoint_id=ckpt_dir)
    _train(ours, opt, rank, 5, start=5)

    resumed = _sharded(seed=7)  # different init: everything must come from the checkpoint
    opt2 = AdamW(resumed.parameters(), lr=1e-2, weight_decay=0.05)
    state = {"model": get_model_state_dict(resumed), "optim": get_optimizer_state_dict(resumed, opt2)}
    dcp.load(state, checkpoint_id=ckpt_dir)
    set_model_state_dict(resumed, state["model"])
    set_optimizer_state_dict(resumed, opt2, state["optim"])
    assert opt2.state[next(resumed.parameters())]["step"].item() == 5
    _train(resumed, opt2, rank, 5, start=5)
    torch.testing.assert_close(_full(resumed), _full(ours), **TOL)


def _spawn(body, *args):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_in_group, args=(os.path.join(tmp, "init"), body) + args, nprocs=WORLD, join=True)


def test_ddp_matches_torch_adamw():
    _spawn(_ddp_body)


def test_fsdp2_matches_torch_and_sharded_checkpoint_resumes(tmp_path):
    _spawn(_fsdp_body, str(tmp_path / "ckpt"))


def _sparse_model(seed=0):
    """A block-sparse 512 -> 512 layer (the cpu block kernel at 64 rows) and a dense head."""
    import effops
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, 8))
    return effops.prune(model, 0.9, pattern="block", block_size=32, exclude=["2"])


def _sparse_batch(step):
    g = torch.Generator().manual_seed(step)
    return torch.randn(2 * 64, 512, generator=g), torch.randn(2 * 64, 8, generator=g)


def _fsdp_sparse_body(rank):
    # FSDP2 refills the unsharded weight at every all-gather without moving its version counter: the
    # block kernel's cached weight panels served the previous step's weights (training and eval).
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from effops.optim import AdamW
    mesh = init_device_mesh("cpu", (WORLD,))
    sharded, single = _sparse_model(), _sparse_model()  # single: one process, the whole batch
    fully_shard(sharded[0], mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    opt, opt1 = AdamW(sharded.parameters(), lr=1e-2), AdamW(single.parameters(), lr=1e-2)
    probe = torch.randn(64, 512, generator=torch.Generator().manual_seed(99))
    for step in range(4):
        x, y = _sparse_batch(step)
        mine = slice(64 * rank, 64 * (rank + 1))
        opt.zero_grad()
        F.mse_loss(sharded(x[mine]), y[mine]).backward()
        opt.step()
        opt1.zero_grad()
        F.mse_loss(single(x), y).backward()
        opt1.step()
        with torch.no_grad():  # an eval pass between steps
            torch.testing.assert_close(sharded(probe), single(probe), **TOL)
    torch.testing.assert_close(_full(sharded), _full(single), **TOL)


def test_fsdp2_block_sparse_layer_trains_and_evaluates_on_current_weights():
    _spawn(_fsdp_sparse_body)
