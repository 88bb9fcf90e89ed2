"""The optimizer step: effops.optim.AdamW against torch.optim.AdamW (foreach=True and fused=True).

Cases (gradients fixed, the step timed alone):
* fp32 transformer: a GPT-shaped parameter list (embedding + per layer qkv, out proj, two MLP
  matrices, biases, two LayerNorms): 102M parameters in full mode, 17M in quick mode.
* fp32 many small tensors: 2,000 (quick: 500) tensors of 64..4,096 elements (per-tensor overhead).
* fp32 small model: the transformer list at width 32 (52 tensors, 88K parameters): per-step overhead.
* bf16 + fp32 master: bf16 params and grads. effops does it in one pass (AdamW(master_weights=True));
  the baseline is what users do today: copy the bf16 grads into fp32 master grads, torch's fused
  AdamW on the fp32 masters, copy the masters back into the bf16 params.

Effective bandwidth = the bytes one fused pass must move / time: 28 B per parameter in fp32 (read
param, grad, exp_avg, exp_avg_sq; write param, exp_avg, exp_avg_sq) and 28 B in the master case
(read bf16 grad, fp32 master/exp_avg/exp_avg_sq; write those three and the bf16 param). The same
work figure is used for every implementation of a case, so rates compare like times do. The
baseline's master case actually moves 40 B per parameter (2 extra copies).

DeepSpeed's DeepSpeedCPUAdam is timed when `deepspeed` is importable (`make bench` installs it; the
run says so when it is missing). Its first use JIT-compiles its C++ op for about 90 s.
"""
import torch

import effops
from benchmarks.common import compare
from effops.optim import AdamW

BYTES_PER_PARAM = {"fp32": 28, "master": 28}


def transformer_shapes(d_model, n_layers, vocab):
    shapes = [(vocab, d_model), (1024, d_model)]  # token and position embeddings
    for _ in range(n_layers):
        shapes += [(d_model,), (d_model,), (3 * d_model, d_model), (3 * d_model,), (d_model, d_model), (d_model,),
                   (d_model,), (d_model,), (4 * d_model, d_model), (4 * d_model,), (d_model, 4 * d_model), (d_model,)]
    return shapes + [(d_model,), (d_model,)]


def small_shapes(count=2000, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(int(n),) for n in torch.randint(64, 4097, (count,), generator=g)]


def make_params(shapes, dtype, device):
    g = torch.Generator().manual_seed(1)
    params = []
    for s in shapes:
        p = torch.nn.Parameter((torch.randn(s, generator=g) * 0.02).to(device=device, dtype=dtype))
        p.grad = (torch.randn(s, generator=g) * 1e-3).to(device=device, dtype=dtype)
        params.append(p)
    return params


def _effops_backends(device):
    names = ("cpu",) if torch.device(device).type == "cpu" else ("cuda", "triton")
    return [n for n in names if effops.backends()[n]]


def _stepper(opt, backend=None):
    def step():
        if backend is None:
            opt.step()
        else:
            with effops.use_backend(backend):
                opt.step()
    return step


def fp32_case(name, shapes, device, rounds, min_time):
    impls = {}
    for label, kw in (("torch_foreach", dict(foreach=True)), ("torch_fused", dict(fused=True))):
        impls[label] = _stepper(torch.optim.AdamW(make_params(shapes, torch.float32, device), lr=1e-3, **kw))
    for backend in _effops_backends(device):
        impls["effops_" + backend] = _stepper(AdamW(make_params(shapes, torch.float32, device), lr=1e-3), backend)
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        if torch.device(device).type == "cpu":
            impls["deepspeed_cpu_adam"] = _stepper(DeepSpeedCPUAdam(make_params(shapes, torch.float32, device),
                                                                    lr=1e-3, adamw_mode=True))
    except ImportError:
        print("DeepSpeedCPUAdam: not measured (deepspeed is not installed)")
    n = sum(torch.Size(s).numel() for s in shapes)
    return compare("adam_step", name, impls, "torch_fused", device=device, rounds=rounds, min_time=min_time,
                   work=BYTES_PER_PARAM["fp32"] * n, work_unit="GB/s", extra=dict(params_M=n / 1e6, tensors=len(shapes)))


def master_case(name, shapes, device, rounds, min_time):
    """bf16 params with fp32 masters: one effops pass against copy-in + torch fused + copy-out."""
    params = make_params(shapes, torch.bfloat16, device)
    masters = [torch.nn.Parameter(p.detach().float()) for p in params]
    for m in masters:
        m.grad = torch.empty_like(m)
    grads = [p.grad for p in params]
    torch_opt = torch.optim.AdamW(masters, lr=1e-3, fused=True)
    master_grads = [m.grad for m in masters]

    @torch.no_grad()
    def baseline():
        torch._foreach_copy_(master_grads, grads)
        torch_opt.step()
        torch._foreach_copy_([p.data for p in params], masters)

    impls = {"torch_fused_master_copy": baseline}
    for backend in _effops_backends(device):
        ours = make_params(shapes, torch.bfloat16, device)
        impls["effops_" + backend] = _stepper(AdamW(ours, lr=1e-3, master_weights=True), backend)
    n = sum(torch.Size(s).numel() for s in shapes)
    return compare("adam_step", name, impls, "torch_fused_master_copy", device=device, rounds=rounds,
                   min_time=min_time, work=BYTES_PER_PARAM["master"] * n, work_unit="GB/s",
                   extra=dict(params_M=n / 1e6, tensors=len(shapes)))


def run(quick, device):
    rounds, min_time = (2, 0.2) if quick else (3, 0.5)
    big = transformer_shapes(512, 4, 8192) if quick else transformer_shapes(768, 9, 50257)
    rows = []
    rows += fp32_case("fp32 transformer", big, device, rounds, min_time)
    count = 500 if quick else 2000
    rows += fp32_case("fp32 %d small tensors" % count, small_shapes(count), device, rounds, min_time)
    # A small model (52 tensors, 88K params): the per-step overhead (the lists gathered, the op's call and
    # checks) beside the arithmetic.
    rows += fp32_case("fp32 small model", transformer_shapes(32, 4, 128), device, rounds, min_time)
    rows += master_case("bf16 params + fp32 master", big, device, rounds, min_time)
    return rows
