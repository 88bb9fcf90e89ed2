"""Does training with 8-bit Adam states end where fp32 AdamW does? Two runs, each with
effops.optim.AdamW and effops.optim.AdamW8bit from the same initial weights and batches:

* the demo's task: the demo's effops model (SeparableConv2d MobileNet-style CNN, width 24) on
  scikit-learn's digits, the demo's recipe (lr 3e-3, weight decay 1e-4, batch 64, 8 epochs), test
  accuracy after training, for several seeds (360 test images: one image is 0.28 points);
* with --bf16: the demo's task with a bf16 model, AdamW with fp32 master weights against AdamW
  without master weights, with bf16 stochastic rounding and with rounding to nearest;
* a character-level transformer LM on text shipped with Python (pydoc's topic help,
  pydoc_data/topics.py), a few hundred steps, loss on held-out text at the end.

    python -m benchmarks.adam8bit_convergence [--seeds 3] [--lm-steps 400]

Prints markdown tables (the figures in docs/adam.md come from this script).
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
def digits_run(opt_cls, seed, epochs=8, lr=3e-3, weight_decay=1e-4, batch_size=64, width=24):
    from effops.demo import data, models, train
    ds = data.load_digits(seed=0)
    model = models.effops_model(len(ds.classes), width, seed=seed)
    opt = opt_cls(model.parameters(), lr=lr, weight_decay=weight_decay)
    for epoch in range(epochs):
        for idx in train.epoch_batches(len(ds.y_train), batch_size, epoch, seed):
            train.train_step(model, opt, ds.x_train, ds.y_train, [idx], device="cpu", amp=False)
    model.eval()
    return 100.0 * train.accuracy(model, ds.x_test, ds.y_test, device="cpu"), state_bytes_per_param(opt)


BF16_MODES = {"fp32 master weights": dict(master_weights=True),
              "no master, stochastic rounding": dict(bf16_stochastic_round=True),
              "no master, round to nearest": dict()}


def digits_bf16_run(seed, mode, epochs=8, lr=3e-3, weight_decay=1e-4, batch_size=64, width=24):
    """The demo's task with a bf16 model and AdamW in one of BF16_MODES."""
    from effops.demo import data, models, train
    ds = data.load_digits(seed=0)
    model = models.effops_model(len(ds.classes), width, seed=seed).to(torch.bfloat16)
    opt = AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, **BF16_MODES[mode])
    x_train, x_test = ds.x_train.to(torch.bfloat16), ds.x_test.to(torch.bfloat16)
    for epoch in range(epochs):
        for idx in train.epoch_batches(len(ds.y_train), batch_size, epoch, seed):
            train.train_step(model, opt, x_train, ds.y_train, [idx], device="cpu", amp=False)
    model.eval()
    return 100.0 * train.accuracy(model, x_test, ds.y_test, device="cpu")


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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--lm-steps", type=int, default=400)
    p.add_argument("--skip-digits", action="store_true")
    p.add_argument("--skip-lm", action="store_true")
    p.add_argument("--bf16", action="store_true",
                   help="also the demo task with a bf16 model: fp32 master weights against stochastic rounding")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared machine OpenMP teams wait for descheduled threads)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()
    if not args.skip_digits:
        acc = {name: [] for name in OPTIMIZERS}
        state = {}
        for seed in range(args.seeds):
            for name, cls in OPTIMIZERS.items():
                a, state[name] = digits_run(cls, seed)
                acc[name].append(a)
                print("digits seed %d %s: %.2f%%" % (seed, name, a), flush=True)
        print("\n| demo task (digits, %d seeds) | test accuracy per seed (%%) | mean | state bytes/param |" % args.seeds)
        print("|---|---|---|---|")
        for name in OPTIMIZERS:
            print("| %s | %s | %.2f | %.2f |" % (name, ", ".join("%.2f" % a for a in acc[name]),
                                                 statistics.mean(acc[name]), state[name]))
        print("| AdamW8bit - AdamW | | %+.2f points | |" % (statistics.mean(acc["AdamW8bit"]) - statistics.mean(acc["AdamW"])))
    if args.bf16:
        acc = {name: [] for name in BF16_MODES}
        for seed in range(args.seeds):
            for name in BF16_MODES:
                acc[name].append(digits_bf16_run(seed, name))
                print("digits bf16 seed %d %s: %.2f%%" % (seed, name, acc[name][-1]), flush=True)
        print("\n| demo task, bf16 model, AdamW (%d seeds) | test accuracy per seed (%%) | mean |" % args.seeds)
        print("|---|---|---|")
        for name, values in acc.items():
            print("| %s | %s | %.2f |" % (name, ", ".join("%.2f" % a for a in values), statistics.mean(values)))
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
