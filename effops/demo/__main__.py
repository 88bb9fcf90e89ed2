"""`python -m effops.demo` (what `make demo` runs); `torchrun --nproc_per_node 2 -m effops.demo` for DDP."""
import argparse
import os
import sys
import warnings

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m effops.demo",
        description="Train a small MobileNetV2-style CNN of inverted-residual blocks on real digits with effops "
                    "(fused InvertedResidual blocks, fused AdamW, gradual pruning, int8 inference) beside the same "
                    "model and schedule in plain PyTorch, and print a per-stage table of accuracy, size and time.")
    p.add_argument("--data", default=None, metavar="PATH",
                   help="image folder with one sub-folder per class (default: scikit-learn's digits)")
    p.add_argument("--epochs", type=int, default=8, help="training epochs (default 8)")
    p.add_argument("--finetune-epochs", type=int, default=4, help="fine-tuning epochs while pruning (default 4)")
    p.add_argument("--sparsity", type=float, default=0.8, help="target sparsity of the pruned layers (default 0.8)")
    p.add_argument("--prune-scope", default="global", choices=("global", "layer"),
                   help="magnitude ranking over all pruned layers together (default) or per layer")
    p.add_argument("--amp", action="store_true", help="bf16 autocast for training and inference")
    p.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--batch-size", type=int, default=64, help="samples per optimizer step over all processes")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--lr-schedule", default="cosine", choices=("cosine", "constant"),
                   help="per stage: linear warm-up over 5%% of the steps, then cosine decay towards 0 (default), or "
                        "a constant lr")
    p.add_argument("--finetune-lr-scale", type=float, default=0.3, help="fine-tuning lr = lr x this")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--optimizer", default="adamw", choices=("adamw", "adamw8bit"),
                   help="the effops side's optimizer: effops.optim.AdamW (default) or AdamW8bit (8-bit states)")
    p.add_argument("--width", type=int, default=8, help="channels of the stem; the last block has 16x this (default 8)")
    p.add_argument("--backend", default=None, choices=("reference", "cpu", "cuda", "triton"),
                   help="force this effops backend (default: automatic choice)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="save checkpoints (reloaded and re-evaluated), demo.json and curves.png here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--infer-batch", type=int, default=256, help="batch size of the inference timing")
    p.add_argument("--train-subset", type=int, default=None, help=argparse.SUPPRESS)  # fast tests
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    args = p.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if not 0.0 <= args.sparsity < 1.0:
        p.error("--sparsity must be in [0, 1), got %s" % args.sparsity)
    for name in ("epochs", "finetune_epochs", "accum", "batch_size", "width", "infer_batch"):
        if getattr(args, name) < 1:
            p.error("--%s must be at least 1, got %s" % (name.replace("_", "-"), getattr(args, name)))
    if args.accum > args.batch_size:
        p.error("--accum %d is larger than --batch-size %d" % (args.accum, args.batch_size))
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible to torch")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    from effops import BackendError
    from effops.demo import distributed, report
    from effops.demo.data import DataError
    from effops.demo.run import Demo

    try:
        demo = Demo(args).run()
    except DataError as exc:
        print("error: %s" % exc, file=sys.stderr)
        return 2
    except BackendError as exc:
        print("error: --backend %s: %s" % (args.backend, exc), file=sys.stderr)
        return 2
    result = dict(config={k: v for k, v in vars(args).items()}, rows=demo.rows, ratios=report.ratios(demo.rows),
                  notes=demo.notes, backends_used=demo.backends_used, world_size=demo.world,
                  seconds=round(demo.seconds, 1), data=str(demo.data))
    if demo.rank == 0:
        print()
        print(report.table(demo.rows))
        print()
        for note in demo.notes:
            print("- " + note)
        if demo.backends_used:
            print("- effops backends used: " + "; ".join("%s: %s" % kv for kv in demo.backends_used.items()))
        print("- time ratio < 1: effops faster; train ms is one optimizer step of %d samples, infer ms one batch "
              "of %d" % (args.batch_size, args.infer_batch))
        if args.out:
            reloads = [(r["checkpoint"], r["accuracy"], r["reloaded_accuracy"]) for r in demo.rows if "checkpoint" in r]
            bad = [p for p, a, b in reloads if a != b]
            print("- %d checkpoints saved in %s, reloaded and re-evaluated: %s"
                  % (len(reloads), args.out, "all give the same accuracy" if not bad else "MISMATCH in " + ", ".join(bad)))
            report.write_all(args.out, demo, result)
            print("- table: %s, curves: %s" % (os.path.join(args.out, "demo.json"), os.path.join(args.out, "curves.png")))
        print("- %.0f s in all" % demo.seconds)
    distributed.teardown()
    return 0


if __name__ == "__main__":
    warnings.filterwarnings("ignore", message=".*torch.ao.quantization.*")
    sys.exit(main())
