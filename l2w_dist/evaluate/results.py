"""eval.json (the run's evaluation record) and the one-call evaluation of a model."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from ..utils import atomic_write_json
from .collect import collect_logits
from .metrics import anytime, budgeted

ANYTIME_KEYS = ("exit", "flops", "top1", "top5")
BUDGETED_KEYS = ("p", "flops", "top1")


def _rows(rows: Iterable[dict], keys: tuple[str, ...], what: str) -> list[dict]:
    out = []
    for i, row in enumerate(rows):
        missing = [k for k in keys if k not in row]
        if missing:
            raise ValueError(f"{what}[{i}] lacks {missing}; each row needs exactly {list(keys)}")
        out.append({k: (int(row[k]) if k == "exit" else float(row[k])) for k in keys})
    return out


def write_eval_json(path: str | os.PathLike, anytime: Sequence[dict], budgeted: Sequence[dict]) -> Path:
    """Write ``{"anytime": [{exit, flops, top1, top5}], "budgeted": [{p, flops, top1}]}`` atomically.

    Only the schema's keys are written (extra keys in the rows are dropped), so readers can
    rely on the exact shape. Written to a temporary file in the same folder, flushed and
    fsynced, then renamed (:func:`~l2w_dist.utils.atomic_write`): a crash never leaves a half-written eval.json.
    """
    path = Path(path)
    record = {
        "anytime": _rows(anytime, ANYTIME_KEYS, "anytime"),
        "budgeted": _rows(budgeted, BUDGETED_KEYS, "budgeted"),
    }
    atomic_write_json(path, record)
    return path


def load_eval_json(path: str | os.PathLike) -> dict:
    """Read an eval.json (or the eval.json inside a run folder) and check its schema."""
    path = Path(path)
    if path.is_dir():
        path = path / "eval.json"
    if not path.is_file():
        raise FileNotFoundError(f"no eval.json at {path}")
    with open(path) as f:
        record = json.load(f)
    if not isinstance(record, dict) or set(record) != {"anytime", "budgeted"}:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"{path}: expected keys ['anytime', 'budgeted']; got {keys}")
    return {
        "anytime": _rows(record["anytime"], ANYTIME_KEYS, f"{path}: anytime"),
        "budgeted": _rows(record["budgeted"], BUDGETED_KEYS, f"{path}: budgeted"),
    }


def evaluate_model(
    model: nn.Module,
    holdout_loader: Iterable,
    test_loader: Iterable,
    device: torch.device | str,
    exit_flops: Sequence[float],
    amp_dtype: torch.dtype | None = None,
    ps: Sequence[float] | None = None,
) -> dict:
    """Anytime on the test split and budgeted batch calibrated on the held-out split.

    Returns ``{"anytime": [...], "budgeted": [...]}`` (the eval.json record). In a
    distributed job every rank must call it (the logits are all-gathered) and every rank
    gets the same record; write it on rank 0.
    """
    holdout_logits, holdout_labels = collect_logits(model, holdout_loader, device, amp_dtype)
    test_logits, test_labels = collect_logits(model, test_loader, device, amp_dtype)
    return {
        "anytime": anytime(test_logits, test_labels, exit_flops),
        "budgeted": budgeted(holdout_logits, holdout_labels, test_logits, test_labels, exit_flops, ps),
    }
