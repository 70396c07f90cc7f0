"""eval.json (the run's evaluation record): written, read back, printed."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..utils import atomic_write_json

ANYTIME_KEYS = ("exit", "flops", "top1", "top5")
BUDGETED_KEYS = ("p", "flops", "top1")
CALIBRATION_KEYS = ("split", "num_samples")
OPTIONAL_SECTIONS = ("weights",)  # written when present: an L2W run's weights vs difficulty (weights.py)


def _rows(rows: Iterable[dict], keys: tuple[str, ...], what: str) -> list[dict]:
    out = []
    for i, row in enumerate(rows):
        missing = [k for k in keys if k not in row]
        if missing:
            raise ValueError(f"{what}[{i}] lacks {missing}; each row needs exactly {list(keys)}")
        out.append({k: (int(row[k]) if k == "exit" else float(row[k])) for k in keys})
        # the operating point's thresholds, kept so that a predictor needs no calibration
        if "thresholds" in row:
            out[-1]["thresholds"] = [None if t is None else float(t) for t in row["thresholds"]]
    return out


def _calibration(calibration: dict, what: str) -> dict:
    missing = [k for k in CALIBRATION_KEYS if k not in calibration]
    if missing:
        raise ValueError(f"{what} lacks {missing}; it needs {list(CALIBRATION_KEYS)}")
    return {"split": str(calibration["split"]), "num_samples": int(calibration["num_samples"])}


def write_eval_json(
    path: str | os.PathLike,
    anytime: Sequence[dict],
    budgeted: Sequence[dict],
    calibration: dict | None = None,
    weights: dict | None = None,
) -> Path:
    """Write ``{"anytime": [{exit, flops, top1, top5}], "budgeted": [{p, flops, top1, thresholds}],
    "calibration": {split, num_samples}}`` atomically (plus ``"weights"``, the :mod:`.weights`
    record of what an L2W run's weight net learned, when given).

    ``thresholds`` (kept where the rows carry them) and ``calibration`` (the split the
    thresholds were calibrated on and its size; given or left out) are what a predictor
    needs to run an operating point without calibrating again. Only the schema's keys are
    written (extra keys in the rows are dropped), so readers can rely on the exact shape.
    Written to a temporary file in the same folder, flushed and fsynced, then renamed
    (:func:`~l2w_dist.utils.atomic_write`): a crash never leaves a half-written eval.json.
    """
    path = Path(path)
    record = {
        "anytime": _rows(anytime, ANYTIME_KEYS, "anytime"),
        "budgeted": _rows(budgeted, BUDGETED_KEYS, "budgeted"),
    }
    if calibration is not None:
        record["calibration"] = _calibration(calibration, "calibration")
    if weights is not None:
        record["weights"] = weights
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
    allowed = {"anytime", "budgeted", "calibration", *OPTIONAL_SECTIONS}
    if not isinstance(record, dict) or not {"anytime", "budgeted"} <= set(record) <= allowed:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        optional = ["calibration", *OPTIONAL_SECTIONS]
        raise ValueError(f"{path}: expected keys ['anytime', 'budgeted'] (optionally {optional}); got {keys}")
    out = {
        "anytime": _rows(record["anytime"], ANYTIME_KEYS, f"{path}: anytime"),
        "budgeted": _rows(record["budgeted"], BUDGETED_KEYS, f"{path}: budgeted"),
        **{k: record[k] for k in OPTIONAL_SECTIONS if k in record},
    }
    if "calibration" in record:
        out["calibration"] = _calibration(record["calibration"], f"{path}: calibration")
    return out


def print_anytime_table(record: dict) -> None:
    """Print an eval record's anytime rows as a Markdown table and its best budgeted point."""
    print("\n| exit | MFLOPs | top-1 % | top-5 % |\n|---:|---:|---:|---:|")
    for row in record["anytime"]:
        print(f"| {row['exit']} | {row['flops'] / 1e6:.1f} | {row['top1']:.2f} | {row['top5']:.2f} |")
    best = max(record["budgeted"], key=lambda r: r["top1"]) if record.get("budgeted") else None
    if best:
        print(
            f"budgeted batch: {len(record['budgeted'])} points, best top-1 {best['top1']:.2f}% "
            f"at {best['flops'] / 1e6:.1f} MFLOPs"
        )
