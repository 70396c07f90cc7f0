"""The training job end to end on a tiny synthetic data set: exact resume, NaN handling,
config errors, W&B offline logging, eval.json and l2w-eval (the trainer's eval.json again)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from l2w_dist.engine.checkpoint import load_checkpoint
from l2w_dist.engine.trainer import NonFiniteLossError
from l2w_dist.train import run_training
from tests.helpers.tiny_run import make_tiny_spec, overrides

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_spec(tmp_path_factory) -> str:
    return make_tiny_spec(tmp_path_factory.mktemp("tiny_data"))


def wandb_record_bytes(path: Path) -> bytes:
    """The concatenated protobuf records of a W&B run file, in which logged keys appear verbatim.

    The file is a 7-byte header then LevelDB-log blocks of 32 KiB: each record fragment has a
    7-byte header (crc32, length, type) and a block's tail under 7 bytes is padding. Searching the
    raw file would miss a key split across two blocks.
    """
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, parts, block = 7, [], 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        length = int.from_bytes(data[pos + 4 : pos + 6], "little")
        parts.append(data[pos + 7 : pos + 7 + length])
        pos += 7 + length
    return b"".join(parts)


def final_state(run_dir: Path) -> dict:
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")


def assert_same_tensors(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), f"{what}: {key} differs"
        elif isinstance(a[key], dict):
            assert_same_tensors(a[key], b[key], f"{what}.{key}")


@pytest.mark.parametrize("meta_enabled", [True, False], ids=["l2w", "baseline"])
def test_resume_is_bit_exact(tmp_path, tiny_spec, meta_enabled):
    """Stopped at step s and resumed to 2s = uninterrupted to 2s, bit for bit (mid-epoch stop)."""
    common = overrides(tiny_spec, **{"meta.enabled": meta_enabled, "eval.enabled": False})
    straight = run_training(None, tmp_path / "straight", [*common, "train.max_steps=10"])
    assert straight == {"status": "finished", "step": 10, "run_dir": str(tmp_path / "straight")}
    first = run_training(None, tmp_path / "resumed", [*common, "train.max_steps=5"])
    assert first["step"] == 5 and final_state(tmp_path / "resumed")["step"] == 5
    second = run_training(None, tmp_path / "resumed", [*common, "train.max_steps=10"])
    assert second["step"] == 10
    a, b = final_state(tmp_path / "straight"), final_state(tmp_path / "resumed")
    for part in ("model", "weight_net", "optimizer", "meta_optimizer"):
        assert_same_tensors(a[part], b[part], part)
    assert a["scheduler"] == b["scheduler"]
    # The parameters did move (the comparison is not between two untouched models).
    init = run_training(None, tmp_path / "zero", [*common, "train.max_steps=1"])
    assert init["step"] == 1
    moved = final_state(tmp_path / "zero")["model"]
    assert any(not torch.equal(moved[k], a["model"][k]) for k in moved if moved[k].is_floating_point())


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, tiny_spec, monkeypatch):
    run_dir = tmp_path / "run"
    run_training(None, run_dir, overrides(tiny_spec, **{"train.max_steps": 2, "eval.enabled": False}))

    # Fault injection: after the 4th step a weight of the first exit's classifier blows up to
    # NaN (as a diverging run does); the 5th step's loss is then NaN and the run must stop.
    from l2w_dist.engine.trainer import TrainingJob

    original = TrainingJob.train_step

    def blowing_up(self, x, y):
        stats = original(self, x, y)
        if self.step == 3:
            with torch.no_grad():
                next(self.backend.module.exit_heads[0].parameters()).fill_(float("nan"))
        return stats

    monkeypatch.setattr(TrainingJob, "train_step", blowing_up)
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 5.*last good checkpoint is .*last\.pt"):
        run_training(None, run_dir, overrides(tiny_spec, **{"train.max_steps": 8, "eval.enabled": False}))
    state = final_state(run_dir)
    assert state["step"] == 2  # the NaN state was never saved
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_cli_rejects_bad_config_before_running(tmp_path):
    out = tmp_path / "never"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "l2w_dist.train",
            "--config",
            str(ROOT / "configs/demo.yaml"),
            "--output",
            str(out),
            "optim.lrr=0.1",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert proc.returncode == 2
    assert "unknown key(s) ['optim.lrr']" in proc.stderr and "allowed:" in proc.stderr
    assert not out.exists()


def test_l2w_eval_module_reports_a_missing_checkpoint(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "l2w_dist.validate", "--checkpoint", str(tmp_path / "none.pt")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert proc.returncode == 2
    assert f"l2w-eval: no checkpoint at {tmp_path / 'none.pt'}" in proc.stderr


def test_eval_json_wandb_offline_and_l2w_eval(tmp_path, tiny_spec):
    run_dir = tmp_path / "run"
    result = run_training(
        None,
        run_dir,
        overrides(
            tiny_spec, **{"train.batch_size": 32, "wandb.mode": "offline", "eval.every_epochs": 1, "train.epochs": 1}
        ),
    )
    assert result["status"] == "finished"
    saved = json.loads((run_dir / "eval.json").read_text())
    assert set(saved) == {"anytime", "budgeted", "calibration", "weights"}  # L2W: what its weight net learned too
    assert saved["calibration"] == {"split": "holdout", "num_samples": 64}
    assert [r["exit"] for r in saved["weights"]["exits"]] == [1, 2, 3]
    assert (run_dir / "weights.png").is_file()
    assert [r["exit"] for r in saved["anytime"]] == [1, 2, 3]
    assert all(set(r) == {"exit", "flops", "top1", "top5"} for r in saved["anytime"])
    budget_keys = {"p", "flops", "top1", "thresholds"}
    assert len(saved["budgeted"]) == 39 and all(set(r) == budget_keys for r in saved["budgeted"])
    assert all(len(r["thresholds"]) == 2 for r in saved["budgeted"])  # exits 1..K-1
    flops = [r["flops"] for r in saved["anytime"]]
    assert flops == sorted(flops) and flops[0] > 0
    assert (run_dir / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run_dir / "config.yaml").is_file()
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("meta_loss" in m for m in metrics) and any("eval/top1_exit3" in m for m in metrics)
    assert list((run_dir / "checkpoints").glob("best_step_*.pt")), "best-k checkpoint at the epoch end"

    # W&B offline: one run folder whose record file holds the logged keys; no network needed.
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    records = wandb_record_bytes(next(runs[0].glob("run-*.wandb")))
    for key in (
        "loss",
        "meta_loss",
        "lr",
        "img_per_s",
        "w_mean/0",
        "w_std/2",
        "alloc/1",
        "weights/hist_exit1",
        "holdout/top1_exit3",
        "eval/top1_exit1",
        "eval/top5_exit3",
        "eval/budgeted_curve",
        "eval/budgeted_best_top1",
        "weights/spearman_exit1",
        "weights/hard_mean_exit3",
        "weights/vs_difficulty",
    ):
        assert key.encode() in records, f"{key} missing from the W&B offline run"
    assert final_state(run_dir)["wandb_id"] == runs[0].name.rsplit("-", 1)[-1]

    # l2w-eval on the checkpoint reproduces the anytime table.
    from l2w_dist.validate import evaluate_checkpoint

    again = evaluate_checkpoint(run_dir / "checkpoints" / "last.pt", tmp_path / "re_eval")
    assert again["anytime"] == saved["anytime"]
    re_saved = json.loads((tmp_path / "re_eval" / "eval.json").read_text())
    assert re_saved["anytime"] == saved["anytime"] and re_saved["weights"] == saved["weights"]
    assert (tmp_path / "re_eval" / "weights.png").is_file()


@pytest.mark.parametrize("calibration", ["holdout", "train_augmented"])
def test_l2w_eval_writes_the_trainers_eval_json(tmp_path, tiny_spec, calibration):
    """l2w-eval on the final checkpoint writes the eval.json the trainer wrote, for either
    calibration split (train_augmented: the same augmented training images on both sides)."""
    run_dir = tmp_path / "run"
    extra = {"data.calibration": calibration, "train.max_steps": 3, "train.ema_decay": 0.5, "meta.enabled": False}
    assert run_training(None, run_dir, overrides(tiny_spec, **extra))["status"] == "finished"
    from l2w_dist.validate import main as l2w_eval

    l2w_eval(["--checkpoint", str(run_dir / "checkpoints" / "last.pt"), "--output", str(tmp_path / "again")])
    trained = json.loads((run_dir / "eval.json").read_text())
    again = json.loads((tmp_path / "again" / "eval.json").read_text())
    assert len(again["budgeted"]) == 39
    assert again == trained


def test_trainer_options_bf16_channels_last_ema_clip_warmup_periodic(tmp_path, tiny_spec):
    """The optional trainer features together: bf16 autocast, channels_last, EMA, clipping,
    label smoothing, warm-up, lr scaling with the batch, periodic checkpoints."""
    run_dir = tmp_path / "run"
    result = run_training(
        None,
        run_dir,
        overrides(
            tiny_spec,
            **{
                "train.max_steps": 4,
                "eval.enabled": False,
                "train.precision": "bf16",
                "train.channels_last": True,
                "train.ema_decay": 0.5,
                "optim.grad_clip": 1.0,
                "optim.label_smoothing": 0.1,
                "optim.warmup_steps": 3,
                "optim.lr_reference_batch": 32,
                "train.ckpt_every": 2,
            },
        ),
    )
    assert result["status"] == "finished"
    state = final_state(run_dir)
    assert (run_dir / "checkpoints" / "step_2.pt").is_file() and (run_dir / "checkpoints" / "step_4.pt").is_file()
    ema, model = state["ema"], state["model"]
    assert ema is not None and ema.keys() == model.keys()
    floats = [k for k in model if model[k].is_floating_point()]
    assert any(not torch.equal(ema[k], model[k]) for k in floats)  # EMA lags the weights
    assert all(torch.isfinite(model[k]).all() for k in floats)
    lrs = [json.loads(line)["lr"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # lr 0.05 at batch 32 -> 0.025 at batch 16, reached after a 3-step warm-up from 0.
    assert lrs[0] < lrs[1] < lrs[2] and abs(max(lrs) - 0.025) < 1e-3


def test_normalize_on_device_trains_like_loader_normalization(tmp_path, tiny_spec):
    """data.normalize_on=device: uint8 batches, normalised by a hook on the model (and on its EMA
    copy, used for evaluation): the same training as normalising in the loader, to rounding.
    Two baseline steps: this tiny model is chaotic (inputs perturbed by 2e-7 moved a weight by
    0.36 after 6 steps) and an L2W step's exit allocation is a sort that rounding can flip;
    tests/test_data.py checks the normalised inputs themselves to 2e-6."""
    runs = {}
    for where in ("loader", "device"):
        run_dir = tmp_path / where
        result = run_training(
            None,
            run_dir,
            overrides(
                tiny_spec,
                **{"data.normalize_on": where, "train.max_steps": 2, "train.ema_decay": 0.5, "meta.enabled": False},
            ),
        )
        assert result["status"] == "finished"
        runs[where] = (final_state(run_dir), json.loads((run_dir / "eval.json").read_text()))
    (dev, dev_eval), (ref, ref_eval) = runs["device"], runs["loader"]
    for key, value in ref["model"].items():
        if value.is_floating_point():
            torch.testing.assert_close(dev["model"][key], value, rtol=1e-4, atol=1e-5)
    for a, b in zip(dev_eval["anytime"], ref_eval["anytime"]):
        assert abs(a["top1"] - b["top1"]) <= 100 / 64 + 1e-9  # at most one test image flips
