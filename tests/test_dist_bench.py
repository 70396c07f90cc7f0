"""bench/scaling.py runs, and its byte counts match the algorithm's collectives exactly."""

from __future__ import annotations

import pytest

from bench import scaling

pytestmark = pytest.mark.integration


def test_scaling_bench_counts_bytes(tmp_path):
    batch, world = 4, 2
    out = scaling.main(
        [
            "--batch",
            str(batch),
            "--iters",
            "1",
            "--warmup",
            "0",
            "--worlds",
            str(world),
            "--modes",
            "plain,l2w,l2w_pre",
            "--md",
            str(tmp_path / "dist.md"),
        ]
    )
    r = out[str(world)]
    theta = 4 * r["l2w"]["params"]  # fp32 bytes of the model
    phi = 4 * r["l2w"]["weight_net_params"]
    k = 5  # msdnet_cifar exits
    # per half step: pseudo-gradient, u (+ the meta-loss value), meta confidences gathered, weight-net grad
    per_half = theta + (theta + 4) + 4 * k * (batch // 2) * world + phi
    assert r["l2w"]["bytes_l2w"] == 2 * per_half
    assert r["l2w"]["bytes_ddp_grad"] == 2 * theta  # one real-update all-reduce per half step
    assert r["l2w_pre"]["bytes_ddp_grad"] == 0  # pre_update re-uses the (global) pseudo-gradient
    assert r["plain"]["bytes_ddp_grad"] == theta and r["plain"]["bytes_l2w"] == 0
    assert "| l2w | 2 |" in (tmp_path / "dist.md").read_text()
