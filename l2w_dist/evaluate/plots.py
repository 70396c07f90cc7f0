"""Accuracy-vs-FLOPs figure: budgeted curves (lines), anytime exits (points), references."""

from __future__ import annotations

import os
from pathlib import Path

from .references import load_reference, normalise_reference

_UNITS = ((1e9, "GFLOPs"), (1e6, "MFLOPs"), (1e3, "KFLOPs"), (1.0, "FLOPs"))


def _unit(max_flops: float) -> tuple[float, str]:
    for scale, name in _UNITS:
        if max_flops >= scale:
            return scale, name
    return 1.0, "FLOPs"


def plot_curves(
    runs: dict[str, dict],
    out_path: str | os.PathLike,
    reference: str | os.PathLike | dict | None = None,
    title: str | None = None,
) -> Path:
    """Write a PNG of top-1 vs FLOPs (multiply-adds per image) for several eval.json records.

    ``runs`` maps a label to an eval record ``{"anytime": [...], "budgeted": [...]}``; each
    run gets one colour: its budgeted curve as a line, its exits as markers. ``reference``
    is a built-in set name (see ``references.REFERENCES``), a JSON file, or a mapping
    ``{label: [{"flops", "top1"}]}``, drawn as dashed black/grey markers. Uses the Agg
    canvas directly, so it works headless and never touches pyplot's global state.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not runs and reference is None:
        raise ValueError("nothing to plot: give at least one run or a reference")
    refs: dict[str, list[dict]] = {}
    if isinstance(reference, dict):
        refs = normalise_reference(reference)
    elif reference is not None:
        refs = load_reference(reference)

    all_flops = [r["flops"] for rec in runs.values() for part in ("anytime", "budgeted") for r in rec.get(part, [])]
    all_flops += [pt["flops"] for series in refs.values() for pt in series]
    scale, unit = _unit(max(all_flops) if all_flops else 1.0)

    fig = Figure(figsize=(7, 5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    colours = [f"C{i}" for i in range(10)]
    for i, (label, record) in enumerate(runs.items()):
        colour = colours[i % len(colours)]
        curve = sorted(record.get("budgeted", []), key=lambda r: r["flops"])
        if curve:
            ax.plot(
                [r["flops"] / scale for r in curve],
                [r["top1"] for r in curve],
                "-",
                color=colour,
                lw=1.8,
                label=f"{label} (budgeted)",
            )
        exits = record.get("anytime", [])
        if exits:
            ax.plot(
                [r["flops"] / scale for r in exits],
                [r["top1"] for r in exits],
                "o",
                color=colour,
                ms=6,
                mfc="white",
                mew=1.5,
                label=f"{label} (anytime exits)",
            )
    greys = ["black", "dimgray", "gray", "darkgray"]
    markers = ["x", "s", "^", "d"]
    for i, (label, series) in enumerate(refs.items()):
        pts = sorted(series, key=lambda r: r["flops"])
        ax.plot(
            [r["flops"] / scale for r in pts],
            [r["top1"] for r in pts],
            linestyle="--",
            marker=markers[i % len(markers)],
            color=greys[i % len(greys)],
            lw=1.0,
            ms=6,
            label=label,
        )
    ax.set_xlabel(f"{unit} per image (multiply-adds; budgeted: expected)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title or "Accuracy vs computation")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, format="png")
    return out_path
