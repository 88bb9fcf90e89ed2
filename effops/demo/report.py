"""The closing table (markdown), its JSON and the PNG of loss and accuracy curves."""
import json
import os

NAMES = {"effops": "effops", "plain": "plain PyTorch"}
STAGE_TITLES = {"train": "1 train", "prune": "2 prune + fine-tune", "int8": "3 int8 inference"}


def ratios(rows):
    """Per stage: effops / plain for train ms, infer ms, bytes and nonzero params (time < 1: effops
    is faster), when both sides ran."""
    out = {}
    for stage in dict.fromkeys(r["stage"] for r in rows):
        e = next((r for r in rows if r["stage"] == stage and r["impl"] == "effops" and r["available"]), None)
        p = next((r for r in rows if r["stage"] == stage and r["impl"] == "plain" and r["available"]), None)
        if e is None or p is None:
            continue
        out[stage] = {k: e[k] / p[k] for k in ("train_ms_per_step", "infer_ms_per_batch", "model_bytes", "nonzero_params",
                                               "optimizer_bytes_per_param")
                      if e.get(k) is not None and p.get(k)}
    return out


def _fmt(value, kind):
    if value is None:
        return "-"
    if kind == "pct":
        return "%.2f%%" % (100 * value)
    if kind == "int":
        return "{:,}".format(value)
    if kind == "bytes":
        return "%.1f KB" % (value / 1024)
    if kind == "bpp":
        return "%.2f" % value
    if kind == "ms":
        return "%.2f" % value
    if kind == "ratio":
        return "%.2fx" % value
    return str(value)


def table(rows):
    """A markdown table: per stage a row per side and an effops/plain ratio row."""
    head = ["stage", "", "test accuracy", "nonzero params", "model bytes", "optimizer state B/param", "train ms/step",
            "infer ms/batch"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rat = ratios(rows)
    for stage in dict.fromkeys(r["stage"] for r in rows):
        first = True
        for r in (r for r in rows if r["stage"] == stage):
            title = STAGE_TITLES.get(stage, stage) if first else ""
            first = False
            if not r["available"]:
                lines.append("| %s | %s | %s | | | | | |" % (title, NAMES[r["impl"]], r["note"]))
                continue
            lines.append("| %s | %s | %s | %s | %s | %s | %s | %s |" % (
                title, NAMES[r["impl"]], _fmt(r["accuracy"], "pct"), _fmt(r["nonzero_params"], "int"),
                _fmt(r["model_bytes"], "bytes"), _fmt(r.get("optimizer_bytes_per_param"), "bpp"),
                _fmt(r["train_ms_per_step"], "ms"), _fmt(r["infer_ms_per_batch"], "ms")))
        if stage in rat:
            q = rat[stage]
            lines.append("| | effops / plain | | %s | %s | %s | %s | %s |" % tuple(
                _fmt(q.get(k), "ratio") for k in ("nonzero_params", "model_bytes", "optimizer_bytes_per_param",
                                                  "train_ms_per_step", "infer_ms_per_batch")))
    return "\n".join(lines)


def write_json(path, result):
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)


def write_curves(path, sides, stage_names):
    """Training loss per optimizer step and test accuracy per epoch, both sides, stages marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for side in sides:
        if side.loss:
            steps, losses = zip(*side.loss)
            ax_loss.plot(steps, losses, label=NAMES[side.name], alpha=0.8, linewidth=1)
        if side.acc:
            steps, accs, _ = zip(*side.acc)
            ax_acc.plot(steps, [100 * a for a in accs], marker="o", markersize=3, label=NAMES[side.name])
    # Stage boundaries: the step of the first epoch of each stage after the first, from any side.
    side = next((s for s in sides if s.acc), None)
    if side is not None:
        epoch_steps = side.acc[1][0] - side.acc[0][0] if len(side.acc) > 1 else side.acc[0][0]
        for stage in stage_names[1:]:
            first = next((s for s, _, st in side.acc if st == stage), None)
            if first is not None:
                for ax in (ax_loss, ax_acc):
                    ax.axvline(first - epoch_steps, color="grey", linestyle=":", linewidth=1)
                ax_acc.annotate(stage, (first - epoch_steps, ax_acc.get_ylim()[0]), fontsize=8, color="grey")
    ax_loss.set(xlabel="optimizer step", ylabel="training loss", yscale="log", title="training loss")
    ax_acc.set(xlabel="optimizer step", ylabel="test accuracy (%)", title="test accuracy after each epoch")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_all(out, demo, result):
    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, "demo.json"), result)
    return write_curves(os.path.join(out, "curves.png"), demo.sides, ("train", "prune"))
