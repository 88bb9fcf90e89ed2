"""Small layers, where per-call overhead decides: each effops module against the plain PyTorch layer a
user would otherwise write, eager, at the demo's sizes (a 192-wide MLP layer, a 24 -> 48 channel
separable block on 32x32 images) and at batch 1.

The automatic choice must never be slower than plain PyTorch: at these sizes the kernels rarely win,
so what is measured is what the op layer adds (argument checks, the backend choice, the custom op's
dispatch where a kernel runs) on top of the same work.

Baselines (plain PyTorch, the way people write it):
* SparseLinear (80% unstructured): nn.Linear pruned with torch.nn.utils.prune (weight * mask per call);
* SeparableConv2d: nn.Conv2d(groups=C) -> ReLU -> nn.Conv2d(1x1);
* Int8Linear: torch.ao quantize_dynamic (FBGEMM); the fp32 nn.Linear it replaces is timed beside them.
"effops.ops" rows call the functional op with the module's tensors (as a user's own module would):
no module memo, the op's memo of recent calls instead.
Inference under torch.no_grad(); the training rows time forward + backward of the float layers.
Run: python -m benchmarks.run [--quick] --only small_calls
"""
import warnings

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from benchmarks.common import compare


def _pruned_pair(features, sparsity):
    import effops
    torch.manual_seed(0)
    linear = nn.Linear(features, features)
    mask = torch.rand(features, features) >= sparsity
    plain = nn.Linear(features, features)
    plain.load_state_dict(linear.state_dict())
    torch_prune.custom_from_mask(plain, "weight", mask)
    ours = effops.nn.SparseLinear.from_linear(linear, mask)
    return plain, ours


def _separable_pair(cin, cout, stride):
    import effops
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(cin, cin, 3, stride=stride, padding=1, groups=cin), nn.ReLU(), nn.Conv2d(cin, cout, 1))
    ours = effops.nn.SeparableConv2d.from_convs(plain[0], plain[2], activation="relu")
    return plain, ours


def _int8_trio(features):
    """(fp32 Linear, torch's dynamic int8 Linear, effops Int8Linear) of one layer."""
    import effops
    torch.manual_seed(0)
    linear = nn.Linear(features, features)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notices
        plain = torch.ao.quantization.quantize_dynamic(nn.Sequential(linear), {nn.Linear}, dtype=torch.qint8)
    return linear, plain, effops.nn.Int8Linear.from_linear(linear)


def _infer(module, x):
    def call():
        with torch.no_grad():
            module(x)
    return call


def _train(module, x):
    def call():
        module(x).sum().backward()
    return call


def _functional_sparse(layer):
    """The functional op on SparseLinear's tensors, as a module."""
    import effops
    return lambda x: effops.ops.masked_linear(x, layer.weight, layer.mask, layer.bias)


def _functional_separable(block):
    import effops
    dw, pw = block.depthwise, block.pointwise
    return lambda x: effops.ops.dwpw_conv2d(x, dw.weight, pw.weight, dw.bias, pw.bias, dw.stride, dw.padding,
                                            dw.dilation, block.activation)


def run(quick, device):
    if torch.device(device).type != "cpu":
        return []  # the overhead measured here is the CPU host's; on CUDA it hides behind the kernels
    rounds, min_time = (5, 0.1) if quick else (9, 0.2)  # cheap calls: more rounds against load spikes
    rows = []
    for batch in (1, 256):
        plain, ours = _pruned_pair(192, 0.8)
        x = torch.randn(batch, 192)
        for kind, timed in (("inference", _infer), ("training", _train)):
            rows += compare("small_calls", "SparseLinear 192x192 80%% %s batch=%d" % (kind, batch),
                            {"torch prune": timed(plain, x), "effops": timed(ours, x),
                             "effops.ops": timed(_functional_sparse(ours), x)}, baseline="torch prune",
                            rounds=rounds, min_time=min_time, extra=dict(batch=batch))
    # Int8Linear against the fp32 nn.Linear it replaces and FBGEMM: where int8 loses to fp32, it saves
    # memory, not time (effops.quantize's default min_features follows these rows).
    for features in (192, 512, 1024):
        fp32, plain, ours = _int8_trio(features)
        for batch in (1, 16, 256):
            xi = torch.randn(batch, features)
            rows += compare("small_calls", "Int8Linear %dx%d inference batch=%d" % (features, features, batch),
                            {"torch dynamic int8 (FBGEMM)": _infer(plain, xi), "effops": _infer(ours, xi),
                             "fp32 nn.Linear": _infer(fp32, xi)},
                            baseline="torch dynamic int8 (FBGEMM)", rounds=rounds, min_time=min_time,
                            extra=dict(batch=batch))
    # The demo's block, and issue #16's small-call case (48 channels at 14x14, batch 1).
    for (cin, cout, size, stride), batch in [((24, 48, 32, 2), 1), ((24, 48, 32, 2), 64), ((48, 48, 14, 1), 1)]:
        plain, ours = _separable_pair(cin, cout, stride)
        x = torch.randn(batch, cin, size, size)
        for kind, timed in (("inference", _infer), ("training", _train)):
            rows += compare("small_calls", "SeparableConv2d %d->%d %dx%d s%d %s batch=%d"
                            % (cin, cout, size, size, stride, kind, batch),
                            {"torch conv pair": timed(plain, x), "effops": timed(ours, x),
                             "effops.ops": timed(_functional_separable(ours), x)},
                            baseline="torch conv pair", rounds=rounds, min_time=min_time, extra=dict(batch=batch))
    return rows
