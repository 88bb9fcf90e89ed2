"""benchmarks/plots.py: one PNG per op, axes read from the rows' own structure."""
import os

from benchmarks import plots

PNG = b"\x89PNG\r\n\x1a\n"


def _row(op, case, impl, speedup, baseline="dense", **extra):
    return dict(op=op, case=case, impl=impl, baseline=baseline, time_ms=10.0 / speedup, speedup=speedup, **extra)


def sparse_rows():
    """masked_linear-like: sparsity as an extra key, the pattern only in the case name, peak memory
    differing per impl (a result, not an axis)."""
    rows = []
    for pattern in ("block32", "unstructured"):
        for s in (0.5, 0.9):
            case = "4096x4096 M=256 %s %d%%" % (pattern, 100 * s)
            rows.append(_row("masked", case, "dense", 1.0, sparsity=s, peak_MiB=100.0))
            rows.append(_row("masked", case, "effops", 1 + 5 * s, sparsity=s, peak_MiB=50.0 * s))
    return rows


def test_sparsity_is_the_x_axis_and_patterns_are_panels():
    x, panels = plots.layout(sparse_rows())
    assert x == "sparsity"
    assert sorted(t for t, _ in panels) == ["4096x4096 M=256 block32", "4096x4096 M=256 unstructured"]
    assert all(len(rows) == 4 for _, rows in panels)


def test_numbers_in_the_case_name_give_the_x_axis():
    rows = [_row("int8", "M=%d K=4096 N=4096" % m, impl, s, baseline="fp32")
            for m in (1, 16, 256) for impl, s in (("fp32", 1.0), ("int8", 0.5 + m / 100))]
    x, panels = plots.layout(rows)
    assert x == "M" and [t for t, _ in panels] == ["K=4096 N=4096"]


def test_a_mode_splits_panels_and_case_order_is_the_x_axis_when_nothing_is_numeric():
    rows = [_row("dwpw", case, impl, s, baseline="faster of torch NCHW / channels_last", mode=mode,
                 auto_backend="cpu", peak_MiB=float(len(impl)))
            for case in ("8x32->64 112x112 s1", "8x64->128 56x56 s1") for mode in ("forward", "fwd+bwd")
            for impl, s in (("torch NCHW", 0.4), ("effops", 2.0))]
    x, panels = plots.layout(rows)
    assert x is None
    assert sorted(t for t, _ in panels) == ["mode=forward", "mode=fwd+bwd"]


def test_write_plots_writes_one_png_per_op_and_skips_foreign_rows(tmp_path):
    rows = sparse_rows() + [_row("adam step", "17.8M params", impl, s, baseline="torch fused")
                            for impl, s in (("torch fused", 1.0), ("effops", 1.1))]
    rows.append({"op": "broken", "note": "not a compare() row"})
    paths = plots.write_plots(rows, str(tmp_path))
    assert sorted(os.path.basename(p) for p in paths) == ["plot_adam_step.png", "plot_masked.png"]
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == PNG
    assert plots.write_plots([], str(tmp_path / "empty")) == []
