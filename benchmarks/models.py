"""Benchmark models from their papers' layer tables, in plain PyTorch (torchvision does not import with
the CPU torch here). Each has the layer structure and parameter count of torchvision's / the reference
implementation, so the same fusion candidates as the published models:

    MobileNetV2 1.0 (Sandler et al. 2018, table 2)                     3,504,872 parameters
    MobileNetV3-Large (Howard et al. 2019, table 1)                    5,483,032
    MNASNet 1.0 (Tan et al. 2019; torchvision's mnasnet1_0, the B1     4,383,312
        search space: no squeeze-excitation; MnasNet-A1 with SE is 3.9M)
    EfficientNet-B0 (Tan & Le 2019, table 1)                           5,288,548
    ViT-B/32 (Dosovitskiy et al. 2021, table 1)                       88,224,232
    BERT-base encoder, no embeddings (Devlin et al. 2019)             85,054,464 (12 x 7,087,872)

Weights are random (torchvision's init); BatchNorms get non-trivial affine parameters and running
statistics measured on random images (`calibrate_batchnorm`), so folding them changes the weights as a
trained model's would and activations keep a realistic scale through the network.
"""
import math

import torch
from torch import nn

PARAMS = {"mobilenet_v2": 3_504_872, "mobilenet_v3_large": 5_483_032, "mnasnet1_0": 4_383_312,
          "efficientnet_b0": 5_288_548, "vit_b_32": 88_224_232, "bert_base_encoder": 85_054_464}


def _divisible(v, divisor=8):
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


def conv_bn_act(cin, cout, k, stride=1, groups=1, act=nn.ReLU6, eps=1e-5):
    """torchvision's Conv2dNormActivation: a plain Sequential [conv, BN, activation]."""
    layers = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(cout, eps=eps)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class SqueezeExcitation(nn.Module):
    """torchvision.ops.SqueezeExcitation: pool, 1x1 down, activation, 1x1 up, gate, scale."""

    def __init__(self, channels, squeeze, act=nn.ReLU, gate=nn.Hardsigmoid):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Conv2d(channels, squeeze, 1), nn.Conv2d(squeeze, channels, 1)
        self.activation, self.scale_activation = act(), gate()

    def forward(self, x):
        return x * self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))


class InvertedResidual(nn.Module):
    """expand 1x1 -> depthwise k x k -> [squeeze-excitation] -> project 1x1 (+ input when shapes allow)."""

    def __init__(self, cin, hidden, cout, k, stride, act=nn.ReLU6, se=None, eps=1e-5):
        super().__init__()
        layers = [conv_bn_act(cin, hidden, 1, act=act, eps=eps)] if hidden != cin else []
        layers.append(conv_bn_act(hidden, hidden, k, stride, groups=hidden, act=act, eps=eps))
        if se is not None:
            layers.append(se)
        layers.append(conv_bn_act(hidden, cout, 1, act=None, eps=eps))
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.block(x) if self.residual else self.block(x)


class ConvNet(nn.Module):
    def __init__(self, features, classifier):
        super().__init__()
        self.features, self.avgpool, self.classifier = features, nn.AdaptiveAvgPool2d(1), classifier

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def mobilenet_v2(num_classes=1000):
    # Table 2: (expansion t, output channels c, repeats n, first stride s)
    table = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
    layers, cin = [conv_bn_act(3, 32, 3, 2)], 32
    for t, c, n, s in table:
        for i in range(n):
            layers.append(InvertedResidual(cin, cin * t, c, 3, s if i == 0 else 1))
            cin = c
    layers.append(conv_bn_act(cin, 1280, 1))
    return _init(ConvNet(nn.Sequential(*layers), nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))))


def mobilenet_v3_large(num_classes=1000):
    # Table 1: (kernel, expanded, out, squeeze-excitation, activation, stride)
    RE, HS = nn.ReLU, nn.Hardswish
    table = [(3, 16, 16, False, RE, 1), (3, 64, 24, False, RE, 2), (3, 72, 24, False, RE, 1),
             (5, 72, 40, True, RE, 2), (5, 120, 40, True, RE, 1), (5, 120, 40, True, RE, 1),
             (3, 240, 80, False, HS, 2), (3, 200, 80, False, HS, 1), (3, 184, 80, False, HS, 1),
             (3, 184, 80, False, HS, 1), (3, 480, 112, True, HS, 1), (3, 672, 112, True, HS, 1),
             (5, 672, 160, True, HS, 2), (5, 960, 160, True, HS, 1), (5, 960, 160, True, HS, 1)]
    eps = 1e-3
    layers, cin = [conv_bn_act(3, 16, 3, 2, act=HS, eps=eps)], 16
    for k, exp, out, se, act, s in table:
        se = SqueezeExcitation(exp, _divisible(exp // 4)) if se else None
        layers.append(InvertedResidual(cin, exp, out, k, s, act=act, se=se, eps=eps))
        cin = out
    layers.append(conv_bn_act(cin, 6 * cin, 1, act=HS, eps=eps))
    head = nn.Sequential(nn.Linear(6 * cin, 1280), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(1280, num_classes))
    return _init(ConvNet(nn.Sequential(*layers), head))


def mnasnet1_0(num_classes=1000):
    # (kernel, stride, expansion, repeats, out): the stacks after the separable stem conv
    table = [(3, 2, 3, 3, 24), (5, 2, 3, 3, 40), (5, 2, 6, 3, 80), (3, 1, 6, 2, 96), (5, 2, 6, 4, 192),
             (3, 1, 6, 1, 320)]
    eps = 1e-5
    layers = [conv_bn_act(3, 32, 3, 2, act=nn.ReLU), conv_bn_act(32, 32, 3, groups=32, act=nn.ReLU),
              conv_bn_act(32, 16, 1, act=None)]
    cin = 16
    for k, s, t, n, out in table:
        for i in range(n):
            layers.append(InvertedResidual(cin, cin * t, out, k, s if i == 0 else 1, act=nn.ReLU, eps=eps))
            cin = out
    layers.append(conv_bn_act(cin, 1280, 1, act=nn.ReLU))
    return _init(ConvNet(nn.Sequential(*layers), nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))))


def efficientnet_b0(num_classes=1000):
    # Table 1: (expansion, kernel, stride, in, out, layers); squeeze-excitation in every MBConv,
    # squeezing to a quarter of the block's input channels; SiLU throughout.
    table = [(1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
             (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1)]
    layers = [conv_bn_act(3, 32, 3, 2, act=nn.SiLU)]
    for t, k, s, cin, out, n in table:
        for i in range(n):
            c = cin if i == 0 else out
            hidden = _divisible(c * t)
            se = SqueezeExcitation(hidden, max(1, c // 4), act=nn.SiLU, gate=nn.Sigmoid)
            layers.append(InvertedResidual(c, hidden, out, k, s if i == 0 else 1, act=nn.SiLU, se=se))
    layers.append(conv_bn_act(320, 1280, 1, act=nn.SiLU))
    return _init(ConvNet(nn.Sequential(*layers), nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))))


class EncoderBlock(nn.Module):
    """torchvision's ViT block: pre-norm nn.MultiheadAttention, pre-norm MLP (Linear, GELU, Linear)."""

    def __init__(self, dim, heads, mlp):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x):
        h = self.ln_1(x)
        x = x + self.self_attention(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class VisionTransformer(nn.Module):
    def __init__(self, image=224, patch=32, dim=768, depth=12, heads=12, mlp=3072, num_classes=1000):
        super().__init__()
        self.patch = patch
        self.conv_proj = nn.Conv2d(3, dim, patch, patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embedding = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.02)
        self.layers = nn.Sequential(*[EncoderBlock(dim, heads, mlp) for _ in range(depth)])
        self.ln = nn.LayerNorm(dim, eps=1e-6)
        self.heads = nn.Sequential()
        self.heads.add_module("head", nn.Linear(dim, num_classes))

    def forward(self, x):
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embedding
        return self.heads(self.ln(self.layers(x))[:, 0])


def vit_b_32(num_classes=1000):
    return _init(VisionTransformer(num_classes=num_classes))


def bert_base_encoder(depth=12):
    """BERT-base's encoder stack (post-norm, GELU, 768 / 12 heads / 3072), on embeddings given as input."""
    layer = nn.TransformerEncoderLayer(768, 12, 3072, dropout=0.1, activation="gelu", layer_norm_eps=1e-12,
                                       batch_first=True)
    return _init(nn.TransformerEncoder(layer, depth, enable_nested_tensor=False))


CNNS = {"mobilenet_v2": mobilenet_v2, "mobilenet_v3_large": mobilenet_v3_large, "mnasnet1_0": mnasnet1_0,
        "efficientnet_b0": efficientnet_b0}
TRANSFORMERS = {"vit_b_32": vit_b_32, "bert_base_encoder": bert_base_encoder}
MODELS = {**CNNS, **TRANSFORMERS}


def example_input(name, batch, seq=128):
    """A batch for `name`: 224 x 224 images, or `seq` tokens of BERT-base embeddings."""
    if name == "bert_base_encoder":
        return torch.randn(batch, seq, 768)
    return torch.randn(batch, 3, 224, 224)


def _init(model):
    """torchvision's init: kaiming-normal convs (fan out), N(0, 0.01) linears, zero biases; then random
    BatchNorm affine parameters (as trained ones are, not the identity)."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1] // m.groups
            with torch.no_grad():
                m.weight.normal_(0, math.sqrt(2.0 / fan_out), generator=g)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            with torch.no_grad():
                m.weight.normal_(0, 0.01 if m.out_features == 1000 else 1 / math.sqrt(m.in_features), generator=g)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.1, generator=g)
    return model


@torch.no_grad()
def calibrate_batchnorm(model, batches=2, batch=8, size=224):
    """Running statistics measured on random images (train-mode passes with a cumulative average), so
    that every BatchNorm holds the mean and variance of the activations it sees; returns model.eval()."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if not bns:
        return model.eval()
    g = torch.Generator().manual_seed(1)
    momenta = [m.momentum for m in bns]
    model.train()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the calibration batches
    for _ in range(batches):
        model(torch.randn(batch, 3, size, size, generator=g))
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    return model.eval()


def count_params(model):
    return sum(p.numel() for p in model.parameters())
