"""Paired convergence checks: 8-bit Adam states, and bf16 params without master weights, against AdamW.

Does training with 8-bit Adam states, or bf16 params without master weights, end where fp32-state
AdamW does? Each comparison is paired: for a seed, every arm starts from the same initial weights
and sees the same batches in the same order (the seed draws both), so no difference comes from
those; the script reports the mean of the per-seed differences and its standard error (sample
standard deviation of the differences / sqrt(seeds)).

* the demo's task: the demo's effops model (effops/demo/models.py: MobileNetV2-style CNN of
  inverted-residual blocks, width 8 as the demo's default; BatchNorm by batch statistics) on
  scikit-learn's digits with the demo's training recipe and loop (effops.demo.train): peak lr 3e-3,
  linear warm-up over 5% of the steps then cosine decay towards 0, weight decay 1e-4, batch 64, 8
  epochs; test accuracy after training (360 test images: one image is 0.28 points);
  effops.optim.AdamW8bit against effops.optim.AdamW, fp32 model. `--schedule constant` trains at a
  constant lr 3e-3 instead (the demo's former recipe): there eval-mode BatchNorm's running statistics
  lag behind weights that still move at the end, and single seeds end anywhere from 78% to 99%, far
  too noisy to resolve tenths of a point (docs/adam.md has both);
* with --bf16: the same task with a bf16 model and effops.optim.AdamW, fp32 master weights
  (master_weights=True) against no master weights with bf16 stochastic rounding
  (bf16_stochastic_round=True) and, unless left out with --bf16-modes, with rounding to nearest;
  differences are taken against the fp32-master arm;
* a character-level transformer LM on text shipped with Python (pydoc's topic help,
  pydoc_data/topics.py), a few hundred steps, loss on held-out text at the end (one seed).

    python -m benchmarks.adam8bit_convergence [--seeds N] [--first-seed F] [--schedule cosine|constant]
        [--epochs E] [--width W] [--lm-steps S] [--skip-digits] [--skip-lm] [--bf16]
        [--bf16-modes master,stochastic,nearest] [--threads T]

--seeds N        seeds F..F+N-1 of every demo-task comparison (default 3)
--first-seed F   the first seed (default 0): a long run can be split into processes or sittings
--schedule       the demo task's lr schedule: cosine (default, the demo's) or constant (its former one)
--epochs E       the demo task's epochs (default 8, the demo's)
--width W        the demo model's width (default 8, the demo's default)
--lm-steps S     steps of the char-level LM (default 400)
--skip-digits    leave out the AdamW8bit vs AdamW demo-task comparison
--skip-lm        leave out the char-level LM
--bf16           also the bf16 comparison on the demo task
--bf16-modes     which bf16 arms to run, comma-separated from master, stochastic, nearest (default
                 all three; master is always run: it is the baseline of the differences)
--threads T      torch threads (default 1)

For example, the bf16 comparison alone: `--skip-digits --skip-lm --bf16 --seeds 40`. Prints a line
per run as it ends, then markdown tables (the figures in docs/adam.md come from this script). With
the cosine recipe the per-seed differences spread by about 0.6 points (AdamW8bit) and 0.9 points
(bf16 without master weights), standard deviation: 40 seeds give standard errors of 0.09 and 0.14.
Every seed is its own run, so `--first-seed` splits a long comparison into processes.
"""
import argparse
import math
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from effops.optim import AdamW, AdamW8bit, state_bytes_per_param

OPTIMIZERS = {"AdamW": AdamW, "AdamW8bit": AdamW8bit}


# ---------------------------------------------------------------------------------------------
# The demo's task
# ---------------------------------------------------------------------------------------------
def _train_digits(model, opt, x_train, ds, seed, epochs, batch_size, schedule):
    """The demo's training loop and lr schedule (effops.demo.train), then test accuracy in %."""
    from effops.demo import train
    steps_per_epoch = len(train.epoch_batches(len(ds.y_train), batch_size, 0, seed))
    sched = train.lr_scheduler(opt, epochs * steps_per_epoch, schedule)
    for epoch in range(epochs):
        for idx in train.epoch_batches(len(ds.y_train), batch_size, epoch, seed):
            train.train_step(model, opt, x_train, ds.y_train, [idx], device="cpu", amp=False)
            sched.step()
    model.eval()
    x_test = ds.x_test.to(x_train.dtype)
    return 100.0 * train.accuracy(model, x_test, ds.y_test, device="cpu")


def digits_run(opt_cls, seed, epochs=8, lr=3e-3, weight_decay=1e-4, batch_size=64, width=8, schedule="cosine"):
    from effops.demo import data, models
    ds = data.load_digits(seed=0)
    model = models.effops_model(len(ds.classes), width, seed=seed)
    opt = opt_cls(model.parameters(), lr=lr, weight_decay=weight_decay)
    return _train_digits(model, opt, ds.x_train, ds, seed, epochs, batch_size, schedule), state_bytes_per_param(opt)


# key (for --bf16-modes): (row name, AdamW options); "master" is the baseline of the differences
BF16_MODES = {"master": ("fp32 master weights", dict(master_weights=True)),
              "stochastic": ("no master, stochastic rounding", dict(bf16_stochastic_round=True)),
              "nearest": ("no master, round to nearest", dict())}


def digits_bf16_run(seed, mode, epochs=8, lr=3e-3, weight_decay=1e-4, batch_size=64, width=8, schedule="cosine"):
    """The demo's task with a bf16 model and AdamW in one of BF16_MODES (its key)."""
    from effops.demo import data, models
    ds = data.load_digits(seed=0)
    model = models.effops_model(len(ds.classes), width, seed=seed).to(torch.bfloat16)
    opt = AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, **BF16_MODES[mode][1])
    return _train_digits(model, opt, ds.x_train.to(torch.bfloat16), ds, seed, epochs, batch_size, schedule)


# ---------------------------------------------------------------------------------------------
# A character-level transformer LM
# ---------------------------------------------------------------------------------------------
def corpus():
    from pydoc_data.topics import topics
    text = "\n".join(topics[k] for k in sorted(topics))
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text[:600_000]] if len(chars) < 256 else [], dtype=torch.long)
    split = int(0.9 * len(ids))
    return ids[:split], ids[split:], len(chars)


class CharLM(nn.Module):
    def __init__(self, vocab, d=128, layers=2, heads=4, ctx=64):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(ctx, d))
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(ctx), persistent=False)

    def forward(self, x):
        t = x.shape[1]
        h = self.tok(x) + self.pos[:t]
        h = self.blocks(h, mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.norm(h))


def batches(ids, steps, batch, ctx, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        start = torch.randint(0, len(ids) - ctx - 1, (batch,), generator=g)
        idx = start[:, None] + torch.arange(ctx + 1)
        chunk = ids[idx]
        yield chunk[:, :-1], chunk[:, 1:]


def lm_run(opt_cls, train_ids, val_ids, vocab, steps, seed, batch=32, ctx=64, lr=3e-3):
    torch.manual_seed(seed)
    model = CharLM(vocab, ctx=ctx)
    opt = opt_cls(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 30) * 0.5 * (1 + math.cos(
        math.pi * min(s, steps) / steps)))
    for x, y in batches(train_ids, steps, batch, ctx, seed):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        val = [F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
               for x, y in batches(val_ids, 20, 32, ctx, seed=1234)]
    return statistics.mean(val), state_bytes_per_param(opt)


def paired(values, baseline):
    """Mean and standard error of the per-seed differences values[i] - baseline[i]."""
    diffs = [a - b for a, b in zip(values, baseline)]
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
    return statistics.mean(diffs), se


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 of the demo-task comparisons (default 3)")
    p.add_argument("--first-seed", type=int, default=0, help="first seed (default 0): seeds first..first+N-1")
    p.add_argument("--schedule", default="cosine", choices=("cosine", "constant"),
                   help="the demo task's lr schedule (default cosine, the demo's; constant: its former recipe)")
    p.add_argument("--epochs", type=int, default=8, help="the demo task's epochs (default 8, the demo's)")
    p.add_argument("--width", type=int, default=8, help="the demo model's width (default 8, the demo's default)")
    p.add_argument("--lm-steps", type=int, default=400, help="steps of the char-level LM (default 400)")
    p.add_argument("--skip-digits", action="store_true", help="leave out the AdamW8bit vs AdamW demo-task comparison")
    p.add_argument("--skip-lm", action="store_true", help="leave out the char-level LM")
    p.add_argument("--bf16", action="store_true",
                   help="also the demo task with a bf16 model: fp32 master weights against no master weights")
    p.add_argument("--bf16-modes", default="master,stochastic,nearest",
                   help="bf16 arms, comma-separated from %s (master always runs)" % ", ".join(BF16_MODES))
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared machine OpenMP teams wait for descheduled threads)")
    args = p.parse_args(argv)
    modes = ["master"] + [m for m in args.bf16_modes.split(",") if m and m != "master"]
    unknown = [m for m in modes if m not in BF16_MODES]
    if unknown:
        p.error("--bf16-modes: unknown %s (choose from %s)" % (", ".join(unknown), ", ".join(BF16_MODES)))
    torch.set_num_threads(args.threads)
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    recipe = dict(epochs=args.epochs, schedule=args.schedule)
    what = "width %d, %s lr, %d epochs, seeds %d-%d" % (args.width, args.schedule, args.epochs, seeds[0], seeds[-1])
    start = time.time()
    if not args.skip_digits:
        acc = {name: [] for name in OPTIMIZERS}
        state = {}
        for seed in seeds:
            for name, cls in OPTIMIZERS.items():
                a, state[name] = digits_run(cls, seed, width=args.width, **recipe)
                acc[name].append(a)
                print("digits seed %d %s: %.2f%%" % (seed, name, a), flush=True)
        print("\n| demo task (digits, %s) | test accuracy per seed (%%) | mean | state bytes/param |" % what)
        print("|---|---|---|---|")
        for name in OPTIMIZERS:
            print("| %s | %s | %.2f | %.2f |" % (name, ", ".join("%.2f" % a for a in acc[name]),
                                                 statistics.mean(acc[name]), state[name]))
        print("| AdamW8bit - AdamW, paired | | %+.2f +- %.2f points (mean of per-seed differences +- standard "
              "error) | |" % paired(acc["AdamW8bit"], acc["AdamW"]))
    if args.bf16:
        acc = {mode: [] for mode in modes}
        for seed in seeds:
            for mode in modes:
                acc[mode].append(digits_bf16_run(seed, mode, width=args.width, **recipe))
                print("digits bf16 seed %d %s: %.2f%%" % (seed, BF16_MODES[mode][0], acc[mode][-1]), flush=True)
        print("\n| demo task, bf16 model, AdamW (%s) | test accuracy per seed (%%) | mean | "
              "minus fp32 master, paired (mean +- standard error) |" % what)
        print("|---|---|---|---|")
        for mode, values in acc.items():
            diff = "" if mode == "master" else "%+.2f +- %.2f points" % paired(values, acc["master"])
            print("| %s | %s | %.2f | %s |" % (BF16_MODES[mode][0], ", ".join("%.2f" % a for a in values),
                                              statistics.mean(values), diff))
    if not args.skip_lm:
        train_ids, val_ids, vocab = corpus()
        rows = {}
        for name, cls in OPTIMIZERS.items():
            rows[name] = lm_run(cls, train_ids, val_ids, vocab, args.lm_steps, seed=0)
            print("char LM %s: held-out loss %.4f" % (name, rows[name][0]), flush=True)
        print("\n| char-level LM (%d steps, %d chars of vocabulary) | held-out loss (nats/char) | state bytes/param |"
              % (args.lm_steps, vocab))
        print("|---|---|---|")
        for name in OPTIMIZERS:
            print("| %s | %.4f | %.2f |" % (name, rows[name][0], rows[name][1]))
        print("| AdamW8bit / AdamW | %+.2f%% | |" % (100.0 * (rows["AdamW8bit"][0] / rows["AdamW"][0] - 1)))
    print("\n(%.0f s)" % (time.time() - start))


if __name__ == "__main__":
    main()
