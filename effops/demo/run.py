"""The demo's course: train -> prune while fine-tuning -> int8, for effops and plain PyTorch in turn
on the same batches, each stage evaluated on the test split and timed."""
import contextlib
import os
import time
import warnings

import torch

from effops.demo import data as data_mod
from effops.demo import distributed, metrics, models, stages, train

STAGES = ("train", "prune", "int8")


class _Side:
    """The state of one pipeline across stages."""

    def __init__(self, pipeline):
        self.pipeline = pipeline
        self.name = pipeline.name
        self.model = None
        self.unavailable = None  # why this side stopped (then every later stage is unavailable too)
        self.loss = []           # (global step, loss)
        self.acc = []            # (global step, test accuracy, stage)
        self.step = 0
        self.step_ms = {}        # stage -> [ms per optimizer step]
        self.optimizer = {}      # stage -> the optimizer that trained it


class Demo:
    def __init__(self, cfg):
        self.cfg = cfg
        self.rank, self.world, self.device = distributed.setup(cfg.device)
        cfg.device = str(self.device)
        torch.manual_seed(cfg.seed)
        self.data = data_mod.load(cfg.data, seed=cfg.seed)
        if cfg.train_subset:
            self.data.x_train = self.data.x_train[:cfg.train_subset]
            self.data.y_train = self.data.y_train[:cfg.train_subset]
        self.num_classes = len(self.data.classes)
        self.sides = [_Side(stages.EffopsPipeline(cfg)), _Side(stages.PlainPipeline(cfg))]
        self.rows, self.notes, self.backends_used, self.checkpoints = [], [], {}, []
        # An optimizer step takes batch_size samples in all: accum micro-batches on each of the world
        # ranks. The schedule (steps, samples per step) is the same in one process and under DDP.
        self.micro_batch = max(1, cfg.batch_size // (cfg.accum * self.world))

    # -- helpers ---------------------------------------------------------------------------------
    def log(self, *args):
        if self.rank == 0:
            print(*args, flush=True)

    def active(self):
        return [s for s in self.sides if s.unavailable is None]

    def _try(self, side, stage, fn):
        """fn() for one side; on Unavailable the side stops and every later stage says why."""
        try:
            return fn()
        except stages.Unavailable as exc:
            side.unavailable = (stage, str(exc))
            self.log("[%s] %s stage: %s" % (side.name, stage, exc))
            return None

    def steps_per_epoch(self):
        n = len(self.data.y_train)
        batches = len(train.epoch_batches(n, self.micro_batch, 0, self.cfg.seed, self.rank, self.world))
        return -(-batches // self.cfg.accum)

    # -- stages ----------------------------------------------------------------------------------
    def optimizers(self, stage, lr):
        """{side name: a fresh optimizer} for every active side (effops.optim.AdamW / torch's)."""
        opts = {}
        for side in self.active():
            opt = self._try(side, stage, lambda: side.pipeline.optimizer(side.model.parameters(), lr))
            if opt is not None:
                opts[side.name] = opt
        return opts

    def train_stage(self, stage, epochs, opts, on_steps):
        """Train every active side for `epochs` epochs on the same batches, sides alternating per
        epoch so that machine noise hits both alike. on_steps: {side name: callback after each step}."""
        wrapped = {s.name: distributed.wrap(s.model, self.device) for s in self.active()}
        sides = self.active()
        x, y = self.data.x_train, self.data.y_train
        # The lr schedule runs over this stage's steps (warm-up and decay per stage, as per optimizer).
        scheds = {name: train.lr_scheduler(opt, epochs * self.steps_per_epoch(), self.cfg.lr_schedule)
                  for name, opt in opts.items()}
        total = epochs * self.steps_per_epoch() * len(sides)
        with _progress(total, "%-5s" % stage, self.rank == 0 and self.cfg.progress) as bar:
            for epoch in range(epochs):
                batches = train.epoch_batches(len(y), self.micro_batch, epoch + 1000 * STAGES.index(stage),
                                              self.cfg.seed, self.rank, self.world)
                for side in sides:
                    side.optimizer[stage] = opts[side.name]
                    times = side.step_ms.setdefault(stage, [])
                    for micro in train.optimizer_steps(batches, self.cfg.accum):
                        loss, ms = train.timed_train_step(wrapped[side.name], opts[side.name], x, y, micro,
                                                          device=self.device, amp=self.cfg.amp,
                                                          on_step=on_steps.get(side.name))
                        scheds[side.name].step()
                        side.step += 1
                        side.loss.append((side.step, loss))
                        times.append(ms)
                        bar.update(1)
                        bar.set_postfix_str("%s loss %.3f" % (side.name, loss))
                    acc = train.accuracy(side.model, self.data.x_test, self.data.y_test, device=self.device,
                                         amp=self.cfg.amp)
                    side.acc.append((side.step, acc, stage))

    def finish_stage(self, stage):
        """Evaluate, time inference (sides interleaved), count, save and reload; one row per side."""
        x_test, y_test = self.data.x_test, self.data.y_test
        batch = x_test[:self.cfg.infer_batch]
        # Inference runs each side's inference form (effops: the fused eval-mode copy); counts and bytes are
        # those of the model as trained and saved.
        live = {}
        for s in self.active():
            m = self._try(s, stage, lambda: s.pipeline.inference_model(s.model))
            if m is not None:
                live[s.name] = m
        # int8 inference is its own precision: no bf16 autocast around it (torch.ao's int8 Linear
        # takes fp32 only).
        amp = self.cfg.amp and stage != "int8"
        infer = train.inference_ms(live, batch, device=self.device, amp=amp) if live else {}
        for side in self.sides:
            row = dict(stage=stage, impl=side.name)
            if side.unavailable is not None:
                row.update(available=False, note=side.unavailable[1] if side.unavailable[0] == stage
                           else "not run: %s stage unavailable" % side.unavailable[0])
                self.rows.append(row)
                continue
            acc = train.accuracy(live[side.name], x_test, y_test, device=self.device, amp=amp)
            nonzero, total = metrics.count_params(side.model)
            row.update(available=True, accuracy=acc, nonzero_params=nonzero, total_params=total,
                       model_bytes=metrics.checkpoint_bytes(side.model),
                       train_ms_per_step=train.median_step_ms(side.step_ms.get(stage, [])),
                       infer_ms_per_batch=infer[side.name], infer_batch=len(batch),
                       optimizer_bytes_per_param=_state_bytes_per_param(side.optimizer.get(stage)),
                       ranks_agree=distributed.all_equal(acc))
            if self.cfg.out and self.rank == 0:
                row["checkpoint"], row["reloaded_accuracy"] = self.save_and_reload(side, stage, amp)
            self.rows.append(row)

    def save_and_reload(self, side, stage, amp):
        """Save the stage's state_dict, rebuild the structure from a fresh model with the same
        transforms, load the file into it and evaluate it again."""
        path = os.path.join(self.cfg.out, "%s-%s.pt" % (side.name, stage))
        torch.save(side.model.state_dict(), path)
        fresh = self.structure(side, stage)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TypedStorage deprecation from torch.ao's packed params
            # weights_only=False: torch.ao's int8 Linear stores packed params, which weights_only refuses.
            fresh.load_state_dict(torch.load(path, map_location=self.device, weights_only=False))
        fresh = side.pipeline.inference_model(fresh)
        acc = train.accuracy(fresh, self.data.x_test, self.data.y_test, device=self.device, amp=amp)
        self.checkpoints.append(path)
        return path, acc

    def structure(self, side, stage):
        """A model with the structure `side` has after `stage`, built from scratch."""
        p = side.pipeline
        model = p.build(self.num_classes)
        if stage in ("prune", "int8"):
            model = p.prune_structure(p.prepare_finetune(model))
        if stage == "int8":
            model = p.quantize(model)
        return model

    # -- the course ------------------------------------------------------------------------------
    def run(self):
        cfg = self.cfg
        start = time.time()
        self.log("data: %s; device %s; %s" % (self.data, self.device,
                                               "DDP over %d processes" % self.world if self.world > 1 else "1 process"))
        backend = _use_backend(cfg.backend)
        with backend, metrics.record_backends() as seen:
            for side in self.sides:
                side.model = self._try(side, "train", lambda: side.pipeline.build(self.num_classes))
            self.notes.append(_schedule_note(cfg))
            self.train_stage("train", cfg.epochs, self.optimizers("train", cfg.lr), {})
            self.finish_stage("train")
            self.prune()
            self.quantize()
        self.backends_used = metrics.summarize_backends(seen)
        self.seconds = time.time() - start
        return self

    def prune(self):
        """Fine-tune with BatchNorm frozen (effops: the blocks fused in train mode) and fresh optimizers
        while the masks of the classifier head ramp to --sparsity, the same layers on both sides."""
        cfg = self.cfg
        effops_side, plain_side = self.sides
        for side in self.active():
            model = self._try(side, "prune", lambda: side.pipeline.prepare_finetune(side.model))
            if model is not None:
                side.model = model
        if effops_side.unavailable is None:
            self.notes.append("fine-tuning with BatchNorm frozen (running statistics): effops fused %d blocks in "
                              "train mode (InvertedResidual, BatchNorm folded into trainable convs); the first "
                              "stage trains with batch statistics, which no fused block computes"
                              % effops_side.pipeline.fused_blocks)
        steps = cfg.finetune_epochs * self.steps_per_epoch()
        schedule = stages.PruneSchedule(cfg.sparsity, steps)
        opts = self.optimizers("prune", cfg.lr * cfg.finetune_lr_scale)
        on_steps = {}
        if effops_side.unavailable is None:
            out = self._try(effops_side, "prune", lambda: effops_side.pipeline.start_pruning(
                effops_side.model, schedule, opts["effops"]))
            if out is not None:
                effops_side.model, on_steps["effops"] = out
        if effops_side.unavailable is None:
            layers = stages.plain_layer_names(effops_side.pipeline.pruned_layers, plain_side.model)
        else:
            layers = list(models.prunable_layers(plain_side.model))
        if plain_side.unavailable is None:
            plain_side.model, on_steps["plain"] = plain_side.pipeline.start_pruning(plain_side.model, schedule,
                                                                                    opts["plain"], layers)
        self.notes.append("pruned to %.0f%% (%s magnitude, cubic ramp over %d of %d fine-tuning steps, every %d "
                          "steps): %s" % (100 * cfg.sparsity, cfg.prune_scope, schedule.end, steps, schedule.every,
                                          ", ".join(layers) or "nothing"))
        self.train_stage("prune", cfg.finetune_epochs, opts, on_steps)
        self.finish_stage("prune")

    def quantize(self):
        """int8 Linear layers for inference: effops.quantize's choice of layers, the same layers with
        torch.ao's dynamic quantization on the plain side (every Linear when effops cannot run it)."""
        effops_side, plain_side = self.sides
        layers = None
        if effops_side.unavailable is None:
            q = self._try(effops_side, "int8", lambda: effops_side.pipeline.quantize(effops_side.model))
            if q is not None:
                effops_side.model = q
                layers = effops_side.pipeline.int8_layers(q)
        if plain_side.unavailable is None:
            q = self._try(plain_side, "int8", lambda: plain_side.pipeline.quantize(plain_side.model, layers))
            if q is not None:
                plain_side.model = q
                layers = plain_side.pipeline.int8_layers(q)
        self.notes.append("int8 layers: %s" % (", ".join(layers or []) or "none"))
        self.finish_stage("int8")


def _schedule_note(cfg):
    if cfg.lr_schedule == "constant":
        return "lr constant: %g (training), %g (fine-tuning)" % (cfg.lr, cfg.lr * cfg.finetune_lr_scale)
    return ("lr per stage: linear warm-up over %d%% of the steps to %g (training) / %g (fine-tuning), then cosine "
            "decay towards 0" % (round(100 * train.WARMUP_FRACTION), cfg.lr, cfg.lr * cfg.finetune_lr_scale))


def _use_backend(name):
    if not name:
        return contextlib.nullcontext()
    import effops
    return effops.use_backend(name)


@contextlib.contextmanager
def _progress(total, desc, enabled):
    from tqdm.auto import tqdm
    bar = tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()


def _state_bytes_per_param(optimizer):
    """Optimizer state bytes per parameter of the optimizer that trained a stage (None: no training)."""
    if optimizer is None:
        return None
    from effops.optim.memory import state_bytes_per_param
    return state_bytes_per_param(optimizer)
