"""A tiny training run for the end-to-end tests: a synthetic image set and the overrides that
make configs/demo.yaml train a small MSDNet on it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from l2w_dist.data import write_shards

NUM_CLASSES = 4


def make_tiny_spec(folder: Path) -> str:
    """320 training (64 held out) and 64 test images of 4 classes: a colour per class + noise."""
    rng = np.random.default_rng(0)

    def make(n):
        y = rng.integers(0, NUM_CLASSES, n)
        base = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200], [200, 200, 30]])[y]
        x = base[:, None, None, :] + rng.normal(0, 40, (n, 32, 32, 3))
        return np.clip(x, 0, 255).astype(np.uint8), y

    (tx, ty), (vx, vy) = make(320), make(64)
    np.savez(folder / "tiny.npz", train_x=tx, train_y=ty, test_x=vx, test_y=vy)
    sidecar = write_shards("numpy", folder / "tiny.npz", folder / "tiny", maxcount=100, holdout=64, progress=False)
    return str(sidecar)


def overrides(spec: str, **extra) -> list[str]:
    """KEY=VALUE overrides of configs/demo.yaml for the tiny set ``spec``; ``extra`` adds or replaces keys."""
    base = {
        "model.name": "msdnet_cifar",
        "model.options": f"{{num_classes: {NUM_CLASSES}, num_blocks: 3, channels: 4, growth_rate: 2}}",
        "data.dataset": "cifar",
        "data.spec": spec,
        "data.num_workers": 0,
        "data.eval_batch_size": 64,
        "meta.hidden": 16,
        "optim.lr": 0.05,
        "train.batch_size": 16,
        "train.epochs": 2,
        "train.log_every": 1,
        "eval.every_epochs": 0,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]
