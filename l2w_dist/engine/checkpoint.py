"""Checkpoints that survive crashes: written atomically, read with ``weights_only=True``.

A checkpoint is one ``torch.save`` of plain data (tensors, numbers, strings, lists, dicts),
so it loads with ``weights_only=True``. It is first written to a temporary file in the same
folder, flushed to disk, then renamed over the target: a kill at any moment leaves either
the previous file or the new one, never a torn one.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..utils import atomic_write


def save_atomic(obj: dict[str, Any], path: str | Path) -> None:
    """``torch.save`` to ``path`` atomically and durably (:func:`~l2w_dist.utils.atomic_write`)."""
    with atomic_write(path, "wb") as f:
        torch.save(obj, f)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_atomic` (``weights_only=True``: no code runs)."""
    return torch.load(path, map_location=map_location, weights_only=True)


def rng_state() -> dict[str, Any]:
    """Every random generator the training loop draws from, as weights-only-safe data."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": _tuples_to_lists(random.getstate()),
        "numpy": {
            "kind": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_lists_to_tuples(state["python"]))
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["kind"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointManager:
    """``last.pt`` every time, ``step_N.pt`` periodically, and the best k by a score."""

    def __init__(self, folder: str | Path, keep_best: int = 1):
        self.folder = Path(folder)
        self.keep_best = keep_best
        self.best: list[tuple[float, str]] = []  # (score, file name), best first

    @property
    def last(self) -> Path:
        return self.folder / "last.pt"

    def save_last(self, state: dict[str, Any]) -> None:
        state = {**state, "best": [list(b) for b in self.best]}
        save_atomic(state, self.last)

    def save_periodic(self, state: dict[str, Any], step: int) -> None:
        save_atomic(state, self.folder / f"step_{step}.pt")

    def consider_best(self, state: dict[str, Any], score: float, step: int) -> bool:
        """Keep ``state`` as one of the best ``keep_best`` checkpoints; True if it was kept."""
        if self.keep_best <= 0:
            return False
        if len(self.best) >= self.keep_best and score <= self.best[-1][0]:
            return False
        name = f"best_step_{step}.pt"
        save_atomic(state, self.folder / name)
        self.best = sorted([*self.best, (score, name)], reverse=True)
        for _, stale in self.best[self.keep_best :]:
            (self.folder / stale).unlink(missing_ok=True)
        self.best = self.best[: self.keep_best]
        return True

    def restore_best(self, entries: list[list[Any]]) -> None:
        self.best = [(float(score), str(name)) for score, name in entries]


def _tuples_to_lists(obj: Any) -> Any:
    if isinstance(obj, (tuple, list)):
        return [_tuples_to_lists(v) for v in obj]
    return obj


def _lists_to_tuples(obj: Any) -> Any:
    if isinstance(obj, list):
        return tuple(_lists_to_tuples(v) for v in obj)
    return obj
