"""The training job under torchrun: 2 gloo ranks with DDP, then DeepSpeed ZeRO-2, one run folder.

A run is started with DDP, continued with DeepSpeed ZeRO-2 from the same checkpoint (the
optimizer state is saved in torch format, so a run may change backend), and evaluated.
"""

import json
from pathlib import Path

import pytest

from l2w_dist.engine.checkpoint import load_checkpoint
from tests.helpers.tiny_run import make_tiny_spec, overrides
from tests.helpers.torchrun import REPO, run_torchrun

pytestmark = pytest.mark.integration


def torchrun(run_dir: Path, args: list[str], count_dir: Path | None = None) -> str:
    """``l2w_dist.train`` on configs/demo.yaml under torchrun, 2 ranks; returns its stdout.
    ``count_dir``: through tests/dist_scripts/count_eval.py, which records there what each
    rank's evaluation saw."""
    config = str(REPO / "configs" / "demo.yaml")
    entry = (
        [str(REPO / "tests" / "dist_scripts" / "count_eval.py"), str(count_dir)]
        if count_dir
        else ["-m", "l2w_dist.train"]
    )
    return run_torchrun([*entry, "--config", config, "--output", str(run_dir), *args])[0]


def test_ddp_then_zero2_resume_and_evaluate(tmp_path):
    spec = make_tiny_spec(tmp_path)
    run_dir = tmp_path / "run"
    common = overrides(spec, **{"train.epochs": 1})
    torchrun(run_dir, [*common, "train.max_steps=3", "eval.enabled=false", "dist.backend=ddp"])
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert state["step"] == 3 and state["world_size"] == 2

    counts = tmp_path / "counts"
    out = torchrun(run_dir, [*common, "train.max_steps=6", "dist.backend=deepspeed", "dist.zero_stage=2"], counts)
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert state["step"] == 6
    assert state["config"]["dist"]["backend"] == "deepspeed"
    assert "| exit | MFLOPs | top-1 % | top-5 % |" in out  # rank 0 printed the anytime table once
    assert out.count("| exit | MFLOPs") == 1
    result = json.loads((run_dir / "eval.json").read_text())
    assert len(result["anytime"]) == 3 and len(result["budgeted"]) == 39
    # Each of the 64 held-out (calibration) and 64 test images was evaluated by exactly one
    # rank, both ranks took part, and the gather gave every rank all of them, in rank order.
    ranks = [json.loads((counts / f"rank{r}.json").read_text()) for r in range(2)]
    assert [len(calls) for calls in ranks] == [2, 2]  # calibration split, test split
    for split in range(2):
        first, second = ranks[0][split], ranks[1][split]
        assert first["local"] and second["local"]
        assert len(first["local"]) + len(second["local"]) == 64
        assert len(set(first["local"]) | set(second["local"])) == 64  # disjoint, all distinct
        together = first["local_labels"] + second["local_labels"]
        assert first["gathered_labels"] == second["gathered_labels"] == together
    for row in result["anytime"]:  # the accuracies count the 64 test images
        assert abs(row["top1"] * 64 / 100 - round(row["top1"] * 64 / 100)) < 1e-6
