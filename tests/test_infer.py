"""Real early exit (l2w_dist.infer): the predictor takes, sample for sample, the exits and
predictions of the simulated budgeted evaluation of a trained tiny run; compaction when no
sample or every sample leaves early; l2w-infer's output and its one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from l2w_dist.config import apply_overrides
from l2w_dist.data import calibration_loader, eval_loader
from l2w_dist.distributed.env import DistEnv
from l2w_dist.engine.checkpoint import load_checkpoint
from l2w_dist.evaluate import budgeted_details, collect_logits, confidence_and_prediction, exit_assignment
from l2w_dist.infer import DynamicPredictor, PredictorError, choose_point
from l2w_dist.infer.cli import main as infer_main
from l2w_dist.infer.cli import run_predictor
from l2w_dist.models import create_model
from l2w_dist.train import run_training
from l2w_dist.validate import build_evaluated_model, checkpoint_weights
from tests.helpers.tiny_run import make_tiny_spec, overrides

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A briefly trained tiny MSDNet (3 exits) with its eval.json; few steps, so that not every
    sample is easy and the budget points spread the samples over the exits."""
    folder = tmp_path_factory.mktemp("infer")
    spec = make_tiny_spec(folder)
    cfg = overrides(spec, **{"meta.enabled": False, "train.max_steps": 3})
    assert run_training(None, folder / "run", cfg)["status"] == "finished"
    return folder / "run"


def simulated(run_dir: Path, p: float) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The budgeted evaluation's own exits and predictions on the test split at point ``p``."""
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    cfg = apply_overrides(state["config"], [])
    model = build_evaluated_model(cfg, checkpoint_weights(state, "auto", "ckpt"), "cpu")
    env = DistEnv()
    h_logits, h_labels = collect_logits(model, calibration_loader(cfg, env, cfg.data.spec), "cpu")
    t_logits, t_labels = collect_logits(model, eval_loader(cfg, env, cfg.data.spec, "test"), "cpu")
    details = budgeted_details(h_logits, h_labels, t_logits, t_labels, model.exit_flops, [p])
    conf, pred = confidence_and_prediction(t_logits)
    exits = exit_assignment(conf, details.thresholds)[0]
    return exits, pred.gather(0, exits[None])[0], details.points[0]


@pytest.mark.integration
def test_predictor_takes_the_simulated_exits_on_a_trained_run(tiny_run):
    record = json.loads((tiny_run / "eval.json").read_text())
    # the point with the most even spread of test samples over the exits
    p = 0.75
    want_exits, want_pred, want_point = simulated(tiny_run, p)
    assert (torch.bincount(want_exits, minlength=3) > 0).sum() >= 2, "the point must use several exits"

    predictor = DynamicPredictor.from_checkpoint(tiny_run / "checkpoints" / "last.pt", point=p)
    cfg = predictor.config
    loader = eval_loader(cfg, DistEnv(), cfg.data.spec, "test")
    run = run_predictor(predictor, loader, progress=False)
    assert torch.equal(run["exits"], want_exits)
    assert torch.equal(run["classes"], want_pred)
    row = next(r for r in record["budgeted"] if r["p"] == p)
    assert run["result"]["top1"] == pytest.approx(row["top1"], abs=1e-9) == want_point["top1"]
    assert run["result"]["mflops_counted"] * 1e6 == pytest.approx(row["flops"], rel=1e-12)
    assert run["result"]["exit_counts"] == torch.bincount(want_exits, minlength=3).tolist()
    assert run["result"]["seconds"] > 0 and run["result"]["seconds_full"] > 0


@pytest.mark.integration
def test_l2w_infer_cli_writes_out_json_and_refuses_bad_input(tiny_run, tmp_path, capsys):
    ckpt = tiny_run / "checkpoints" / "last.pt"
    out = tmp_path / "out.json"
    # python -m l2w_dist.infer is the command (its cheapest path: a missing checkpoint, exit 2)
    proc = subprocess.run(
        [sys.executable, "-m", "l2w_dist.infer", "--checkpoint", str(tmp_path / "none.pt"), "--point", "0.5"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 2 and proc.stderr.strip() == f"l2w-infer: no checkpoint at {tmp_path / 'none.pt'}"
    threads = torch.get_num_threads()
    try:
        args = ["--checkpoint", str(ckpt), "--point", "0.5", "--output", str(out), "--batch-size", "16"]
        infer_main([*args, "--threads", "1", "--no-progress"])
    finally:
        torch.set_num_threads(threads)
    got = json.loads(out.read_text())
    row = next(r for r in json.loads((tiny_run / "eval.json").read_text())["budgeted"] if r["p"] == 0.5)
    for key in ("point", "thresholds", "num_samples", "top1", "exit_counts", "mflops_expected", "mflops_counted"):
        assert key in got, key
    assert got["point"] == 0.5 and got["thresholds"] == row["thresholds"] and got["num_samples"] == 64
    assert got["top1"] == pytest.approx(row["top1"]) and got["mflops_expected"] * 1e6 == pytest.approx(row["flops"])
    assert got["mflops_counted"] == pytest.approx(got["mflops_expected"], rel=1e-12)  # batch 16: same exits
    assert got["speedup"] == pytest.approx(got["seconds_full"] / got["seconds"])
    assert got["batch_size"] == 16 and got["threads"] == 1

    # a folder of images: classified with the run's evaluation transform, file by file
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    for i, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        Image.new("RGB", (32, 32), colour).save(photos / f"img{i}.png")
    (photos / "notes.txt").write_text("not an image")
    record = infer_main(["--checkpoint", str(ckpt), "--point", "0.5", "--images", str(photos), "--no-progress"])
    assert record["num_samples"] == 3 and record["top1"] is None and sum(record["exit_counts"]) == 3
    assert record["per_sample"]["file"] == ["img0.png", "img1.png", "img2.png"]
    assert len(record["per_sample"]["class"]) == len(record["per_sample"]["exit"]) == 3
    capsys.readouterr()

    def refused(*args: str) -> str:
        with pytest.raises(SystemExit) as info:
            infer_main(["--checkpoint", str(ckpt), "--no-progress", *args])
        assert info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("l2w-infer: "), err
        return err

    assert "point=2.5 is not a budget point" in refused("--point", "2.5") and "0.05 ... 1.95" in refused("--point", "0")
    assert "mflops=0.001 is unreachable" in refused("--mflops", "0.001")
    old = json.loads((tiny_run / "eval.json").read_text())
    for r in old["budgeted"]:
        del r["thresholds"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert "keeps no thresholds" in refused("--point", "0.5", "--eval-json", str(tmp_path / "old.json"))
    assert "no eval.json at" in refused("--point", "0.5", "--eval-json", str(tmp_path / "none.json"))
    assert "1 thresholds for a model of 3 exits" in refused("--thresholds", "0.5")  # K-1 = 2 wanted
    # a budget between two points takes the most expensive point within it
    chosen = choose_point(json.loads((tiny_run / "eval.json").read_text()), mflops=row["flops"] / 1e6 + 1e-9)
    assert chosen.flops_expected >= row["flops"] and chosen.flops_expected <= row["flops"] + 1e-3


def _tiny_model():
    torch.manual_seed(0)
    return create_model("msdnet_cifar", num_classes=5, num_blocks=3, channels=4, growth_rate=2)


def test_compaction_when_nobody_or_everybody_leaves_early():
    model = _tiny_model().eval()
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        full = model(x)
    nobody = DynamicPredictor(model, [None, None]).predict(x)  # T = +inf: everyone runs every stage
    assert nobody.stage_samples == [6, 6, 6] and nobody.exits.tolist() == [2] * 6
    assert torch.equal(nobody.classes, full[2].argmax(1))
    everybody = DynamicPredictor(model, [0.0, 0.0]).predict(x)  # conf >= 0 always: all leave at exit 0
    assert everybody.stage_samples == [6] and everybody.exits.tolist() == [0] * 6
    assert torch.equal(everybody.classes, full[0].argmax(1))
    conf = torch.softmax(full[0], 1).max(1).values
    assert torch.equal(everybody.confidence, conf)
    # a threshold equal to a sample's confidence lets it leave (>=, as the evaluation)
    tie = DynamicPredictor(model, [conf.max().item(), None]).predict(x)
    assert tie.exits[conf.argmax()].item() == 0 and (tie.exits == 0).sum().item() == (conf == conf.max()).sum().item()
    assert tie.stage_samples == [6, 6 - (tie.exits == 0).sum().item(), 6 - (tie.exits == 0).sum().item()]
    with pytest.raises(PredictorError, match="1 thresholds for a model of 3 exits"):
        DynamicPredictor(model, [0.5])


@pytest.mark.slow
@pytest.mark.integration
def test_exported_stages_give_the_same_outputs(tiny_run, tmp_path):
    """--export writes one torch.export program per stage; --exported runs them without the
    model code and takes the same exits and predictions as the checkpoint."""
    ckpt = tiny_run / "checkpoints" / "last.pt"
    common = ["--no-progress", "--per-sample"]
    assert infer_main(["--checkpoint", str(ckpt), "--point", "0.75", "--export", str(tmp_path / "exp")])
    assert sorted(p.name for p in (tmp_path / "exp").iterdir()) == [
        "meta.json",
        "stage_0.pt2",
        "stage_1.pt2",
        "stage_2.pt2",
    ]
    direct = infer_main(["--checkpoint", str(ckpt), "--point", "0.75", *common])
    exported = infer_main(["--exported", str(tmp_path / "exp"), "--batch-size", "7", *common])
    assert exported["point"] == 0.75 and exported["thresholds"] == direct["thresholds"]
    assert exported["per_sample"]["exit"] == direct["per_sample"]["exit"]
    assert exported["per_sample"]["class"] == direct["per_sample"]["class"]
    assert exported["top1"] == direct["top1"] and exported["mflops_counted"] == pytest.approx(direct["mflops_counted"])


def test_export_of_a_family_without_stages_says_why(tmp_path):
    from l2w_dist.infer.export import ExportError, export_stages

    model = create_model("cnn_exits", backbone="efficientnet_b0", num_classes=3, img_size=32)
    with pytest.raises(ExportError, match="cannot be exported: .*EfficientNetFeatures"):
        export_stages(model, torch.randn(2, 3, 32, 32), tmp_path / "exp", {"thresholds": [None] * 3}, {})
    assert not (tmp_path / "exp").exists()
