"""Checkpoints that survive crashes: written atomically, read with ``weights_only=True``,
checked before a run resumes from them.

A checkpoint is one ``torch.save`` of plain data (tensors, numbers, strings, lists, dicts),
so it loads with ``weights_only=True``. It is first written to a temporary file in the same
folder, flushed to disk, then renamed over the target: a kill at any moment leaves either
the previous file or the new one, never a torn one. A failed write (a full or read-only
disk) leaves the previous file too, and says so in one line (:class:`CheckpointWriteError`);
a file that does not load says what it is (:class:`CheckpointReadError`).
"""

from __future__ import annotations

import errno
import random
import re
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from ..utils import atomic_write

# Config keys a run may change when it resumes: none of them changes what a training step
# computes (docs/reliability.md, "Resume"). Any other change is refused.
RESUME_MAY_CHANGE = (
    "train.max_steps",
    "train.log_every",
    "train.ckpt_every",
    "train.ckpt_minutes",
    "train.keep_best",
    "train.threads",
    "data.spec",
    "data.root",
    "data.eval_batch_size",
    "data.max_bad_fraction",
    "dist.backend",
    "dist.zero_stage",
    "eval.",
    "wandb.",
)


class CheckpointError(RuntimeError):
    """A checkpoint could not be read, written or resumed from; the message is one line."""


class CheckpointReadError(CheckpointError):
    """A file is missing, truncated, corrupt or not a checkpoint of this package."""


class CheckpointWriteError(CheckpointError):
    """Writing a checkpoint failed (disk full, read-only, permissions); the previous file is intact."""


class ResumeMismatchError(CheckpointError):
    """The run's config differs from its checkpoint's in a key that changes the training."""


class _KeepWriteError:
    """A write-only file that remembers what its writes raised (an OSError, or a signal's
    KeyboardInterrupt): torch.save's writer reports either only as "unexpected pos"."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f: IO[bytes] = f
        self.error: BaseException | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.f.write(data)
        except BaseException as err:
            self.error = self.error or err
            raise

    def flush(self) -> None:
        self.f.flush()


def save_atomic(obj: dict[str, Any], path: str | Path) -> None:
    """``torch.save`` to ``path`` atomically and durably (:func:`~l2w_dist.utils.atomic_write`).

    Raises :class:`CheckpointWriteError` when the file cannot be written; ``path`` is then
    as it was and no temporary file is left.
    """
    path = Path(path)
    sink = None
    try:
        with atomic_write(path, "wb") as f:
            sink = _KeepWriteError(f)
            torch.save(obj, sink)
    except (OSError, RuntimeError) as err:
        cause = sink.error if sink is not None and sink.error is not None else err
        if not isinstance(cause, OSError):
            if cause is err:
                raise
            raise cause from None
        kept = f"the previous {path.name} is intact" if path.is_file() else f"no {path.name} was written"
        reason = cause.strerror or str(cause)
        code = f" ({errno.errorcode[cause.errno]})" if cause.errno in errno.errorcode else ""
        raise CheckpointWriteError(f"cannot write checkpoint {path}: {reason}{code}; {kept}") from cause


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", *, keys: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_atomic` (``weights_only=True``: no code runs).

    Raises :class:`CheckpointReadError` (one line: the file and what is wrong with it) when
    the file is missing, truncated or corrupt, or lacks one of ``keys``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointReadError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # zip, pickle and storage errors alike: the file is unusable
        reason = " ".join(str(err).split()).split(". ")[0][:160] or type(err).__name__  # torch's first sentence
        raise CheckpointReadError(
            f"{path} is not a readable checkpoint ({path.stat().st_size} bytes; truncated or corrupt: {reason})"
        ) from err
    missing = [k for k in keys if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointReadError(f"{path} is not a checkpoint written by l2w-train (it has no {', '.join(missing)})")
    return state


def resume_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"key: old → new"`` for every config key that differs between a checkpoint's config
    and the run's, except those in :data:`RESUME_MAY_CHANGE`."""
    old, new = _flatten(saved), _flatten(current)
    changes = []
    for key in sorted(old.keys() | new.keys()):
        if any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUME_MAY_CHANGE):
            continue
        if old.get(key, _UNSET) != new.get(key, _UNSET):
            changes.append(f"{key}: {_show(old.get(key, _UNSET))} → {_show(new.get(key, _UNSET))}")
    return changes


_UNSET = object()


def _show(value: Any) -> str:
    return "(unset)" if value is _UNSET else repr(value)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):  # an empty section adds no key
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = list(value) if isinstance(value, tuple) else value
    return flat


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

    def load_latest(self, map_location: str | torch.device = "cpu") -> tuple[Path, dict[str, Any], str] | None:
        """The state to resume from: ``(path, state, note)``, or None when there is no last.pt.

        last.pt if it loads; else the newest periodic ``step_N.pt`` that does, with ``note``
        (one line) saying so. Raises :class:`CheckpointReadError` when none loads.
        """
        if not self.last.is_file():
            return None
        try:
            return self.last, load_checkpoint(self.last, map_location, keys=_RESUME_KEYS), ""
        except CheckpointReadError as err:
            broken = str(err)
        periodic = sorted(self.folder.glob("step_*.pt"), key=_step_of, reverse=True)
        for path in periodic:
            try:
                state = load_checkpoint(path, map_location, keys=_RESUME_KEYS)
            except CheckpointReadError:
                continue
            return path, state, f"{broken}; resuming from the newest good periodic checkpoint {path.name} instead"
        tried = (
            f"none of the {len(periodic)} periodic checkpoints loads either"
            if periodic
            else "there is no periodic checkpoint (train.ckpt_every)"
        )
        raise CheckpointReadError(
            f"{broken}; {tried}: refusing to resume. Restore a good last.pt, or move {self.folder} away to start over"
        )

    def remove_stale_temporaries(self) -> list[str]:
        """Delete the temporary files of writes that a kill interrupted (rank 0, before it writes)."""
        stale = sorted(self.folder.glob(".*.pt.*.tmp"))
        for path in stale:
            path.unlink(missing_ok=True)
        return [p.name for p in stale]

    def save_last(self, state: dict[str, Any]) -> None:
        save_atomic(self._with_best(state), self.last)

    def save_periodic(self, state: dict[str, Any], step: int) -> None:
        save_atomic(self._with_best(state), self.folder / f"step_{step}.pt")  # a full state: resumable too

    def _with_best(self, state: dict[str, Any]) -> dict[str, Any]:
        return {**state, "best": [list(b) for b in self.best]}

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


_RESUME_KEYS = ("model", "optimizer", "step", "config", "rng")


def _step_of(path: Path) -> int:
    match = re.fullmatch(r"step_(\d+)\.pt", path.name)
    return int(match.group(1)) if match else -1


def _tuples_to_lists(obj: Any) -> Any:
    if isinstance(obj, (tuple, list)):
        return [_tuples_to_lists(v) for v in obj]
    return obj


def _lists_to_tuples(obj: Any) -> Any:
    if isinstance(obj, list):
        return tuple(_lists_to_tuples(v) for v in obj)
    return obj
