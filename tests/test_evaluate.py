"""Evaluation: anytime, budgeted batch (vectorised == the released per-sample loop), eval.json, plots."""

from __future__ import annotations

import importlib.util
import json
import math
import random
from pathlib import Path

import pytest
import torch
from torch import nn

from l2w_dist.data import ReseededLoader
from l2w_dist.distributed.env import DistEnv
from l2w_dist.distributed.testing import run_ranks
from l2w_dist.evaluate import (
    DEFAULT_PS,
    anytime,
    budgeted,
    budgeted_details,
    collect_logits,
    confidence_and_prediction,
    evaluate_model,
    exit_assignment,
    load_eval_json,
    plot_curves,
    target_counts,
    target_proportions,
    thresholds_from_list,
    write_eval_json,
)
from tests.helpers.eval_reference import literal_budgeted, literal_softmax_max, literal_with_threshold


def _make_logits(kind, num_exits, n, num_classes, gen):
    if kind == "continuous":
        return torch.randn(num_exits, n, num_classes, generator=gen) * 2
    if kind == "integer":  # few distinct values: many tied confidences and tied argmaxes
        return torch.randint(-2, 3, (num_exits, n, num_classes), generator=gen).float()
    if kind == "duplicated":  # each sample repeated: every confidence comes in tied groups
        base = torch.randn(num_exits, n // 4, num_classes, generator=gen).to(torch.bfloat16).float()
        return base.repeat_interleave(4, dim=1)[:, torch.randperm(n // 4 * 4, generator=gen)]
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "num_exits,kind",
    [
        (1, "continuous"),
        (2, "integer"),
        (3, "duplicated"),
        (5, "continuous"),
        (5, "integer"),
        (7, "duplicated"),
    ],
)
def test_budgeted_equals_literal_loop(num_exits, kind):
    gen = torch.Generator().manual_seed(num_exits * 10 + len(kind))
    n_h, n_t, c = 240, 200, 6
    h_logits = _make_logits(kind, num_exits, n_h, c, gen)
    t_logits = _make_logits(kind, num_exits, n_t, c, gen)
    h_labels = torch.randint(0, c, (h_logits.shape[1],), generator=gen)
    t_labels = torch.randint(0, c, (t_logits.shape[1],), generator=gen)
    flops = sorted(torch.rand(num_exits, generator=gen).mul(1e9).tolist())
    ps = list(DEFAULT_PS)

    details = budgeted_details(h_logits, h_labels, t_logits, t_labels, flops, ps)
    reference = literal_budgeted(h_logits, h_labels, t_logits, t_labels, flops, ps)
    h_max, h_arg = literal_softmax_max(h_logits)
    t_max, _ = literal_softmax_max(t_logits)
    assert len(details.points) == len(reference) == 39
    for i, (got, want) in enumerate(zip(details.points, reference)):
        thr = details.thresholds[i].tolist()
        want_thr = [math.inf if t == 1e8 else (-math.inf if t == -1e8 else t) for t in want["T"]]
        assert thr == want_thr, f"p={want['p']}"
        assert details.test_exit_counts[i].tolist() == want["exp"], f"p={want['p']}"
        assert got.pop("thresholds") == [None if t == math.inf else t for t in want_thr[:-1]]
        assert got == {"p": want["p"], "flops": want["flops"], "top1": want["top1"]}, f"p={want['p']}"
        _, h_exp, _ = literal_with_threshold(h_max, h_arg, h_labels, flops, want["T"])
        assert details.holdout_exit_counts[i].tolist() == h_exp, f"p={want['p']}"
        exits = exit_assignment(t_max, details.thresholds[i : i + 1])[0]
        assert torch.bincount(exits, minlength=num_exits).tolist() == want["exp"], f"p={want['p']}"
    if kind != "continuous":  # the test really exercised ties at a threshold somewhere
        wanted = torch.tensor([target_counts(h_logits.shape[1], num_exits, p) for p in ps])
        assert (details.holdout_exit_counts[:, :-1] > wanted[:, :-1]).any()


def test_thresholds_give_target_proportions_on_holdout():
    gen = torch.Generator().manual_seed(3)
    num_exits, n = 5, 1000
    logits = torch.randn(num_exits, n, 10, generator=gen, dtype=torch.float64).float() * 3
    labels = torch.randint(0, 10, (n,), generator=gen)
    details = budgeted_details(logits, labels, logits, labels, [1, 2, 3, 4, 5])
    for i, p in enumerate(DEFAULT_PS):
        counts = target_counts(n, num_exits, p)
        got = details.holdout_exit_counts[i].tolist()
        assert got[:-1] == counts[:-1], f"p={p}"
        assert sum(got) == n
        # calibrated on the same data, the test split sees the same proportions
        assert details.test_exit_counts[i].tolist() == got
    # the standalone assignment agrees with the counts found during calibration
    conf, _ = confidence_and_prediction(logits)
    exits = exit_assignment(conf, details.thresholds)
    for k in range(num_exits):
        assert (exits == k).sum(dim=1).tolist() == details.holdout_exit_counts[:, k].tolist()
    # the paper's p = 0.75 example
    q = target_proportions(5, 0.75)
    assert [round(x, 3) for x in q] == [0.328, 0.246, 0.184, 0.138, 0.104]


def test_budgeted_more_budget_more_flops_and_limits():
    gen = torch.Generator().manual_seed(4)
    n, c = 500, 10
    labels = torch.randint(0, c, (n,), generator=gen)
    # later exits are more accurate: logits favour the label more and more
    logits = torch.stack(
        [torch.randn(n, c, generator=gen) + 1.5 * k * nn.functional.one_hot(labels, c) for k in range(4)]
    )
    flops = [1.0, 2.0, 3.0, 4.0]
    curve = budgeted(logits, labels, logits, labels, flops)
    assert [r["p"] for r in curve] == list(DEFAULT_PS)
    fl = [r["flops"] for r in curve]
    assert all(a <= b + 1e-12 for a, b in zip(fl, fl[1:]))  # p grows -> later exits get more
    assert 1.0 <= fl[0] < fl[-1] <= 4.0
    assert curve[-1]["top1"] > curve[0]["top1"]


def test_anytime_matches_hand_computation():
    # 2 exits, 3 samples, 6 classes, hand-picked logits
    logits = torch.tensor(
        [
            [[9, 8, 7, 6, 5, 4], [0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]],
            [[0.5, 9, 1, 1, 1, 0], [1, 2, 3, 4, 5, 6], [0, 0, 0, 0, 0, 9]],
        ],
        dtype=torch.float32,
    )
    labels = torch.tensor([0, 0, 5])
    # exit 1: sample0 top1 hit; sample1 label 0 is the smallest -> miss top5;
    #         sample2 label 5 is rank 6 -> miss
    # exit 2: sample0 label 0 is rank 5 -> top5 only; sample1 label 0 rank 6 -> miss; sample2 hit
    rows = anytime(logits, labels, [10.0, 25.0])
    assert rows[0] == {"exit": 1, "flops": 10.0, "top1": 100 / 3, "top5": 100 / 3}
    assert rows[1] == {"exit": 2, "flops": 25.0, "top1": 100 / 3, "top5": 200 / 3}
    # fewer than 5 classes: top-5 is top-C = 100 %
    small = anytime(torch.randn(1, 7, 3), torch.randint(0, 3, (7,)), [1.0])
    assert small[0]["top5"] == 100.0


def test_bad_inputs_are_named():
    logits, labels = torch.randn(3, 10, 4), torch.randint(0, 4, (10,))
    with pytest.raises(ValueError, match="exit_flops has 2 entries"):
        anytime(logits, labels, [1.0, 2.0])
    with pytest.raises(ValueError, match=r"\[K, N, C\]"):
        anytime(logits[0], labels, [1.0])
    with pytest.raises(ValueError, match="N=10"):
        anytime(logits, labels[:5], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="p must be > 0"):
        budgeted(logits, labels, logits, labels, [1.0, 2.0, 3.0], ps=[0.0])
    bad = logits.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="held-out logits contain NaN"):
        budgeted(bad, labels, logits, labels, [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="exit 1 contain NaN"):
        anytime(bad, labels, [1.0, 2.0, 3.0])
    bad[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="test logits contain NaN or inf"):
        budgeted(logits, labels, bad, labels, [1.0, 2.0, 3.0])
    masked = logits.clone()
    masked[:, :, 0] = float("-inf")  # masked classes are fine
    assert len(budgeted(masked, labels, masked, labels, [1.0, 2.0, 3.0])) == 39
    with pytest.raises(ValueError, match="disagree"):
        budgeted(logits, labels, logits[:2], labels, [1.0, 2.0, 3.0])


class _TwoExit(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(4, 3)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return [self.drop(self.a(x)), self.b(x) * 2]


def test_collect_logits_and_evaluate_model(tmp_path):
    model = _TwoExit().train()
    xs, ys = torch.randn(23, 4), torch.randint(0, 3, (23,))
    loader = [(xs[i : i + 5], ys[i : i + 5]) for i in range(0, 23, 5)]
    logits, labels = collect_logits(model, loader, "cpu")
    assert model.training  # mode restored
    assert logits.shape == (2, 23, 3) and logits.dtype == torch.float32 and labels.tolist() == ys.tolist()
    with torch.no_grad():
        model.eval()
        want = model(xs)
        model.train()
    assert torch.allclose(logits[0], want[0]) and torch.allclose(logits[1], want[1])  # eval: no dropout
    dict_loader = [{"image": xs[:10], "label": ys[:10]}]
    assert collect_logits(model, dict_loader, "cpu", precision="bf16")[0].dtype == torch.float32

    record = evaluate_model(model, loader, loader, "cpu", [1e6, 2e6])
    assert [r["exit"] for r in record["anytime"]] == [1, 2]
    assert len(record["budgeted"]) == 39
    path = write_eval_json(tmp_path / "run" / "eval.json", record["anytime"], record["budgeted"])
    assert load_eval_json(tmp_path / "run") == json.loads(path.read_text())


def test_reseeded_loader_repeats_its_draws_and_leaves_the_callers_random_state_alone():
    """The train_augmented calibration loader: every pass draws the same augmentation, whatever
    the caller draws between batches, and the caller's own stream goes on as if it were not there."""

    class Draws:  # stands in for a loader whose transforms draw from the global generators
        def __iter__(self):
            for _ in range(3):
                yield torch.rand(2), random.random()

    def caller_pass(loader) -> tuple[list, torch.Tensor, float]:
        torch.manual_seed(0)
        random.seed(0)
        batches = []
        for batch in loader:
            batches.append(batch)
            torch.rand(5), random.random()  # the caller's own draws between batches
        return batches, torch.rand(1), random.random()

    loader = ReseededLoader(Draws(), seed=7)
    first, caller_torch, caller_python = caller_pass(loader)
    second = caller_pass(loader)[0]
    assert all(torch.equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(first, second, strict=True))
    assert not torch.equal(first[0][0], first[1][0])  # a stream, not one draw repeated
    without_loader = caller_pass([None] * 3)
    assert torch.equal(caller_torch, without_loader[1]) and caller_python == without_loader[2]
    torch.manual_seed(7)
    assert torch.equal(first[0][0], torch.rand(2))  # the stream starts from the seed


def test_eval_json_schema_and_atomic_write(tmp_path):
    any_rows = [{"exit": 1, "flops": 5.0, "top1": 50.0, "top5": 80.0, "extra": 1}]
    bud_rows = [{"p": 0.05, "flops": 5.0, "top1": 50.0}]
    path = tmp_path / "eval.json"
    write_eval_json(path, any_rows, bud_rows)
    data = json.loads(path.read_text())
    assert data == {
        "anytime": [{"exit": 1, "flops": 5.0, "top1": 50.0, "top5": 80.0}],
        "budgeted": [{"p": 0.05, "flops": 5.0, "top1": 50.0}],
    }
    assert isinstance(data["anytime"][0]["exit"], int)
    assert [p.name for p in tmp_path.iterdir()] == ["eval.json"]  # no temp file left behind
    with pytest.raises(ValueError, match="lacks"):
        write_eval_json(path, [{"exit": 1}], bud_rows)
    assert json.loads(path.read_text()) == data  # a failed write leaves the old file intact
    (tmp_path / "bad.json").write_text('{"anytime": []}')
    with pytest.raises(ValueError, match="expected keys"):
        load_eval_json(tmp_path / "bad.json")


def test_plot_curves_writes_png(tmp_path):
    gen = torch.Generator().manual_seed(5)
    logits, labels = torch.randn(5, 300, 10, generator=gen), torch.randint(0, 10, (300,), generator=gen)
    flops = [339.9e6, 685.5e6, 1008.2e6, 1254.5e6, 1360.5e6]
    rec = {
        "anytime": anytime(logits, labels, flops),
        "budgeted": budgeted(logits, labels, logits, labels, flops),
    }
    out = plot_curves({"L2W": rec, "baseline": rec}, tmp_path / "curve.png", reference="paper_msdnet_imagenet")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    with pytest.raises(ValueError, match="neither a built-in set"):
        plot_curves({"L2W": rec}, tmp_path / "x.png", reference="no_such_reference")


def _load_tool(name):
    path = Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plot_curves_cli(tmp_path, capsys):
    tool = _load_tool("plot_curves")
    run = tmp_path / "run"
    write_eval_json(
        run / "eval.json",
        [{"exit": 1, "flops": 1e6, "top1": 60.0, "top5": 80.0}],
        [{"p": 0.05, "flops": 1e6, "top1": 60.0}],
    )
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps({"paper": [[1e6, 61.0], [2e6, 65.0]]}))
    out = tmp_path / "both.png"
    args = [str(run), str(run / "eval.json"), "--labels", "L2W", "baseline", "--reference", str(ref)]
    assert tool.main(args + ["--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert tool.main([str(run), "--reference", "paper_msdnet_imagenet_step4", "--out", str(out)]) == 0
    with pytest.raises(SystemExit):
        tool.main([str(run), "--labels", "a", "b", "--out", str(out)])
    assert "2 labels for 1 run" in capsys.readouterr().err
    assert tool.main([str(run), "--reference", "nope", "--out", str(out)]) == 2
    assert "neither a built-in set" in capsys.readouterr().err


def _collect_logits_on_rank(env: DistEnv) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    xs = torch.randn(11, 4)
    ys = torch.arange(11)
    # disjoint, unequal parts: rank 0 gets samples 0..6, rank 1 gets 7..10
    part = slice(0, 7) if env.rank == 0 else slice(7, 11)
    loader = [(xs[part][i : i + 3], ys[part][i : i + 3]) for i in range(0, len(ys[part]), 3)]
    logits, labels = collect_logits(model, loader, "cpu")
    with torch.no_grad():
        full = model(xs)
    return logits, labels, full


@pytest.mark.integration
def test_collect_logits_gathers_across_ranks():
    for logits, labels, full in run_ranks(_collect_logits_on_rank, 2):
        assert labels.tolist() == list(range(11)), labels
        assert logits.shape == (1, 11, 3) and torch.allclose(logits[0], full), logits


def test_eval_json_keeps_each_points_thresholds_and_the_calibration_split(tmp_path):
    """A predictor runs an operating point from eval.json alone: the stored thresholds are the
    calibrated float32 values exactly, +inf (nobody leaves) as null, with the split they came from."""
    gen = torch.Generator().manual_seed(3)
    h_logits, h_labels = torch.randn(3, 10, 4, generator=gen), torch.randint(0, 4, (10,), generator=gen)
    t_logits, t_labels = torch.randn(3, 40, 4, generator=gen), torch.randint(0, 4, (40,), generator=gen)
    details = budgeted_details(h_logits, h_labels, t_logits, t_labels, [1.0, 2.0, 3.0])
    assert torch.isinf(details.thresholds[:, :-1]).any() and torch.isfinite(details.thresholds[:, :-1]).any()
    path = write_eval_json(
        tmp_path / "eval.json", [], details.points, calibration={"split": "holdout", "num_samples": 10}
    )
    record = load_eval_json(path)
    assert record["calibration"] == {"split": "holdout", "num_samples": 10}
    assert "Infinity" not in path.read_text()
    for row, want in zip(record["budgeted"], details.thresholds, strict=True):
        assert len(row["thresholds"]) == 2
        assert torch.equal(thresholds_from_list(row["thresholds"], 3), want)  # bit for bit, ±inf included
    with pytest.raises(ValueError, match="2 thresholds for a model of 4 exits"):
        thresholds_from_list([0.5, None], 4)
