"""The demo (`python -m effops.demo`): data loading and its errors, the models and their fused forms,
the counts in the table, and tiny end-to-end runs (outputs, checkpoint reload, seeding, a missing piece,
DDP)."""
import copy
import importlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from effops.demo import data, metrics, models, stages
from effops.demo.__main__ import main, parse_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A run small enough for tests: 96 training images, width 4, one epoch per stage.
TINY = ["--epochs", "1", "--finetune-epochs", "1", "--train-subset", "96", "--width", "4", "--batch-size", "32",
        "--infer-batch", "32", "--no-progress", "--device", "cpu"]


def _importable(module, name):
    try:
        return hasattr(importlib.import_module(module), name)
    except ImportError:
        return False


HAS_INVERTED_RESIDUAL = _importable("effops.nn", "InvertedResidual") and _importable("effops.transforms", "fuse")
HAS_ADAMW = _importable("effops.optim", "AdamW")
HAS_PRUNE = _importable("effops.transforms", "GradualPruner")
HAS_QUANTIZE = _importable("effops.transforms", "quantize")


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
def test_digits_are_32x32_with_a_fixed_stratified_split():
    a, b = data.load_digits(seed=0), data.load_digits(seed=0)
    assert a.x_train.shape[1:] == (1, 32, 32) and a.x_test.shape[1:] == (1, 32, 32)
    assert len(a.y_train) + len(a.y_test) == 1797
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert sorted(a.y_test.unique().tolist()) == list(range(10))  # every class in the test split
    assert abs(float(a.x_train.mean())) < 1e-4 and abs(float(a.x_train.std()) - 1) < 1e-3


def _write_folder(root, classes=("cat", "dog", "fox"), per_class=5, size=(12, 9)):
    from PIL import Image
    rng = np.random.default_rng(0)
    for c in classes:
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(per_class):
            img = (rng.random(size) * 255).astype(np.uint8)
            Image.fromarray(img).save(os.path.join(root, c, "%d.png" % i))
    return root


def test_image_folder_loads_classes_in_sorted_order(tmp_path):
    root = _write_folder(str(tmp_path / "imgs"))
    ds = data.load_folder(root)
    assert ds.classes == ["cat", "dog", "fox"]
    assert ds.x_train.shape[1:] == (1, 32, 32)
    assert len(ds.y_train) + len(ds.y_test) == 15
    assert set(ds.y_test.tolist()) == {0, 1, 2}


@pytest.mark.parametrize("case, match", [
    ("missing", "does not exist"),
    ("file", "is not a directory"),
    ("empty", "no class sub-folders"),
    ("one_class", "at least 2"),
    ("no_images", "has no image files"),
    ("one_image", "has 1 image"),
    ("unreadable", "cannot read image .*broken.png"),
])
def test_bad_data_folders_are_clear_errors(tmp_path, case, match):
    root = str(tmp_path / "d")
    if case == "file":
        open(root, "w").close()
    elif case == "empty":
        os.makedirs(root)
    elif case == "one_class":
        _write_folder(root, classes=("only",))
    elif case == "no_images":
        _write_folder(root, classes=("a",))
        os.makedirs(os.path.join(root, "b"))
        open(os.path.join(root, "b", "notes.txt"), "w").close()
    elif case == "one_image":
        _write_folder(root, classes=("a",))
        _write_folder(root, classes=("b",), per_class=1)
    elif case == "unreadable":
        _write_folder(root, classes=("a", "b"))
        with open(os.path.join(root, "b", "broken.png"), "wb") as f:
            f.write(b"not a png at all")
    with pytest.raises(data.DataError, match=match):
        data.load_folder(root)


def test_cli_reports_a_bad_data_folder_and_exits_2(tmp_path, capsys):
    assert main(["--data", str(tmp_path / "nope")] + TINY) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--sparsity", "1.5"], ["--epochs", "0"], ["--accum", "128"],
                                  ["--backend", "tpu"]])
def test_cli_rejects_bad_options(argv):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2


# ---------------------------------------------------------------------------------------------
# models and counts
# ---------------------------------------------------------------------------------------------
def test_plain_model_is_inverted_residual_blocks_and_classifies_32x32():
    m = models.plain_model(num_classes=7, width=4)
    blocks = [b for n, b in m.named_children() if n.startswith("block")]
    assert len(blocks) == 6 and all(isinstance(b, models.InvertedResidualBlock) for b in blocks)
    for b in blocks:
        c = b.conv
        assert c.expand.kernel_size == (1, 1) and c.expand.out_channels == 6 * c.expand.in_channels
        assert c.depthwise.groups == c.depthwise.in_channels and c.project.kernel_size == (1, 1)
        assert isinstance(c.act1, nn.ReLU6) and isinstance(c.bn3, nn.BatchNorm2d)
    assert [b.residual for b in blocks] == [True, False, True, False, True, False]
    assert m(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    assert set(models.prunable_layers(m)) == {"fc1", "fc2"}
    assert m.fc1.in_features == 16 * 4


def _trained_statistics(model):
    """Give the BatchNorms statistics and affine values other than their initial ones (a fold of the
    initial ones changes little)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                for t in (m.running_mean, m.bias):
                    t.copy_(torch.randn(t.shape, generator=gen) * 0.1)
                for t in (m.running_var, m.weight):
                    t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
    return model


@pytest.mark.skipif(not HAS_INVERTED_RESIDUAL, reason="effops.nn.InvertedResidual not in this build")
def test_effops_inference_form_fuses_every_block_and_matches_the_plain_model():
    from effops.nn import InvertedResidual
    plain = _trained_statistics(models.plain_model(width=4, seed=3)).eval()
    fused = stages.EffopsPipeline(parse_args(TINY)).inference_model(plain)
    assert fused is not plain and not any(isinstance(m, InvertedResidual) for m in plain.modules())
    blocks = [m for m in fused.modules() if isinstance(m, InvertedResidual)]
    assert len(blocks) == 6 and all(b.folded_batchnorm for b in blocks)
    assert sum(b.residual for b in blocks) == 3  # the adds of blocks 1, 3 and 5 run inside the op
    assert not any(isinstance(m, nn.BatchNorm2d) for n, m in fused.named_modules() if n.startswith("block"))
    x = torch.randn(5, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), plain(x), atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not HAS_INVERTED_RESIDUAL, reason="effops.nn.InvertedResidual not in this build")
def test_frozen_bn_fine_tuning_form_trains_the_fused_blocks_like_the_plain_model():
    """The fine-tuning form: BatchNorms frozen on both sides, the effops blocks fused in train mode
    (their backward the fused op's); one step's loss and the input gradient match the plain model's."""
    from effops.demo import train
    from effops.nn import InvertedResidual
    plain = models.freeze_batchnorm(_trained_statistics(models.plain_model(width=4, seed=3)))
    fused, report = models.fuse_for_frozen_bn_training(copy.deepcopy(plain))
    assert len(report.changed) == 6
    blocks = [m for m in fused.modules() if isinstance(m, InvertedResidual)]
    assert len(blocks) == 6 and not any(b.folded_batchnorm for b in blocks)
    x = torch.randn(6, 1, 32, 32)
    outs = []
    for model in (plain, fused):
        model.train()
        models.freeze_batchnorm(model)
        xi = x.clone().requires_grad_()
        out = model(xi)
        out.square().sum().backward()
        outs.append((out, xi.grad))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(outs[1][1], outs[0][1], atol=1e-4, rtol=1e-4)
    # train_step's model.train() keeps a frozen model's BatchNorms in eval mode
    opt = torch.optim.SGD(fused.parameters(), lr=0.0)
    train.train_step(fused, opt, x, torch.zeros(6, dtype=torch.int64), [torch.arange(6)], device="cpu", amp=False)
    assert all(not m.training for m in fused.modules() if isinstance(m, nn.BatchNorm2d))
    assert all(b.training for b in blocks)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
def test_count_params_sees_masks_torch_prune_and_int8():
    lin = nn.Linear(8, 4)
    with torch.no_grad():
        lin.weight.fill_(1.0)
        lin.bias.zero_()
    m = nn.Sequential(lin)
    assert metrics.count_params(m) == (32, 36)
    torch.nn.utils.prune.l1_unstructured(lin, "weight", amount=8)
    assert metrics.count_params(m) == (24, 36)  # weight_orig * weight_mask, bias zeros
    q = torch.ao.quantization.quantize_dynamic(nn.Sequential(nn.Linear(8, 4)), {nn.Linear}, dtype=torch.qint8)
    nonzero, total = metrics.count_params(q)
    assert total == 36 and nonzero <= 36


@pytest.mark.skipif(not HAS_PRUNE, reason="effops.prune not in this build")
def test_count_params_applies_a_sparse_layers_mask():
    import effops
    m = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Conv2d(8, 8, 1))
    effops.prune(m, 0.75)
    nonzero, total = metrics.count_params(m)
    assert total == 16 * 8 + 8 + 8 * 8 + 8
    assert nonzero <= 0.25 * (16 * 8 + 8 * 8) + 16


def test_checkpoint_bytes_is_the_saved_size(tmp_path):
    m = nn.Linear(100, 10)
    torch.save(m.state_dict(), tmp_path / "m.pt")
    # the same tensors; the zip's record names and alignment padding depend on the file name
    assert abs(metrics.checkpoint_bytes(m) - os.path.getsize(tmp_path / "m.pt")) < 0.05 * os.path.getsize(tmp_path / "m.pt")
    assert metrics.checkpoint_bytes(m) > 1010 * 4


def test_prune_schedule_is_cubic_and_reaches_the_target():
    s = stages.PruneSchedule(0.8, total_steps=100)
    assert s.end == 70 and s.sparsity_at(0) == 0.0 and s.sparsity_at(70) == pytest.approx(0.8)
    assert s.sparsity_at(35) == pytest.approx(0.8 * (1 - 0.5 ** 3))
    assert s.sparsity_at(99) == pytest.approx(0.8)
    assert s.updates_at(s.every) and s.updates_at(70) and not s.updates_at(71)


def test_lr_schedule_warms_up_then_decays_towards_zero():
    from effops.demo.train import lr_factor
    total = 200  # warm-up: 5% = 10 steps
    f = [lr_factor(s, total) for s in range(total)]
    assert f[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])  # linear warm-up, the peak at step 9
    assert f[10] == 1.0 and f[10 + 95] == pytest.approx(0.5)  # cosine: half way through the decay, half the peak
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # never rises after warm-up
    assert 0.0 < f[-1] < 1e-3  # the last step still moves, by almost nothing
    assert lr_factor(0, 1) == 1.0  # a one-step stage: warm-up and peak in one
    assert [lr_factor(s, total, "constant") for s in (0, 50, 199)] == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="schedule"):
        lr_factor(0, total, "linear")


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_both_sides_step_on_the_scheduled_lr(schedule):
    from effops.demo.run import Demo
    from effops.demo.train import lr_factor
    demo = Demo(parse_args(TINY + ["--epochs", "2", "--lr", "0.01", "--lr-schedule", schedule]))
    for side in demo.sides:
        side.model = demo._try(side, "train", lambda: side.pipeline.build(demo.num_classes))
    opts = demo.optimizers("train", 0.01)
    seen = {name: [] for name in opts}
    # on_step runs right after optimizer.step(): the lr that step used
    on_steps = {name: (lambda name=name: seen[name].append(opts[name].param_groups[0]["lr"])) for name in opts}
    demo.train_stage("train", 2, opts, on_steps)
    total = 2 * demo.steps_per_epoch()
    assert "plain" in seen and total == 6
    for name, lrs in seen.items():
        assert lrs == pytest.approx([0.01 * lr_factor(s, total, schedule) for s in range(total)]), name


# ---------------------------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------------------------
def _expected_available():
    """Which effops stages this build can run (each needs the earlier ones)."""
    train = HAS_INVERTED_RESIDUAL and HAS_ADAMW
    prune = train and HAS_PRUNE
    return {"train": train, "prune": prune, "int8": prune and HAS_QUANTIZE}


def _rows(out):
    with open(os.path.join(out, "demo.json")) as f:
        return json.load(f)


def test_demo_end_to_end_writes_table_json_png_and_reloads_checkpoints(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert main(TINY + ["--out", out]) == 0
    printed = capsys.readouterr().out
    assert "| 1 train |" in printed and "3 int8 inference" in printed
    result = _rows(out)
    rows = {(r["stage"], r["impl"]): r for r in result["rows"]}
    assert set(rows) == {(s, i) for s in ("train", "prune", "int8") for i in ("effops", "plain")}
    expected = _expected_available()
    for stage in ("train", "prune", "int8"):
        assert rows[stage, "plain"]["available"]
        assert rows[stage, "effops"]["available"] == expected[stage], rows[stage, "effops"]
        if not expected[stage]:
            assert "not available in this build" in rows[stage, "effops"]["note"] or "not run" in rows[stage, "effops"]["note"]
    for r in result["rows"]:
        if r["available"]:
            # the checkpoint was saved, rebuilt from a fresh model, loaded and gives the same accuracy
            assert os.path.exists(r["checkpoint"]) and r["reloaded_accuracy"] == r["accuracy"]
            assert 0.0 <= r["accuracy"] <= 1.0 and r["infer_ms_per_batch"] > 0
            assert (r["train_ms_per_step"] is None) == (r["stage"] == "int8")
            # optimizer state per parameter: fp32 AdamW's two moments (int8 inference trains nothing)
            if r["stage"] == "int8":
                assert r["optimizer_bytes_per_param"] is None
            else:
                assert 8.0 <= r["optimizer_bytes_per_param"] < 8.1
    # 80% of the pruned layers' weights are zero
    pruned_weights = sum(m.weight.numel() for m in models.prunable_layers(models.plain_model(width=4)).values())
    for side in ("plain", "effops") if expected["prune"] else ("plain",):
        assert rows["train", side]["nonzero_params"] - rows["prune", side]["nonzero_params"] >= 0.79 * pruned_weights
    if expected["train"]:
        assert "train" in result["ratios"] and result["ratios"]["train"]["train_ms_per_step"] > 0
        # inference runs the fused blocks from the first stage on; fine-tuning trains them
        assert {"adam_step", "inverted_residual"} <= set(result["backends_used"])
    if expected["prune"]:
        # fine-tuning trains the fused blocks: at this size the op's training policy runs them as torch's
        # ops (folded convs, no BatchNorm pass), recorded as its "reference" route
        assert "reference" in result["backends_used"]["inverted_residual"]
        # the same layers pruned on both sides (the BatchNorm folding changes the other counts)
        assert any(n.endswith(": fc1, fc2") for n in result["notes"])
        assert any("fused 6 blocks in train mode" in n for n in result["notes"])
    assert any("cosine decay" in n for n in result["notes"])  # the default lr schedule, said in the notes
    with open(os.path.join(out, "curves.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(not HAS_ADAMW, reason="effops.optim not available in this build")
def test_optimizer_option_picks_adamw8bit_for_the_effops_side():
    from effops.optim import AdamW, AdamW8bit
    p = [nn.Parameter(torch.zeros(5000))]
    assert type(stages.EffopsPipeline(parse_args(["--optimizer", "adamw8bit"])).optimizer(p, 1e-3)) is AdamW8bit
    assert type(stages.EffopsPipeline(parse_args([])).optimizer(p, 1e-3)) is AdamW
    assert type(stages.PlainPipeline(parse_args(["--optimizer", "adamw8bit"])).optimizer(p, 1e-3)) is torch.optim.AdamW


def test_seeded_runs_repeat_their_accuracy_with_accumulation(tmp_path):
    runs = []
    for i in range(2):
        out = str(tmp_path / str(i))
        assert main(TINY + ["--accum", "2", "--out", out]) == 0
        runs.append([(r["stage"], r["impl"], r.get("accuracy"), r.get("nonzero_params")) for r in _rows(out)["rows"]])
    assert runs[0] == runs[1]


def test_a_missing_effops_piece_is_reported_not_faked(tmp_path, monkeypatch):
    def missing(*args, **kwargs):
        raise ImportError("No module named 'effops.nn.inverted_residual'")
    monkeypatch.setattr(models, "effops_model", missing)
    out = str(tmp_path / "out")
    assert main(TINY + ["--out", out, "--finetune-epochs", "1"]) == 0
    rows = {(r["stage"], r["impl"]): r for r in _rows(out)["rows"]}
    assert not rows["train", "effops"]["available"]
    assert "effops.nn.InvertedResidual not available in this build" in rows["train", "effops"]["note"]
    assert all(not rows[s, "effops"]["available"] for s in ("prune", "int8"))
    assert all(rows[s, "plain"]["available"] for s in ("train", "prune", "int8"))
    # without effops to say which layers it took, the plain side prunes the classifier head
    assert any(n.endswith(": fc1, fc2") for n in _rows(out)["notes"])


@pytest.mark.skipif(not _expected_available()["train"], reason="effops train stage not in this build")
def test_forced_reference_backend_and_amp(tmp_path):
    out = str(tmp_path / "out")
    assert main(TINY + ["--out", out, "--backend", "reference", "--amp"]) == 0
    result = _rows(out)
    # every effops op ran the forced backend; under --amp too the blocks are fused (the op autocasts)
    assert result["backends_used"] and all(set(v.split(", ")) == {"reference"}
                                           for v in result["backends_used"].values())
    assert "inverted_residual" in result["backends_used"]
    assert all(r["available"] for r in result["rows"])


@pytest.mark.skipif(not _expected_available()["train"], reason="effops train stage not in this build")
def test_forced_reference_backend_runs_the_fused_blocks(tmp_path):
    out = str(tmp_path / "out")
    assert main(TINY + ["--out", out, "--backend", "reference", "--train-subset", "32"]) == 0
    used = _rows(out)["backends_used"]
    assert used["inverted_residual"] == "reference" and used["inverted_residual_backward"] == "reference"


def test_torchrun_two_processes_ddp(tmp_path):
    out = str(tmp_path / "out")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "effops.demo"] + TINY + ["--out", out]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = _rows(out)
    assert result["world_size"] == 2
    assert "DDP over 2 processes" in proc.stdout
    for r in result["rows"]:
        if r["available"]:
            assert r["ranks_agree"], r  # both ranks evaluate the same synchronized model
