"""Checkpoints: atomic writes survive a kill mid-write; RNG state round-trips; best-k bookkeeping."""

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from l2w_dist.engine.checkpoint import CheckpointManager, load_checkpoint, rng_state, save_atomic, set_rng_state


def test_rng_state_round_trip_through_weights_only_file(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    save_atomic({"rng": rng_state()}, tmp_path / "r.pt")
    expected = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_state(load_checkpoint(tmp_path / "r.pt")["rng"])
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert expected[0] == again[0] and expected[1] == again[1] and torch.equal(expected[2], again[2])


@pytest.mark.integration
def test_kill_during_write_leaves_previous_checkpoint_loadable(tmp_path):
    path = tmp_path / "last.pt"
    save_atomic({"step": 1, "w": torch.ones(4)}, path)
    # A child process writes a large checkpoint to the same path, over and over; kill it mid-write.
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {os.getcwd()!r})
        from l2w_dist.engine.checkpoint import save_atomic
        big = torch.randn(16_000_000)
        print("ready", flush=True)
        for step in range(2, 1000):
            save_atomic({{"step": step, "w": big}}, {str(path)!r})
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    time.sleep(0.3)  # inside a 64 MB write most of the time
    child.send_signal(signal.SIGKILL)
    child.wait()
    state = load_checkpoint(path)  # must not be torn
    assert state["step"] >= 1 and state["w"].numel() in (4, 16_000_000)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "last.pt"]
    assert all(name.endswith(".tmp") for name in leftovers)  # only an abandoned temp file, never the target


def test_best_k_keeps_the_k_highest(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_best=2)
    for step, score in [(1, 50.0), (2, 70.0), (3, 60.0), (4, 40.0), (5, 80.0)]:
        mgr.consider_best({"step": step}, score, step)
    assert [name for _, name in mgr.best] == ["best_step_5.pt", "best_step_2.pt"]
    assert sorted(p.name for p in tmp_path.glob("best_*.pt")) == ["best_step_2.pt", "best_step_5.pt"]
