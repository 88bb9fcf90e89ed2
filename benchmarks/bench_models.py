"""Whole models (benchmarks/models.py) before and after effops' transforms, beside torch.compile.

Per model, batch and layout, in one process, interleaved, medians (benchmarks.common.compare), the
ratio against eager PyTorch on the original model:
* eval: eager original; eager fused (effops.fuse: inverted-residual blocks and separable chains; CNNs)
  or int8 (quantize) and pruned (prune 90%,
  32 x 32 blocks, the classifier kept dense; transformers); torch.compile (inductor, freezing on) of
  the original and of the transformed model. NCHW and channels_last (model and input) for the CNNs.
* train: one step (forward, backward, SGD) with frozen BatchNorm (train mode, BatchNorms in eval mode;
  fused in that state, so their statistics are folded); for transformers the pruned model's step.
  Eager only: compiling training graphs of these models takes too long on 2 cores.
* peak memory of one call of each eager variant (benchmarks.common.peak_memory: the CPU profiler's
  tally of aten allocations; compiled code allocates its buffers where the profiler does not see them).

    python -m benchmarks.bench_models [--models mobilenet_v2,vit_b_32] [--batches 1,16] [--no-compile]
                                      [--no-train] [--layouts NCHW,channels_last] [--cpu-time] [--out DIR]
`make bench` runs it through benchmarks/run.py (`run`): quick, MobileNetV2 and ViT-B/32 eager only; full,
every model with torch.compile.
"""
import argparse
import copy
import os
import sys
import time
import warnings

import torch
from torch import nn

import effops
from benchmarks import models
from benchmarks.common import compare, cpu_time_fn, peak_memory, time_fn

EVAL_BATCHES = (1, 16)
CNN_LAYOUTS = ("NCHW", "channels_last")
TRAIN_BATCH = 16


def _quiet(transform, *args, **kwargs):
    with warnings.catch_warnings():  # the skips (excluded heads, layers left dense) are expected here
        warnings.simplefilter("ignore")
        return transform(*args, **kwargs)


def _variants(name, model):
    """{label: eval-mode model}: the original and its transformed copies."""
    out = {"eager": model}
    if name in models.CNNS:
        out["eager fused"] = _quiet(effops.fuse, copy.deepcopy(model))
    else:
        out["eager int8"] = _quiet(effops.quantize, copy.deepcopy(model))
        out["eager pruned"] = _quiet(effops.prune, copy.deepcopy(model), 0.9, pattern="block", block_size=32,
                                     exclude="heads")
    return out


def _compiled(model, x):
    """torch.compile with inductor's freezing (weights as constants), compiled by a first call on x."""
    fn = torch.compile(model, dynamic=False)
    with torch.no_grad():
        fn(x)
    return fn


def _call(model, x):
    return lambda: model(x)


def _eval_rows(name, model, batches, layouts, compiled, rounds, min_time, timer=time_fn):
    rows = []
    variants = _variants(name, model)
    for layout in layouts:
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        placed = {k: (copy.deepcopy(m).to(memory_format=fmt) if layout == "channels_last" else m)
                  for k, m in variants.items()}
        for batch in batches:
            x = models.example_input(name, batch)
            if layout == "channels_last":
                x = x.contiguous(memory_format=torch.channels_last)
            impls = {k: _call(m, x) for k, m in placed.items()}
            if compiled:
                for k in list(placed):
                    impls[k.replace("eager", "compiled")] = _call(_compiled(placed[k], x), x)
            case = "eval b%d %s" % (batch, layout)
            with torch.no_grad():
                got = compare("model " + name, case, impls, "eager", "cpu", rounds, min_time,
                              extra=dict(mode="eval", load1=_load()), timer=timer)
                # Compiled code allocates its buffers outside the profiler's view: eager variants only.
                memory = {k: peak_memory(fn) / 2 ** 20 for k, fn in impls.items() if k.startswith("eager")}
            for r in got:
                if r["impl"] in memory:
                    r["peak_MiB"] = memory[r["impl"]]
            rows += got
    return rows


def _load():
    """The 1-minute load average when a case starts: this machine's cores are shared, and a case timed
    while other processes ran (load above the 2 threads used here) can be off by several times."""
    return round(os.getloadavg()[0], 2)


def _frozen_bn(model):
    model.train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    return model


def _step(model, x):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        model(x).float().square().mean().backward()
        opt.step()
    return step


def _train_rows(name, model, layouts, rounds, min_time, timer=time_fn):
    rows = []
    for layout in layouts:
        x = models.example_input(name, TRAIN_BATCH)
        base = copy.deepcopy(model)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
            base = base.to(memory_format=torch.channels_last)
        if name in models.CNNS:
            original = _frozen_bn(base)
            other = ("eager fused", _quiet(effops.fuse, _frozen_bn(copy.deepcopy(base))))
        else:
            original = base.train()
            other = ("eager pruned", _quiet(effops.prune, copy.deepcopy(base), 0.9, pattern="block", block_size=32,
                                            exclude="heads"))
        impls = {"eager": _step(original, x), other[0]: _step(other[1], x)}
        case = "train b%d %s" % (TRAIN_BATCH, layout)
        got = compare("model " + name, case, impls, "eager", "cpu", rounds, min_time,
                      extra=dict(mode="train (frozen BN)" if name in models.CNNS else "train", load1=_load()),
                      timer=timer)
        memory = {}
        for k, fn in impls.items():
            for m in (original, other[1]):
                m.zero_grad(set_to_none=True)  # the profiler sees no free of gradients made before it
            memory[k] = peak_memory(fn) / 2 ** 20
        for r in got:
            r["peak_MiB"] = memory[r["impl"]]
        rows += got
    return rows


def bench(names, batches=EVAL_BATCHES, compiled=True, train=True, rounds=3, min_time=0.2, cnn_layouts=CNN_LAYOUTS,
          timer=time_fn):
    rows = []
    freezing = torch._inductor.config.freezing
    torch._inductor.config.freezing = True
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    try:
        for name in names:
            torch.manual_seed(0)
            model = models.MODELS[name]()
            model = models.calibrate_batchnorm(model) if name in models.CNNS else model.eval()
            layouts = cnn_layouts if name in models.CNNS else ("tokens",)
            rows += _eval_rows(name, model, batches, layouts, compiled, rounds, min_time, timer)
            if train:
                rows += _train_rows(name, model, layouts if name in models.CNNS else ("tokens",), rounds, min_time,
                                    timer)
    finally:
        torch._inductor.config.freezing = freezing
    return rows


def run(quick, device):
    if device != "cpu":
        return []  # CPU kernels and the eager/compile comparison of this machine; GPU runs: not yet
    if quick:
        return bench(["mobilenet_v2", "vit_b_32"], compiled=False, train=False, rounds=3, min_time=0.1)
    return bench(list(models.MODELS))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(models.MODELS))
    parser.add_argument("--batches", default=",".join(map(str, EVAL_BATCHES)))
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--no-train", action="store_true")
    parser.add_argument("--layouts", default=",".join(CNN_LAYOUTS), help="the CNNs' layouts")
    parser.add_argument("--cpu-time", action="store_true",
                        help="one thread, CPU time of the thread (robust on a shared machine) instead of wall clock")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-time", type=float, default=0.2, help="seconds per timed sample (at least)")
    parser.add_argument("--out", default="bench-results/models")
    args = parser.parse_args()
    if args.cpu_time:
        torch.set_num_threads(1)
    from benchmarks import run as runner
    os.makedirs(args.out, exist_ok=True)
    start, rows, names = time.time(), [], args.models.split(",")
    for i, name in enumerate(names):  # results rewritten after each model: a stopped run keeps the finished
        rows += bench([name], [int(b) for b in args.batches.split(",")], not args.no_compile, not args.no_train,
                      args.rounds, args.min_time, tuple(args.layouts.split(",")),
                      cpu_time_fn if args.cpu_time else time_fn)
        runner.write_results(args.out, dict(
            machine=runner.machine_info("cpu"), quick=False, benchmarks=names[:i + 1], pending=names[i + 1:],
            errors={}, rows=rows, seconds=time.time() - start,
            command=" ".join(["python -m benchmarks.bench_models"] + sys.argv[1:])))
    print(runner.markdown(rows))


if __name__ == "__main__":
    main()
