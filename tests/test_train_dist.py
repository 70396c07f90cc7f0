"""The training job under torchrun: 2 gloo ranks with DDP, then DeepSpeed ZeRO-2, one run folder.

A run is started with DDP, continued with DeepSpeed ZeRO-2 from the same checkpoint (the
optimizer state is saved in torch format, so a run may change backend), and evaluated.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

from test_train import make_tiny_spec, overrides

from l2w_dist.distributed.testing import free_port
from l2w_dist.engine.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def torchrun(run_dir: Path, args: list[str], nproc: int = 2) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        "-m",
        "l2w_dist.train",
        "--config",
        str(ROOT / "configs/demo.yaml"),
        "--output",
        str(run_dir),
        *args,
    ]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout


def test_ddp_then_zero2_resume_and_evaluate(tmp_path):
    spec = make_tiny_spec(tmp_path)
    run_dir = tmp_path / "run"
    common = overrides(spec, **{"train.epochs": 1})
    torchrun(run_dir, [*common, "train.max_steps=3", "eval.enabled=false", "dist.backend=ddp"])
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert state["step"] == 3 and state["world_size"] == 2

    out = torchrun(run_dir, [*common, "train.max_steps=6", "dist.backend=deepspeed", "dist.zero_stage=2"])
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert state["step"] == 6
    assert state["config"]["dist"]["backend"] == "deepspeed"
    assert "| exit | MFLOPs | top-1 % | top-5 % |" in out  # rank 0 printed the anytime table once
    assert out.count("| exit | MFLOPs") == 1
    result = json.loads((run_dir / "eval.json").read_text())
    assert len(result["anytime"]) == 3 and len(result["budgeted"]) == 39
    # The two ranks evaluated disjoint halves of the 64 test images: accuracies are multiples of 1/64.
    for row in result["anytime"]:
        assert abs(row["top1"] * 64 / 100 - round(row["top1"] * 64 / 100)) < 1e-6
