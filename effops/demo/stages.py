"""The two pipelines the demo runs side by side, stage by stage, on the same schedule.

effops: plain module tree + effops.optim.AdamW (BatchNorm by batch statistics: nothing to fuse) ->
        BatchNorm frozen, blocks fused in train mode (effops.nn.InvertedResidual's training step) +
        effops.GradualPruner on the classifier head (SparseLinear, masked_linear) -> effops.quantize
        (Int8Linear). Inference in every stage: effops.fuse on an eval-mode copy.
plain:  the same modules + torch.optim.AdamW -> BatchNorm frozen + torch.nn.utils.prune (l1 magnitude
        masks re-applied on the same cubic schedule) on the same layers -> torch.ao dynamic int8
        quantization of the same Linears.

An effops piece that this build lacks (ImportError) makes its stage raise Unavailable; the demo
reports that stage as not available, it never substitutes something else under the effops name.
"""
import warnings

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from effops.demo import models


class Unavailable(Exception):
    """A stage cannot run in this build or on this device; the message says why."""


def _effops(what, fn):
    try:
        return fn()
    except ImportError as exc:
        raise Unavailable("%s not available in this build (%s: %s)" % (what, type(exc).__name__, exc)) from None


class PruneSchedule:
    """Zhu & Gupta's cubic ramp: sparsity(t) = target * (1 - (1 - t / end)^3) for t <= end, re-masking
    every `every` optimizer steps, then fine-tuning at the target for the remaining steps."""

    def __init__(self, target, total_steps, every=None):
        self.target = float(target)
        self.end = max(1, int(total_steps * 0.7))
        self.every = every or max(1, self.end // 10)

    def sparsity_at(self, step):
        t = min(step, self.end) / self.end
        return self.target * (1.0 - (1.0 - t) ** 3)

    def updates_at(self, step):
        return step <= self.end and (step % self.every == 0 or step == self.end)


class Pipeline:
    """One side of the comparison. Subclasses build the model and do each stage's transform."""
    name = ""

    def __init__(self, cfg):
        self.cfg = cfg
        self.pruned_layers = []  # names of the layers pruned, for the table's note

    def to_device(self, model):
        return model.to(self.cfg.device)


class EffopsPipeline(Pipeline):
    name = "effops"

    def build(self, num_classes):
        model = _effops("effops.nn.InvertedResidual", lambda: models.effops_model(num_classes, self.cfg.width,
                                                                                   seed=self.cfg.seed))
        return self.to_device(model)

    def inference_model(self, model):
        """The form inference runs: effops.fuse on an eval-mode copy (each block one InvertedResidual, its
        BatchNorms folded in); the model itself once quantize has made it that form."""
        if getattr(model, "effops_inference_form", False) or not self.fuses():
            return model
        import copy

        import effops
        fuse = _effops("effops.fuse", lambda: effops.fuse)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # nothing left to fuse in an already fused model
            return fuse(copy.deepcopy(model).eval())

    def prepare_finetune(self, model):
        """BatchNorm frozen and the blocks fused in train mode (models.fuse_for_frozen_bn_training): the
        fine-tuning steps run the fused op. New Parameters: the optimizer is made after this."""
        if not self.fuses():
            self.fused_blocks = 0
            return models.freeze_batchnorm(model)
        model, report = _effops("effops.fuse", lambda: models.fuse_for_frozen_bn_training(model))
        self.fused_blocks = len(report.changed)
        return self.to_device(model)

    def fuses(self):
        """Whether this side fuses the blocks (always: under --amp the fused op casts as torch's
        convolutions do)."""
        return True

    def optimizer(self, params, lr):
        name = "AdamW8bit" if getattr(self.cfg, "optimizer", "adamw") == "adamw8bit" else "AdamW"
        cls = _effops("effops.optim." + name, lambda: getattr(__import__("effops.optim", fromlist=[name]), name))
        return cls(params, lr=lr, weight_decay=self.cfg.weight_decay)

    def start_pruning(self, model, schedule, optimizer):
        """effops.GradualPruner on the model's Linear and 1x1-conv layers (SparseLinear / SparseConv1x1,
        swapped in place with the same Parameter objects, so `optimizer` keeps working); it re-masks
        from an optimizer step hook. Returns (model, None): no extra per-step callback."""
        import effops
        GradualPruner = _effops("effops.GradualPruner", lambda: effops.GradualPruner)
        GradualPruner(model, schedule.target, end_step=schedule.end, frequency=schedule.every,
                      pattern="unstructured", scope=self.cfg.prune_scope, optimizer=optimizer,
                      exclude=_dense_parts(model))
        self.pruned_layers = [n for n, m in model.named_modules() if isinstance(getattr(m, "mask", None), torch.Tensor)]
        return model, None

    def prune_structure(self, model):
        """The pruned model's structure (masked layers) on a fresh model, to load a checkpoint into."""
        import effops
        prune = _effops("effops.prune", lambda: effops.prune)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the layers left dense are the ones excluded on purpose
            return self.to_device(prune(model, self.cfg.sparsity, pattern="unstructured", scope=self.cfg.prune_scope,
                                        exclude=_dense_parts(model)))

    def quantize(self, model):
        """Pruned layers made dense again (zeros kept: SparseLinear.to_linear, SparseConv1x1.to_conv), the
        model in eval mode (its blocks fused since fine-tuning), then effops.quantize on the Linear layers of
        at least 128 features (-> Int8Linear). Its default (512 to 1024 features by instruction set) would
        leave this small model alone: here int8 saves memory, not time."""
        import effops
        quantize = _effops("effops.quantize", lambda: effops.quantize)
        for name, m in list(model.named_modules()):
            # Inference needs no masks: pruned layers become dense layers holding the zeros.
            if hasattr(m, "mask") and hasattr(m, "to_linear"):
                _set_submodule(model, name, m.to_linear())
            elif hasattr(m, "mask") and hasattr(m, "to_conv"):
                _set_submodule(model, name, m.to_conv())
        model = self.inference_model(model.eval())  # a copy: the training form stays as it was
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the 10-way head stays float, as min_features says
            model = quantize(model, min_features=128)
        model.effops_inference_form = True
        return self.to_device(model)

    def int8_layers(self, model):
        return [n for n, m in model.named_modules() if type(m).__name__ == "Int8Linear"]


class PlainPipeline(Pipeline):
    name = "plain"
    quantized_layers = None  # names given to quantize (the layers effops quantized), None: every Linear

    def build(self, num_classes):
        return self.to_device(models.plain_model(num_classes, self.cfg.width, seed=self.cfg.seed))

    def optimizer(self, params, lr):
        return torch.optim.AdamW(params, lr=lr, weight_decay=self.cfg.weight_decay)

    def inference_model(self, model):
        return model

    def prepare_finetune(self, model):
        """BatchNorm frozen, as on the effops side (its running statistics and affine kept)."""
        return models.freeze_batchnorm(model)

    def start_pruning(self, model, schedule, optimizer, layer_names):
        """torch.nn.utils.prune on `layer_names`, re-applied as l1 magnitude masks on the schedule
        (over all the layers' weights together for --prune-scope global, else per layer)."""
        layers = [model.get_submodule(n) for n in layer_names]
        self.pruned_layers = list(layer_names)
        state = {"step": 0}

        def mask_to(sparsity):
            for m in layers:
                if torch_prune.is_pruned(m):
                    torch_prune.remove(m, "weight")  # weight = weight_orig * mask, same Parameter object
            # Already-pruned weights are zero, the smallest magnitudes: masks only grow.
            if self.cfg.prune_scope == "global":
                total = sum(m.weight.numel() for m in layers)
                torch_prune.global_unstructured([(m, "weight") for m in layers], torch_prune.L1Unstructured,
                                                amount=int(round(sparsity * total)))
            else:
                for m in layers:
                    torch_prune.l1_unstructured(m, "weight", amount=int(round(sparsity * m.weight.numel())))

        mask_to(0.0)

        def on_step():
            state["step"] += 1
            if schedule.updates_at(state["step"]):
                with torch.no_grad():
                    mask_to(schedule.sparsity_at(state["step"]))

        return model, on_step

    def prune_structure(self, model):
        for n in self.pruned_layers:
            torch_prune.identity(model.get_submodule(n), "weight")
        return model

    def quantize(self, model, layers=None):
        """torch.ao dynamic int8 quantization of `layers` (names; default every Linear)."""
        if torch.device(self.cfg.device).type != "cpu":
            raise Unavailable("torch's dynamic int8 quantization runs on CPU only")
        for n in self.pruned_layers:
            m = model.get_submodule(n)
            if torch_prune.is_pruned(m):
                torch_prune.remove(m, "weight")
        if layers is not None:
            self.quantized_layers = list(layers)
        spec = {nn.Linear} if self.quantized_layers is None else set(self.quantized_layers)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notices
            return torch.ao.quantization.quantize_dynamic(model, spec, dtype=torch.qint8)

    def int8_layers(self, model):
        return [n for n, m in model.named_modules() if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)]


def _set_submodule(model, name, module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _dense_parts(model):
    """The children effops' pruning leaves alone: every one outside models.prunable_layers (the head)."""
    head = set(models.prunable_layers(model))
    return [n for n, m in model.named_children()
            if n not in head and any(isinstance(c, (nn.Linear, nn.Conv2d)) for c in m.modules())]


def plain_layer_names(effops_pruned, plain_model):
    """The plain model's layers matching those effops pruned."""
    wanted = set(effops_pruned)
    return [n for n in models.prunable_layers(plain_model) if n in wanted]
