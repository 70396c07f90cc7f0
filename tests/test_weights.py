"""What the weight net learned (eval.json ``weights``, weights.png): the numbers recomputed
independently from a trained run's checkpoint, and the pieces on synthetic inputs."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from l2w_dist.evaluate import load_eval_json, write_eval_json
from l2w_dist.evaluate.weights import plot_weights, spearman, weight_analysis
from l2w_dist.meta import L2WConfig, WeightNet
from tests.helpers.tiny_run import make_tiny_spec, overrides

PNG = b"\x89PNG\r\n\x1a\n"


def mean_ranks(v: np.ndarray) -> np.ndarray:
    """0-based ranks, ties given the mean of the ranks they span."""
    values, inverse, counts = np.unique(v, return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts
    return (first + (counts - 1) / 2)[inverse]


def numpy_spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(mean_ranks(a), mean_ranks(b))[0, 1])


def test_spearman_matches_numpy_and_its_sign():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(500, generator=gen)
    b = 0.3 * a + torch.randn(500, generator=gen)
    assert spearman(a, b) == pytest.approx(numpy_spearman(a.numpy(), b.numpy()), abs=1e-12)
    assert spearman(a, a.exp()) == pytest.approx(1.0)  # monotone: rank correlation 1
    assert spearman(a, -a) == pytest.approx(-1.0)
    ties = torch.tensor([1.0, 1.0, 2.0, 3.0, 3.0, 3.0])
    other = torch.tensor([0.0, 2.0, 1.0, 5.0, 4.0, 6.0])
    assert spearman(ties, other) == pytest.approx(numpy_spearman(ties.numpy(), other.numpy()), abs=1e-12)


def test_analysis_reads_a_weight_net_that_favours_easy_samples_early():
    """A weight net whose first output falls and last output rises with the last-exit loss:
    the analysis must report a negative correlation at exit 1 and a positive one at exit 3."""
    torch.manual_seed(0)
    net = WeightNet(3, hidden=1, input="loss")
    with torch.no_grad():
        net.mlp[0].weight.copy_(torch.tensor([[0.0, 0.0, 1.0]]))  # hidden = relu(loss at exit 3)
        net.mlp[0].bias.zero_()
        net.mlp[2].weight.copy_(torch.tensor([[-1.0], [0.0], [1.0]]))
        net.mlp[2].bias.zero_()
    logits = torch.randn(3, 400, 4) * 3
    labels = torch.randint(0, 4, (400,))
    record = weight_analysis(net, logits, labels, L2WConfig(epsilon=0.8, constraint="col"), "test")
    first, middle, last = record["exits"]
    assert record["samples"] == 400 and record["split"] == "test"
    assert first["spearman"] < -0.9 and last["spearman"] > 0.9
    assert first["easy_mean"] > first["hard_mean"] and last["easy_mean"] < last["hard_mean"]
    assert len(first["quintile_means"]) == 5
    assert first["quintile_means"][0] == first["easy_mean"] and first["quintile_means"][-1] == first["hard_mean"]
    # col: every sample's weights average 1 over the exits, so the quintile means do too
    for q in range(5):
        assert np.mean([row["quintile_means"][q] for row in record["exits"]]) == pytest.approx(1.0)


def test_eval_json_keeps_the_weights_section_and_the_figure(tmp_path):
    record = {
        "split": "calibration",
        "samples": 10,
        "difficulty": "x",
        "exits": [
            {"exit": k, "spearman": 0.1 * k, "easy_mean": 1.0, "hard_mean": 1.1, "quintile_means": [1.0] * 5}
            for k in (1, 2)
        ],
    }
    path = write_eval_json(tmp_path / "eval.json", [], [], weights=record)
    assert load_eval_json(path)["weights"] == record
    assert plot_weights(record, tmp_path / "weights.png").read_bytes()[:8] == PNG
    path.write_text(json.dumps({"anytime": [], "budgeted": [], "other": 1}))
    with pytest.raises(ValueError, match="expected keys"):
        load_eval_json(path)


@pytest.mark.integration
def test_eval_json_weights_are_the_checkpoints_weight_net_on_the_held_out_split(tmp_path):
    """Train a tiny L2W run (losses and confidences as the weight net's input, label smoothing),
    then recompute its eval.json ``weights`` from last.pt by hand: the model in eval mode on
    the held-out images, the weight net's input as the L2W step builds it, ``col`` weights,
    difficulty = last-exit cross-entropy, numpy ranks and quintiles."""
    from l2w_dist.config import apply_overrides
    from l2w_dist.data import attach_device_normalization, eval_loader
    from l2w_dist.distributed import init_distributed
    from l2w_dist.engine.checkpoint import load_checkpoint
    from l2w_dist.models import create_model
    from l2w_dist.train import run_training

    spec = make_tiny_spec(tmp_path)
    run_dir = tmp_path / "run"
    extra = {"train.max_steps": 6, "meta.input": "both", "optim.label_smoothing": 0.1, "meta.epsilon": 0.5}
    assert run_training(None, run_dir, overrides(spec, **extra))["status"] == "finished"
    saved = json.loads((run_dir / "eval.json").read_text())["weights"]
    assert (run_dir / "weights.png").read_bytes()[:8] == PNG

    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    cfg = apply_overrides(state["config"], [])
    model = create_model(cfg.model.name, **cfg.model.options)
    attach_device_normalization(model, cfg)
    model.load_state_dict(state["model"])
    model.eval()
    xs, ys = [], []
    for x, y in eval_loader(cfg, init_distributed(), spec, "holdout"):
        xs.append(x)
        ys.append(y)
    x, y = torch.cat(xs), torch.cat(ys).long()
    with torch.no_grad():
        logits = [z.float() for z in model(x)]
        ce = torch.stack([F.cross_entropy(z, y, reduction="none", label_smoothing=0.1) for z in logits], 1)
        conf = torch.stack([z.softmax(1).max(1).values for z in logits], 1)
        wn = state["weight_net"]  # Linear, ReLU, Linear, tanh
        hidden = torch.relu(torch.cat([ce, conf], 1) @ wn["mlp.0.weight"].T + wn["mlp.0.bias"])
        scores = torch.tanh(hidden @ wn["mlp.2.weight"].T + wn["mlp.2.bias"])
        weights = (1 + 0.5 * (scores - scores.mean(1, keepdim=True))).double().numpy()
        hardness = F.cross_entropy(logits[-1], y, reduction="none").double().numpy()
    assert saved["samples"] == len(y) == 64
    groups = np.array_split(np.argsort(hardness, kind="stable"), 5)
    assert [row["exit"] for row in saved["exits"]] == [1, 2, 3]
    for k, row in enumerate(saved["exits"]):
        assert row["spearman"] == pytest.approx(numpy_spearman(weights[:, k], hardness), abs=1e-9)
        assert row["quintile_means"] == pytest.approx([weights[g, k].mean() for g in groups], abs=1e-5)
        assert row["easy_mean"] == pytest.approx(weights[groups[0], k].mean(), abs=1e-5)
        assert row["hard_mean"] == pytest.approx(weights[groups[-1], k].mean(), abs=1e-5)
    assert any(abs(row["easy_mean"] - row["hard_mean"]) > 1e-4 for row in saved["exits"])  # not all flat
