"""The shared mechanisms of l2w_dist.utils: the atomic writer and the autocast helper."""

from __future__ import annotations

import json
import os

import pytest
import torch

from l2w_dist.utils import atomic_write, atomic_write_json, autocast


def test_atomic_write_replaces_whole_and_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "sub" / "state.bin"
    with atomic_write(path) as f:
        f.write(b"first")
    assert path.read_bytes() == b"first"
    with pytest.raises(RuntimeError, match="disk gone"):
        with atomic_write(path) as f:
            f.write(b"half of the second")
            raise RuntimeError("disk gone")
    assert path.read_bytes() == b"first"
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.bin"]  # no temporary left behind


def test_atomic_write_gives_the_permissions_of_a_plain_open(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    with atomic_write(tmp_path / "atomic.txt", "w") as f:
        f.write("x")
    assert os.stat(tmp_path / "atomic.txt").st_mode == os.stat(plain).st_mode


def test_atomic_write_json_round_trips_and_refuses_other_modes(tmp_path):
    path = atomic_write_json(tmp_path / "r.json", {"a": [1, 2.5]})
    assert json.loads(path.read_text()) == {"a": [1, 2.5]}
    assert path.read_text().endswith("\n")
    with pytest.raises(ValueError, match="mode='a'"):
        with atomic_write(tmp_path / "x", "a"):
            pass


def test_autocast_is_bf16_only_when_asked():
    lin = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    with autocast("cpu", "bf16"):
        assert lin(x).dtype == torch.bfloat16
    with autocast(torch.device("cpu"), "fp32"):
        assert lin(x).dtype == torch.float32
    with pytest.raises(ValueError, match="precision='fp16'"):
        autocast("cpu", "fp16")
