"""effops.ops.inverted_residual on the blocks of MobileNetV2 (and MobileNetV3-Large / MNASNet shapes),
channels_last, fp32 (--dtype for 16-bit): our fused kernel (backend "cpu", forced) and the automatic choice against the plain ATen
route (backend "reference": the three convolutions, activations and add through torch's own kernels,
the expanded tensor in memory), side by side in one process, interleaved, medians.

    python -m benchmarks.bench_inverted_residual [--batches 1,16] [--cpu-time] [--dtype bfloat16] [--train]
        [--compiled] [--models mnasnet1_0,mobilenet_v3_large]

--train: a forward and backward of each block (x and every weight needing gradients), the ATen route
being torch's autograd over the same ops (it saves the expanded tensor); our route the fused forward
and the backward that recomputes it.

--compiled: also the block as torch's plain modules (convolutions and torch's activations) under
torch.compile with inductor's freezing (BatchNorm folded, weights prepacked, activations and the
residual add fused into oneDNN's convolutions), eval only: what a fused block has to beat inside a
compiled model.

--models: instead of the list below, the distinct fused blocks of these models (benchmarks/models.py
after effops.fuse), named "<model> <index>" by their first position in the model, with their shapes.

--cpu-time: one thread, CPU time of that thread (at::parallel_for and oneDNN then run in it), which the
other processes of a shared machine do not inflate; the default is wall clock at torch's thread count.
FLOPs per call: 2 x N x (H x W x Cin x Ch + OH x OW x Ch x (k^2 + Cout)).
"""
import argparse
import importlib
import statistics
import sys
import time

import torch

import effops
from benchmarks.common import compare
from effops.reference import inverted_residual as reference

_op = importlib.import_module("effops.ops.inverted_residual")  # the module (effops.ops.inverted_residual is the function)

# (name, Cin, hidden, Cout, input size, kernel, stride, activation[, squeeze-excitation]): MobileNetV2's
# distinct blocks, the hardswish and 5x5 blocks of MobileNetV3-Large / MNASNet, and blocks with
# squeeze-excitation (squeeze channels, SE activation, gate) of MobileNetV3-Large and EfficientNet-B0.
BLOCKS = [
    ("mv2 s2 16-96-24 @112", 16, 96, 24, 112, 3, 2, "relu6"),
    ("mv2 24-144-24 @56", 24, 144, 24, 56, 3, 1, "relu6"),
    ("mv2 s2 24-144-32 @56", 24, 144, 32, 56, 3, 2, "relu6"),
    ("mv2 32-192-32 @28", 32, 192, 32, 28, 3, 1, "relu6"),
    ("mv2 s2 32-192-64 @28", 32, 192, 64, 28, 3, 2, "relu6"),
    ("mv2 64-384-64 @14", 64, 384, 64, 14, 3, 1, "relu6"),
    ("mv2 64-384-96 @14", 64, 384, 96, 14, 3, 1, "relu6"),
    ("mv2 96-576-96 @14", 96, 576, 96, 14, 3, 1, "relu6"),
    ("mv2 s2 96-576-160 @14", 96, 576, 160, 14, 3, 2, "relu6"),
    ("mv2 160-960-160 @7", 160, 960, 160, 7, 3, 1, "relu6"),
    ("mv2 160-960-320 @7", 160, 960, 320, 7, 3, 1, "relu6"),
    ("v3 80-184-80 @14 hardswish", 80, 184, 80, 14, 3, 1, "hardswish"),
    ("v3 16-16-16 @112 noexpand", 16, 16, 16, 112, 3, 1, "relu"),
    ("mnas s2 40-240-80 @28 k5", 40, 240, 80, 28, 5, 2, "relu"),
    ("v3 se 40-120-40 @28 k5", 40, 120, 40, 28, 5, 1, "relu", (32, "relu", "hardsigmoid")),
    ("v3 se 112-672-112 @14 hardswish", 112, 672, 112, 14, 3, 1, "hardswish", (168, "relu", "hardsigmoid")),
    ("v3 se 160-960-160 @7 k5 hardswish", 160, 960, 160, 7, 5, 1, "hardswish", (240, "relu", "hardsigmoid")),
    ("effb0 se 32-32-16 @112 noexpand", 32, 32, 16, 112, 3, 1, "silu", (8, "silu", "sigmoid")),
    ("effb0 se s2 16-96-24 @112", 16, 96, 24, 112, 3, 2, "silu", (4, "silu", "sigmoid")),
    ("effb0 se 24-144-24 @56", 24, 144, 24, 56, 3, 1, "silu", (6, "silu", "sigmoid")),
    ("effb0 se 40-240-40 @28 k5", 40, 240, 40, 28, 5, 1, "silu", (10, "silu", "sigmoid")),
    ("effb0 se 80-480-80 @14", 80, 480, 80, 14, 3, 1, "silu", (20, "silu", "sigmoid")),
    ("effb0 se 192-1152-192 @7 k5", 192, 1152, 192, 7, 5, 1, "silu", (48, "silu", "sigmoid")),
]


def model_blocks(names):
    """The distinct inverted residuals of these benchmark models after effops.fuse, as BLOCKS entries
    (input size from a 224x224 forward; the first of equal blocks names them)."""
    from benchmarks import models
    from effops.nn import InvertedResidual
    seen, blocks = set(), []
    for name in names:
        model = effops.fuse(getattr(models, name)().eval())
        found = []
        hooks = [m.register_forward_pre_hook(lambda m, a, i=i: found.append((i, m, a[0].shape[-1])))
                 for i, m in enumerate(m for m in model.modules() if isinstance(m, InvertedResidual))]
        with torch.no_grad():
            model(torch.randn(1, 3, 224, 224))
        for h in hooks:
            h.remove()
        for i, m, size in found:
            d = m.depthwise
            se = None if m.se_reduce is None else (m.se_reduce.out_channels, m.se_activation, m.se_gate)
            shape = (m.in_channels, d.in_channels, m.out_channels, size, d.kernel_size[0], d.stride[0],
                     m.activation) + ((se,) if se else ())
            if shape not in seen:
                seen.add(shape)
                blocks.append(("%s %d" % (name, i),) + shape)
    return blocks


def make(block, batch, dtype=torch.float32, train=False, parts=False):
    _, cin, hidden, cout, size, k, stride, act = block[:8]
    se = block[8] if len(block) > 8 else None
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cin, size, size, generator=g).contiguous(memory_format=torch.channels_last)
    expand = hidden != cin
    weights = [torch.randn(hidden, cin, 1, 1, generator=g) / cin ** 0.5 if expand else None,
               torch.randn(hidden, generator=g) * 0.1 if expand else None,
               torch.randn(hidden, 1, k, k, generator=g) / k, torch.randn(hidden, generator=g) * 0.1,
               torch.randn(cout, hidden, 1, 1, generator=g) / hidden ** 0.5, torch.randn(cout, generator=g) * 0.1]
    x, weights = x.to(dtype), [None if w is None else w.to(dtype) for w in weights]
    se_kw = {}
    if se is not None:
        squeeze, se_act, gate = se
        se_kw = dict(se_reduce_weight=torch.randn(squeeze, hidden, 1, 1, generator=g).to(dtype) / hidden ** 0.5,
                     se_reduce_bias=torch.zeros(squeeze, dtype=dtype),
                     se_expand_weight=torch.randn(hidden, squeeze, 1, 1, generator=g).to(dtype) / squeeze ** 0.5,
                     se_expand_bias=torch.ones(hidden, dtype=dtype), se_activation=se_act, se_gate=gate)
    residual = stride == 1 and cin == cout
    out = (size + 2 * ((k - 1) // 2) - k) // stride + 1
    flops = 2 * batch * ((size * size * cin * hidden if expand else 0) + out * out * hidden * (k * k + cout))
    if train:
        for t in [x] + weights + [v for v in se_kw.values() if isinstance(v, torch.Tensor)]:
            if t is not None:
                t.requires_grad_()

        def step(op=effops.ops.inverted_residual):
            with torch.enable_grad():
                op(x, *weights, (stride,) * 2, ((k - 1) // 2,) * 2, act, residual, **se_kw).sum().backward()
        step.plain = lambda: step(reference.inverted_residual)  # torch's autograd over torch's ops
        return step, 3 * flops
    if parts:
        return None, x, weights, se_kw
    packed = _op.inverted_residual_pack(*weights)
    return (lambda: effops.ops.inverted_residual(x, *weights, stride, (k - 1) // 2, act, residual, packed,
                                                 **se_kw)), flops


_TORCH_ACTIVATIONS = {"relu": torch.nn.ReLU, "relu6": torch.nn.ReLU6, "silu": torch.nn.SiLU,
                      "hardswish": torch.nn.Hardswish, "gelu": torch.nn.GELU}


class PlainBlock(torch.nn.Module):
    """The block as a user's unfused model computes it (BatchNorm already folded into the convs)."""

    def __init__(self, block, weights, se_kw):
        super().__init__()
        _, cin, hidden, cout, _, k, stride, act = block[:8]
        ew, eb, dw, db, pw, pb = weights
        conv = lambda w, b, **kw: torch.nn.Conv2d(w.shape[1] * kw.get("groups", 1), w.shape[0], w.shape[2:],  # noqa: E731
                                                 bias=b is not None, **kw)
        self.expand = conv(ew, eb) if ew is not None else None
        self.depthwise = conv(dw, db, stride=stride, padding=(k - 1) // 2, groups=hidden)
        self.project = conv(pw, pb)
        self.act = _TORCH_ACTIVATIONS[act]()
        self.se = None
        if se_kw:
            squeeze = se_kw["se_reduce_weight"]
            self.se = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), conv(squeeze, se_kw["se_reduce_bias"]),
                                          _TORCH_ACTIVATIONS[se_kw["se_activation"]](),
                                          conv(se_kw["se_expand_weight"], se_kw["se_expand_bias"]),
                                          torch.nn.Sigmoid() if se_kw["se_gate"] == "sigmoid" else torch.nn.Hardsigmoid())
            with torch.no_grad():
                for m, w, b in ((self.se[1], squeeze, se_kw["se_reduce_bias"]),
                                (self.se[3], se_kw["se_expand_weight"], se_kw["se_expand_bias"])):
                    m.weight.copy_(w), m.bias.copy_(b)
        with torch.no_grad():
            for m, w, b in ((self.expand, ew, eb), (self.depthwise, dw, db), (self.project, pw, pb)):
                if m is not None:
                    m.weight.copy_(w), m.bias.copy_(b)
        self.residual = stride == 1 and cin == cout
        self.eval()

    def forward(self, x):
        e = x if self.expand is None else self.act(self.expand(x))
        d = self.act(self.depthwise(e))
        if self.se is not None:
            d = d * self.se(d)
        y = self.project(d)
        return y + x if self.residual else y


def compiled_block(block, batch, dtype):
    """The block's plain modules under torch.compile with freezing, compiled by a first call."""
    import torch._inductor.config as inductor_config
    inductor_config.freezing = True
    torch._dynamo.reset()  # a fresh module per block: without a reset dynamo stops compiling after 8
    fn, x, weights, se_kw = make(block, batch, dtype, parts=True)
    model = PlainBlock(block, weights, se_kw).to(dtype).to(memory_format=torch.channels_last)
    compiled = torch.compile(model, dynamic=False)
    with torch.no_grad():
        compiled(x)
    return lambda: compiled(x)


def forced(backend, fn):
    def call():
        with effops.use_backend(backend):
            return fn()
    return call


def impls(block, batch, dtype, train=False, compiled=False):
    fn, flops = make(block, batch, dtype, train)
    plain = fn.plain if train else forced("reference", fn)
    out = {"reference": plain, "cpu": forced("cpu", fn), "effops": fn}
    if compiled and not train:
        out["compiled"] = compiled_block(block, batch, dtype)
    return out, flops


def cpu_time(fn, min_time=0.3):
    """Median CPU seconds of this thread per call (one thread: the kernels run in it)."""
    fn()
    samples = []
    while sum(samples) < min_time or len(samples) < 5:
        start = time.thread_time()
        fn()
        samples.append(time.thread_time() - start)
    return statistics.median(samples)


def bench(batches, use_cpu_time, rounds=3, min_time=0.2, dtype=torch.float32, only="", train=False,
          compiled=False, blocks=BLOCKS):
    rows = []
    with torch.no_grad():
        for batch in batches:
            for block in [b for b in blocks if only in b[0]]:
                fns, flops = impls(block, batch, dtype, train, compiled)
                case = "%s b%d" % (block[0], batch)
                if not use_cpu_time:
                    rows += compare("inverted_residual", case, fns, "reference", "cpu", rounds, min_time,
                                    work=flops, work_unit="GFLOP/s")
                    continue
                samples = {k: [] for k in fns}
                for _ in range(rounds):
                    for k, fn in fns.items():
                        samples[k].append(cpu_time(fn))
                med = {k: statistics.median(v) for k, v in samples.items()}
                for k, t in med.items():
                    rows.append(dict(op="inverted_residual", case=case, impl=k, time_ms=t * 1e3,
                                     speedup=med["reference"] / t, GFLOPs=flops / t / 1e9))
                print("  %s | %s" % (case, ", ".join("%s %.3f ms %.2fx" % (k, t * 1e3, med["reference"] / t)
                                                     for k, t in med.items())), file=sys.stderr, flush=True)
    return rows


def run(quick, device):
    if device != "cpu":
        return []
    return bench((16,) if quick else (1, 16), False, rounds=3 if not quick else 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--cpu-time", action="store_true", help="one thread, CPU time of the thread")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--only", default="", help="blocks whose name contains this")
    parser.add_argument("--train", action="store_true", help="forward and backward")
    parser.add_argument("--compiled", action="store_true", help="also the plain block under torch.compile (freezing)")
    parser.add_argument("--models", default="", help="the distinct blocks of these models (benchmarks/models.py)")
    args = parser.parse_args()
    if args.cpu_time:
        torch.set_num_threads(1)
    blocks = model_blocks(args.models.split(",")) if args.models else BLOCKS
    rows = bench([int(b) for b in args.batches.split(",")], args.cpu_time, args.rounds,
                 dtype=getattr(torch, args.dtype), only=args.only, train=args.train, compiled=args.compiled,
                 blocks=blocks)
    with_compiled = any(r["impl"] == "compiled" for r in rows)
    print("| case | reference ms | cpu ms | cpu vs reference | effops vs reference |"
          + (" compiled ms | effops vs compiled |" if with_compiled else ""))
    print("|---|---|---|---|---|" + ("---|---|" if with_compiled else ""))
    by_case = {}
    for r in rows:
        by_case.setdefault(r["case"], {})[r["impl"]] = r
    for case, r in by_case.items():
        ms = lambda k: r[k]["time_ms"]  # noqa: E731
        line = "| %s | %.3f | %.3f | %.2fx | %.2fx |" % (case, ms("reference"), ms("cpu"), ms("reference") / ms("cpu"),
                                                       ms("reference") / ms("effops"))
        if "compiled" in r:
            line += " %.3f | %.2fx |" % (ms("compiled"), ms("compiled") / ms("effops"))
        print(line)


if __name__ == "__main__":
    main()
