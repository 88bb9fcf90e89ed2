"""effops.optim.state_bytes / state_bytes_per_param: bytes the optimizer really holds per parameter."""
import pytest
import torch

from effops.optim import AdamW, state_bytes, state_bytes_per_param


def params(dtype=torch.float32):
    return [torch.nn.Parameter(torch.randn(n).to(dtype)) for n in (1000, 255, 1)]


def stepped(opt):
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = torch.ones_like(p)
    opt.step()
    return opt


@pytest.mark.parametrize("make,per_elem", [
    (lambda ps: torch.optim.AdamW(ps), 8),                               # two fp32 moments
    (lambda ps: AdamW(ps), 8),
    (lambda ps: AdamW(ps, amsgrad=True), 12),                            # + the running max
], ids=["torch", "effops", "effops-amsgrad"])
def test_counts_the_tensors_held(make, per_elem):
    ps = params()
    opt = make(ps)
    assert state_bytes(opt) == 0  # no state before the first step
    stepped(opt)
    numel = sum(p.numel() for p in ps)
    expected = per_elem * numel + 4 * len(ps)  # + one fp32 step count per tensor
    assert state_bytes(opt) == expected
    assert state_bytes_per_param(opt) == pytest.approx(expected / numel)


def test_master_weights_count_the_fp32_copy():
    ps = params(torch.bfloat16)
    opt = stepped(AdamW(ps, master_weights=True))
    numel = sum(p.numel() for p in ps)
    assert state_bytes(opt) == 12 * numel + 4 * len(ps)  # fp32 master + two fp32 moments


def test_a_buffer_shared_by_views_is_counted_once():
    p = torch.nn.Parameter(torch.zeros(10))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    buf = torch.zeros(20)
    opt.state[p]["a"], opt.state[p]["b"] = buf[:10], buf[10:]
    assert state_bytes(opt) == 80
    assert state_bytes_per_param(opt) == 8.0


def test_rejects_what_is_not_an_optimizer():
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        state_bytes([torch.zeros(3)])
