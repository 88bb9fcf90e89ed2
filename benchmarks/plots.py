"""PNG plots of benchmark rows: per op, speedup over the baseline against problem size or sparsity,
one line per implementation (benchmarks/run.py calls write_plots when this module exists).

Rows are benchmarks.common.compare's dicts: op, case, impl, baseline, time_ms, speedup, maybe
rate/rate_unit, plus extra keys that differ per op. The plot reads the rows' structure instead of
knowing each op:

* dimensions of a case: extra keys with one value per case (sparsity, M, shape ...) and the
  `key=number` tokens of the case name ("M=256 K=4096");
* the x axis: a numeric dimension that varies (PREFERRED_X first), or the case order when none does;
* panels: what else tells rows apart, so each line compares like with like: the case name less its
  x token ("4096x4096 block32" for x = sparsity) and string keys that take several values within
  one case for every implementation, the baseline's included (a "mode" of forward / fwd+bwd);
* results such as peak memory, which differ between implementations of one case, are not axes.
"""
import math
import os
import re

STANDARD_KEYS = {"op", "case", "impl", "baseline", "time_ms", "speedup", "rate", "rate_unit"}
# Numeric dimensions to put on the x axis when they vary, best first.
PREFERRED_X = ("sparsity", "density", "M", "tokens", "batch", "numel", "params", "n", "size", "N", "K")
MAX_PANELS = 12
_TOKEN = re.compile(r"^(?:([A-Za-z_]\w*)=)?(-?\d+(?:\.\d+)?)(%?)$")


def _numeric(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _key(v):
    return tuple(v) if isinstance(v, list) else v


def _case_numbers(case):
    """{name: number} from the `name=number` tokens of a case name."""
    out = {}
    for token in str(case).split():
        m = _TOKEN.match(token)
        if m and m.group(1):
            out[m.group(1)] = float(m.group(2))
    return out


def dimensions(rows):
    """{key: {case: value}} for the extra keys (and case-name numbers) with one value per case."""
    dims = {}
    extras = {k for r in rows for k in r} - STANDARD_KEYS
    for key in extras:
        per_case, ok = {}, True
        for r in rows:
            if key not in r or _key(per_case.setdefault(r["case"], _key(r[key]))) != _key(r[key]):
                ok = False
                break
        if ok:
            dims[key] = per_case
    parsed = {}
    for r in rows:
        for key, value in _case_numbers(r["case"]).items():
            parsed.setdefault(key, {})[r["case"]] = value
    cases = {r["case"] for r in rows}
    for key, per_case in parsed.items():
        if key not in dims and set(per_case) == cases:
            dims[key] = per_case
    return dims


def free_keys(rows):
    """String keys that split one case's rows into complete comparisons (each value has the
    baseline's row too): a 'mode' of forward / fwd+bwd, a dtype."""
    out = []
    for key in sorted({k for r in rows for k in r} - STANDARD_KEYS):
        if not all(isinstance(r.get(key), str) for r in rows):
            continue
        groups = {}
        for r in rows:
            groups.setdefault((r["case"], r[key]), set()).add(r["impl"])
        per_case = {}
        for case, value in groups:
            per_case.setdefault(case, set()).add(value)
        if max(len(v) for v in per_case.values()) < 2:
            continue  # one value per case: a dimension or a label, not a split
        baselines = {r["baseline"] for r in rows} & {r["impl"] for r in rows}
        # A baseline named after no impl ("faster of A / B") cannot be checked: then ask for a comparison
        # (two impls or more) in every group.
        if all(impls & baselines if baselines else len(impls) > 1 for impls in groups.values()):
            out.append(key)
    return out


def _residual(case, x_value):
    """The case name without the token(s) that spell x (90% for 0.9, M=256 for 256)."""
    kept = []
    for token in str(case).split():
        m = _TOKEN.match(token)
        if m:
            number = float(m.group(2)) / (100.0 if m.group(3) else 1.0)
            if math.isclose(number, float(x_value), rel_tol=1e-9, abs_tol=1e-12):
                continue
        kept.append(token)
    return " ".join(kept)


def layout(rows):
    """(x key or None, [(panel title, rows)]) for one op's rows."""
    dims = dimensions(rows)
    free = free_keys(rows)
    candidates = [k for k in PREFERRED_X if k in dims] + sorted(k for k in dims if k not in PREFERRED_X)
    for key in candidates:
        values = dims[key]
        if not all(_numeric(v) for v in values.values()) or len(set(values.values())) < 2:
            continue
        groups = {}
        for r in rows:
            title = tuple([_residual(r["case"], values[r["case"]])] + ["%s=%s" % (k, r[k]) for k in free])
            groups.setdefault(title, []).append(r)
        # Usable when each line (panel, impl) has one point per x value and the panels are few.
        unique = all(len({(r["impl"], values[r["case"]]) for r in g}) == len(g) for g in groups.values())
        if unique and len(groups) <= MAX_PANELS:
            return key, [(", ".join(t for t in title if t), g) for title, g in groups.items()]
    groups = {}
    for r in rows:
        groups.setdefault(tuple("%s=%s" % (k, r[k]) for k in free), []).append(r)
    return None, [(", ".join(title), g) for title, g in groups.items()][:MAX_PANELS]


def _slug(name):
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("_") or "op"


def plot_op(op, rows, path):
    """One PNG for one op's rows; returns path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_key, parts = layout(rows)
    dims = dimensions(rows)
    baselines = list(dict.fromkeys(r["baseline"] for r in rows))
    ncols = min(3, len(parts))
    nrows = -(-len(parts) // ncols)
    n_cases = max(len({r["case"] for r in p}) for _, p in parts)
    width = 5.0 if x_key is not None else max(5.0, 0.5 * n_cases + 2)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, 4.2 * nrows), squeeze=False)
    for ax, (title, part) in zip(axes.flat, parts):
        cases = list(dict.fromkeys(r["case"] for r in part))  # the benchmark's own order
        lines = {}
        for r in part:
            if r["impl"] in baselines and r["speedup"] == 1.0:
                continue  # the baseline itself is the dashed line at 1
            x = dims[x_key][r["case"]] if x_key is not None else cases.index(r["case"])
            lines.setdefault(r["impl"], []).append((x, r["speedup"]))
        for impl, points in lines.items():
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=4, label=impl)
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="baseline: %s" % " / ".join(baselines))
        speedups = [r["speedup"] for r in part if r["speedup"] > 0]
        if speedups and max(speedups) / min(speedups) > 20:
            ax.set_yscale("log")
        if x_key is not None:
            xs = [dims[x_key][c] for c in cases]
            if min(xs) > 0 and max(xs) / min(xs) >= 8:
                ax.set_xscale("log", base=2)
            ax.set_xlabel(x_key)
        else:
            ax.set_xticks(range(len(cases)))
            ax.set_xticklabels([str(c) for c in cases], rotation=30, ha="right", fontsize=7)
            ax.set_xlabel("case")
        ax.set_ylabel("speedup (higher is faster)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(parts):]:
        ax.set_visible(False)
    fig.suptitle("%s: speedup over %s" % (op, " / ".join(baselines)))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_plots(rows, out_dir):
    """Write <out_dir>/plot_<op>.png for every op in rows; returns the paths written. Rows timed at several
    CPU levels are plotted at the highest one (the tables have them all)."""
    levels = [r["cpu_level"] for r in rows if "cpu_level" in r]
    if levels:
        from effops.cpu_isa import LEVELS
        top = max(levels, key=LEVELS.index)
        rows = [r for r in rows if r.get("cpu_level", top) == top]
    by_op = {}
    for r in rows:
        if all(k in r for k in ("op", "case", "impl", "baseline", "speedup")):
            by_op.setdefault(r["op"], []).append(r)
    os.makedirs(out_dir, exist_ok=True)
    return [plot_op(op, op_rows, os.path.join(out_dir, "plot_%s.png" % _slug(op))) for op, op_rows in by_op.items()]
