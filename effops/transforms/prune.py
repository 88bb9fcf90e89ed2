"""Magnitude pruning into SparseLinear, at once (`prune`) or gradually during training (`GradualPruner`).

    model = effops.prune(model, 0.9, pattern="block", block_size=32)          # one shot
    pruner = effops.GradualPruner(model, 0.9, end_step=1000, pattern="block",
                                  optimizer=opt)                              # ramp 0 -> 90%
    for batch in data: loss(model(batch)).backward(); opt.step()             # the hook re-masks

Scores are weight magnitudes: |w| per weight ("unstructured"), the mean |w| of each b x b block
("block"), the two largest |w| of every 4 consecutive inputs ("2:4"). scope="layer" prunes each layer
to `sparsity`; scope="global" ranks all layers' scores together (layers end up with different
sparsities, the model with `sparsity`). Linear layers, 1x1 convolutions (linear over channels) and
nn.MultiheadAttention's projections are pruned; modules are swapped in place, reusing their Parameter
objects, so an optimizer built before pruning keeps working (for 1x1 convs too: SparseConv1x1 keeps the
conv's 4-D weight; SparseMultiheadAttention keeps in_proj_weight as its in_proj's weight).
An attention's in-projection is scored as its three (E, E) parts, q, k and v, each pruned like a layer
of its own (as the separate q / k / v Linears of other models are), unless block_size does not divide E.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from effops.nn.inverted_residual import InvertedResidual
from effops.nn.sparse_attention import SparseMultiheadAttention, unsupported_reason
from effops.nn.sparse_linear import SparseConv1x1, SparseLinear, is_pointwise_conv
from effops.ops import _checks
from effops.transforms import _report

PATTERNS = ("unstructured", "block", "2:4")


def prune(model, sparsity, pattern="unstructured", block_size=32, scope="layer", *, exclude=(),
          return_report=False):
    """Prune the Linear and 1x1-conv layers and the attention projections of `model` by magnitude; returns
    `model` (changed in place), or (model, TransformReport) with return_report=True.

    sparsity: fraction of weights (blocks for "block") to remove, in [0, 1]; "2:4" needs 0.5. Below 1,
    every layer keeps at least one weight (block), even where rounding or the global ranking would
    remove it all.
    exclude: module names or fnmatch patterns (e.g. "head" or "blocks.*.out") left dense, each with
    everything under it (effops.transforms._report).
    nn.MultiheadAttention becomes effops.nn.SparseMultiheadAttention (in- and out-projection pruned;
    excluding "<attention>.out_proj" keeps that one dense); nn.TransformerEncoderLayer / Encoder holding
    one get their native fast paths turned off (they would read the weights themselves).
    Left dense, and reported with a warning: a layer whose weight another module reads directly, where
    a mask could not be enforced (the out_proj of an nn.MultiheadAttention left dense: attention reads
    out_proj.weight itself; a weight tied to another module's, such as an LM head sharing the
    embedding's), attention SparseMultiheadAttention does not take (kdim / vdim, add_bias_kv,
    add_zero_attn, subclasses), and subclasses of nn.Linear / nn.Conv2d (a SparseLinear would drop their
    own forward). 1x1 convs with a stride, padding, dilation or groups are reported, not warned about.
    Layers already sparse are re-pruned from their current weights (pruned weights are zero, so
    they stay pruned when sparsity does not decrease).
    """
    report = _prune(model, sparsity, pattern, block_size, scope, exclude)
    _report.warn_unmatched(model, _report.exclude_patterns(exclude), "prune")
    return _report.finish(model, report, return_report, quiet_reasons=(_report.EXCLUDED, _NOT_POINTWISE))


def _prune(model, sparsity, pattern, block_size, scope, exclude):
    _check_args(sparsity, pattern, block_size, scope)
    _report.check_model(model)
    exclude = _report.exclude_patterns(exclude)
    report = _report.TransformReport("prune")
    targets = _targets(model, exclude, report)
    if not targets:
        return report
    pieces = [_scored(m, dense_out, pattern, block_size) for _, m, dense_out in targets]
    flat = _masks([w for ws in pieces for w in ws], sparsity, pattern, block_size, scope)
    hint = dict(pattern=pattern, block_size=block_size if pattern == "block" else None)
    swapped = []
    for (places, module, dense_out), ws in zip(targets, pieces):
        mask, flat = flat[:len(ws)], flat[len(ws):]
        if isinstance(module, (nn.MultiheadAttention, SparseMultiheadAttention)):
            new = _prune_attention(module, mask, dense_out, hint)
            what = "SparseMultiheadAttention (in_proj density %.3f, out_proj %s)" % (
                new.in_proj.density, "dense" if dense_out else "density %.3f" % new.out_proj.density)
        elif isinstance(module, (SparseLinear, SparseConv1x1)):
            module.pattern, module.block_size = hint["pattern"], hint["block_size"]
            module.set_mask(mask[0])
            new = module
        elif isinstance(module, nn.Linear):
            new = SparseLinear.from_linear(module, mask[0], **hint)
        else:
            new = SparseConv1x1.from_conv(module, mask[0], **hint)
        if not isinstance(new, SparseMultiheadAttention):
            what = "%s (density %.3f)" % (type(new).__name__, new.density)
        for parent, name, _ in places:  # a module registered in several places is swapped in each
            setattr(parent, name, new)
        report.changed.append((places[0][2], what))
        swapped += [full for _, _, full in places]
    _report.keep_fast_path_off(model, swapped)
    _attention_fast_paths_off(model)
    return report


def _check_args(sparsity, pattern, block_size, scope):
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError("sparsity must be a number in [0, 1], got %r" % (sparsity,))
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError("sparsity must be in [0, 1], got %r" % (sparsity,))
    _checks.choice("pattern", pattern, PATTERNS)
    _checks.choice("scope", scope, ("layer", "global"))
    if pattern == "block":
        _checks.choice("block_size", block_size, (16, 32, 64))
    if pattern == "2:4" and sparsity != 0.5:
        raise ValueError("pattern='2:4' keeps 2 of every 4 weights: sparsity must be 0.5, got %r" % (sparsity,))


def _targets(model, exclude, report):
    """[(places, module)] to prune, places = [(parent, child name, qualified name)]; the candidates left
    alone go to report.skipped with the reason."""
    owners = {}  # id(parameter) -> [(id(module), qualified name)] of the distinct modules holding it
    for qual, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), []).append((id(module), "%s.%s" % (qual, pname) if qual else pname))
    found, skipped = {}, set()
    for qual, module in model.named_modules():
        for name, child in module._modules.items():  # not named_children(): it lists a repeated child once
            full = "%s.%s" % (qual, name) if qual else name
            if child is None or not _is_candidate(child) or id(child) in skipped:
                continue
            if id(child) in found:
                found[id(child)][0].append((module, name, full))
                continue
            if _is_attention(module) and id(module) in found:  # its projections go with it
                if name == "out_proj" and found[id(module)][2]:
                    skipped.add(id(child))
                    report.skipped.append((full, _report.EXCLUDED))
                continue
            why = _report.EXCLUDED if _report.excluded(full, exclude) else _why_dense(module, name, child, owners)
            if why:
                skipped.add(id(child))
                report.skipped.append((full, why))
            else:  # (places, module, whether an attention's out_proj stays dense: excluded by name)
                found[id(child)] = ([(module, name, full)], child,
                                    _is_attention(child) and _report.excluded(full + ".out_proj", exclude))
    return list(found.values())


_NOT_POINTWISE = "1x1 conv with stride, padding, dilation, groups or padding mode SparseConv1x1 does not take"


def _is_candidate(module):
    return (isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1))
            or _is_attention(module))


def _is_attention(module):
    return isinstance(module, (nn.MultiheadAttention, SparseMultiheadAttention))


def _why_dense(parent, name, module, owners):
    """None if `module` (parent's child `name`) can become a SparseLinear / SparseConv1x1 /
    SparseMultiheadAttention, else why not."""
    if isinstance(module, nn.MultiheadAttention):
        why = (("%s is a subclass of nn.MultiheadAttention: SparseMultiheadAttention would replace its own "
                "forward" % type(module).__name__) if type(module) is not nn.MultiheadAttention
               else unsupported_reason(module))
        if why:
            return "SparseMultiheadAttention does not take it (%s): left dense" % why
        others = [where for param in (module.in_proj_weight, module.out_proj.weight)
                  for owner, where in owners.get(id(param), [])
                  if owner not in (id(module), id(module.out_proj))]
        if others:
            return ("its projection weights are tied to %s: that module would read the pruned weights "
                    "unmasked and its gradients would revive them" % ", ".join(others))
        return None
    if isinstance(module, SparseMultiheadAttention):
        return None
    if isinstance(parent, nn.MultiheadAttention) and name == "out_proj":
        return ("nn.MultiheadAttention reads out_proj.weight directly (F.multi_head_attention_forward), "
                "so a mask there would not be enforced: left dense with its attention module")
    if isinstance(parent, InvertedResidual):
        return ("effops.nn.InvertedResidual reads its convs' weights itself (packed for the fused op), so a "
                "mask there would not be enforced: left dense (prune before effops.fuse to prune the model)")
    if type(module) not in (nn.Linear, nn.Conv2d, SparseLinear, SparseConv1x1):
        return "%s is a subclass of %s: a sparse module would replace its own forward" % (
            type(module).__name__, "nn.Linear" if isinstance(module, nn.Linear) else "nn.Conv2d")
    if isinstance(module, nn.Conv2d) and not isinstance(module, SparseConv1x1) and not is_pointwise_conv(module):
        return _NOT_POINTWISE
    others = [where for owner, where in owners.get(id(module.weight), []) if owner != id(module)]
    if others:
        return ("its weight is tied to %s: that module would read the pruned weights unmasked and its "
                "gradients would revive them" % ", ".join(others))
    return None


def _weight2d(module):
    w = module.weight.detach()
    return w.reshape(w.shape[0], math.prod(w.shape[1:]))  # not -1: a layer with no outputs has 0 elements


def _scored(module, dense_out, pattern, block_size):
    """The weights to score for one target: its own, or an attention's in-projection parts and out_proj."""
    if not _is_attention(module):
        return [_weight2d(module)]
    w = module.in_proj_weight.detach()
    e = module.embed_dim
    # q, k and v pruned as three layers, unless blocks would straddle their boundaries
    parts = list(w.split(e)) if pattern != "block" or e % block_size == 0 else [w]
    return parts + ([] if dense_out else [_weight2d(module.out_proj)])


def _prune_attention(module, masks, dense_out, hint):
    """`module` (nn.MultiheadAttention or SparseMultiheadAttention) with `masks` (in-projection parts,
    then out_proj's unless dense_out) applied: a new SparseMultiheadAttention, or the same one re-masked."""
    e = module.embed_dim
    parts = 3 if masks[0].shape[0] == e else 1  # (scored as q, k, v, or whole)
    in_mask = torch.cat(masks[:parts]) if parts == 3 else masks[0]
    out_mask = None if dense_out else masks[parts]
    if isinstance(module, nn.MultiheadAttention):
        return SparseMultiheadAttention.from_mha(module, (in_mask, out_mask), **hint)
    for name, mask in (("in_proj", in_mask), ("out_proj", out_mask)):
        layer = getattr(module, name)
        if mask is None:  # excluded by name: left as it is, as prune leaves an excluded layer
            continue
        if isinstance(layer, SparseLinear):
            layer.pattern, layer.block_size = hint["pattern"], hint["block_size"]
            layer.set_mask(mask)
        else:  # left dense before (excluded by name), pruned now
            setattr(module, name, SparseLinear.from_linear(layer, mask, **hint))
    return module


def _attention_fast_paths_off(model):
    """nn.TransformerEncoderLayer and nn.TransformerEncoder run native kernels in eval mode that read
    self_attn.in_proj_weight themselves (the same values, but never the sparse kernels), and the encoder
    hands its layers nested tensors, which SparseMultiheadAttention does not take: turn both off where
    a layer's self_attn is sparse (the layer's as _report.keep_fast_path_off does, by a no-op hook)."""
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoder) and any(
                isinstance(getattr(layer, "self_attn", None), SparseMultiheadAttention) for layer in module.layers):
            module.use_nested_tensor = False
        if isinstance(module, nn.TransformerEncoderLayer) and isinstance(module.self_attn, SparseMultiheadAttention) \
                and not any(h is _report._fast_path_off for h in module._forward_pre_hooks.values()):
            module.register_forward_pre_hook(_report._fast_path_off)


def _block_scores(w, b):
    """Mean |w| of each b x b block (edge blocks averaged over their valid entries)."""
    n, k = w.shape
    nb, kb = -(-n // b), -(-k // b)
    pad = (0, kb * b - k, 0, nb * b - n)
    total = F.pad(w.abs().float(), pad).view(nb, b, kb, b).sum(dim=(1, 3))
    count = F.pad(torch.ones_like(w, dtype=torch.float32), pad).view(nb, b, kb, b).sum(dim=(1, 3))
    return total / count


def _expand_blocks(kept, b, shape):
    return kept.repeat_interleave(b, 0).repeat_interleave(b, 1)[: shape[0], : shape[1]].contiguous()


def _keep_top(scores, sparsity):
    """Bool mask keeping the round((1 - sparsity) * n) largest scores (exact count, ties broken by order)."""
    flat = scores.flatten()
    keep = int(round((1.0 - sparsity) * flat.numel()))
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if keep > 0:
        mask[torch.topk(flat, keep, sorted=False).indices] = True
    return mask.view_as(scores)


def _keep_best(kept, scores):
    kept = kept.clone()
    kept.view(-1)[scores.flatten().argmax()] = True
    return kept


def _two_of_four(w):
    n, k = w.shape
    groups = F.pad(w.abs().float(), (0, -k % 4)).view(n, -1, 4)
    top = torch.topk(groups, 2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
    return mask.view(n, -1)[:, :k].contiguous()


def _masks(weights, sparsity, pattern, block_size, scope):
    if pattern == "2:4":
        return [_two_of_four(w) for w in weights]
    scores = [_block_scores(w, block_size) if pattern == "block" else w.abs().float() for w in weights]
    if scope == "layer":
        kept = [_keep_top(s, sparsity) for s in scores]
    else:
        joint = _keep_top(torch.cat([s.flatten() for s in scores]), sparsity)
        kept = list(joint.split([s.numel() for s in scores]))
        kept = [k.view_as(s) for k, s in zip(kept, scores)]
    if sparsity < 1.0:
        # A layer keeps at least its best weight (block): rounding (64 x 64 in 32-blocks at 90% keeps
        # round(0.4) = 0 of 4 blocks) or a global ranking would otherwise cut it off entirely, leaving an
        # output of its bias alone (a classifier head reduced to a constant), which no sparsity asks for.
        kept = [k if k.numel() == 0 or k.device.type == "meta" or k.any() else _keep_best(k, s)
                for k, s in zip(kept, scores)]  # (meta: no values; its mask comes with a state_dict)
    if pattern == "block":
        return [_expand_blocks(k, block_size, w.shape) for k, w in zip(kept, weights)]
    return kept


class GradualPruner:
    """Ramps sparsity from `initial_sparsity` to `target_sparsity` between begin_step and end_step
    on the cubic schedule of Zhu & Gupta (2017), "To prune, or not to prune":

        s_t = s_f + (s_i - s_f) * (1 - (t - t_0) / (t_end - t_0))^3

    re-pruning every `frequency` steps. Call `step()` once after each optimizer step, or pass
    `optimizer` and it is called for you (an optimizer step post-hook; steps GradScaler skipped are not
    counted, so pass the optimizer GradScaler steps, not a wrapper around it). Each step puts the pruned
    weights back to exactly zero (momentum or Adam state could move them after a mask change) and,
    when the mask changes, clears the optimizer state of newly pruned weights.
    The model's Linear / 1x1-conv layers and nn.MultiheadAttention become SparseLinear / SparseConv1x1 /
    SparseMultiheadAttention at construction.
    """

    def __init__(self, model, target_sparsity, *, end_step, begin_step=0, frequency=1, initial_sparsity=0.0,
                 pattern="unstructured", block_size=32, scope="layer", exclude=(), optimizer=None):
        if pattern == "2:4":
            raise ValueError("GradualPruner ramps a sparsity: use pattern 'unstructured' or 'block' "
                             "(2:4 is a fixed 50%% pattern: use prune(model, 0.5, pattern='2:4'))")
        _check_args(target_sparsity, pattern, block_size, scope)
        _check_args(initial_sparsity, pattern, block_size, scope)
        for name, value in (("begin_step", begin_step), ("end_step", end_step), ("frequency", frequency)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError("%s must be an int, got %r" % (name, value))
        if begin_step < 0 or end_step <= begin_step:
            raise ValueError("need 0 <= begin_step < end_step, got begin_step=%d end_step=%d" % (begin_step, end_step))
        if frequency < 1:
            raise ValueError("frequency must be >= 1, got %d" % frequency)
        self.model, self.optimizer = model, optimizer
        self.target, self.initial = float(target_sparsity), float(initial_sparsity)
        self.begin, self.end, self.frequency = begin_step, end_step, frequency
        self._prune_args = dict(pattern=pattern, block_size=block_size, scope=scope, exclude=exclude)
        self.step_count = 0
        self.current_sparsity = self.sparsity_at(0)
        # Warns as prune does, once; `report` says which layers stayed dense and why.
        _, self.report = prune(model, self.current_sparsity, **self._prune_args, return_report=True)
        self._hook = None
        if optimizer is not None:
            self._hook = optimizer.register_step_post_hook(self._after_optimizer_step)

    def _after_optimizer_step(self, optimizer, args, kwargs):
        # A step GradScaler skipped (inf/NaN gradients) is not a step of the schedule: GradScaler hands
        # optimizers that unscale themselves (effops' Adam, torch's fused ones) `found_inf` as an
        # attribute for the duration of step(), and calls step() even when it is set.
        found_inf = getattr(optimizer, "found_inf", None)
        if isinstance(found_inf, torch.Tensor) and found_inf.item() != 0:
            return
        self.step()

    def state_dict(self):
        """The schedule's position, to save beside the model and optimizer (the masks are in the model)."""
        return {"step_count": self.step_count, "current_sparsity": self.current_sparsity}

    def load_state_dict(self, state):
        """Resume the schedule where state_dict() left it (load the model's state_dict too: its masks)."""
        if not isinstance(state, dict) or set(state) != {"step_count", "current_sparsity"}:
            raise ValueError("state must be a GradualPruner.state_dict(), got %r" % (state,))
        self.step_count, self.current_sparsity = int(state["step_count"]), float(state["current_sparsity"])

    def sparsity_at(self, step):
        """The scheduled sparsity at `step`."""
        if step <= self.begin:
            return self.initial
        if step >= self.end:
            return self.target
        frac = (step - self.begin) / (self.end - self.begin)
        return self.target + (self.initial - self.target) * (1.0 - frac) ** 3

    def sparse_modules(self):
        return [m for m in self.model.modules() if isinstance(m, (SparseLinear, SparseConv1x1))]

    @torch.no_grad()
    def step(self):
        """Advance one step: re-prune if the schedule says so, then re-zero pruned weights."""
        self.step_count += 1
        t = self.step_count
        due = self.begin <= t <= self.end and ((t - self.begin) % self.frequency == 0 or t == self.end)
        if due:
            s = self.sparsity_at(t)
            if s != self.current_sparsity:
                _prune(self.model, s, **self._prune_args)
                self.current_sparsity = s
                self._clear_pruned_state()
        for module in self.sparse_modules():
            module.apply_mask_()

    def _clear_pruned_state(self):
        if self.optimizer is None:
            return
        for module in self.sparse_modules():
            keep = module.mask.view(module.weight.shape[0], -1)
            for param in (module.weight,):
                for value in self.optimizer.state.get(param, {}).values():
                    if isinstance(value, torch.Tensor) and value.shape == param.shape:
                        value.view(param.shape[0], -1).mul_(keep.to(value.dtype))

    def remove(self):
        """Detach from the optimizer (masks stay)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
