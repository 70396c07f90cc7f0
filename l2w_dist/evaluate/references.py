"""Published reference points to overlay on accuracy-vs-FLOPs plots.

Only figures published as numbers are here (the papers' budgeted curves exist only as
figures). FLOPs are multiply-adds per image (the official MSDNet counter; docs/algorithm.md §5);
top-1 in %. Source of the accuracies: the released L2W-DEN checkpoints' per-exit
ImageNet top-1 (LeapLabTHU/L2W-DEN README, 100 epochs, no label smoothing).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

_MSDNET_IMAGENET_FLOPS = {
    4: [339.9e6, 685.5e6, 1008.2e6, 1254.5e6, 1360.5e6],
    6: [339.9e6, 924.2e6, 1517.4e6, 1991.6e6, 2194.4e6],
    7: [339.9e6, 1058.3e6, 1811.9e6, 2422.2e6, 2684.4e6],
}
_L2W_MSDNET_IMAGENET_TOP1 = {
    4: [59.54, 67.22, 71.03, 72.33, 73.93],
    6: [60.05, 69.13, 73.33, 75.19, 76.30],
    7: [59.24, 69.65, 73.94, 75.66, 76.72],
}


def _series(step: int) -> list[dict]:
    return [{"flops": f, "top1": a} for f, a in zip(_MSDNET_IMAGENET_FLOPS[step], _L2W_MSDNET_IMAGENET_TOP1[step])]


REFERENCES: dict[str, dict[str, list[dict]]] = {
    "paper_msdnet_imagenet": {f"L2W MSDNet step {s} (released, anytime)": _series(s) for s in (4, 6, 7)},
    **{f"paper_msdnet_imagenet_step{s}": {f"L2W MSDNet step {s} (released, anytime)": _series(s)} for s in (4, 6, 7)},
}
"""Built-in reference sets: name -> {series label -> [{"flops", "top1"}]}."""


def load_reference(name_or_path: str | os.PathLike) -> dict[str, list[dict]]:
    """A built-in reference set by name, or a JSON file ``{label: [{"flops", "top1"} | [flops, top1]]}``."""
    if str(name_or_path) in REFERENCES:
        return REFERENCES[str(name_or_path)]
    path = Path(name_or_path)
    if not path.is_file():
        raise ValueError(f"reference {str(name_or_path)!r} is neither a built-in set ({sorted(REFERENCES)}) nor a file")
    with open(path) as f:
        data = json.load(f)
    return normalise_reference(data, source=str(path))


def normalise_reference(data: object, source: str = "reference") -> dict[str, list[dict]]:
    """Check a reference mapping and turn ``[flops, top1]`` pairs into ``{"flops", "top1"}`` dicts."""
    if not isinstance(data, dict) or not data:
        got = type(data).__name__
        raise ValueError(f"{source}: expected a non-empty object {{label: [points]}}; got {got}")
    out: dict[str, list[dict]] = {}
    for label, points in data.items():
        if not isinstance(points, list) or not points:
            raise ValueError(f"{source}: series {label!r} must be a non-empty list of points")
        series = []
        for pt in points:
            if isinstance(pt, dict) and "flops" in pt and "top1" in pt:
                series.append({"flops": float(pt["flops"]), "top1": float(pt["top1"])})
            elif isinstance(pt, (list, tuple)) and len(pt) == 2:
                series.append({"flops": float(pt[0]), "top1": float(pt[1])})
            else:
                raise ValueError(
                    f"{source}: series {label!r} has a bad point {pt!r}; use {{flops, top1}} or [flops, top1]"
                )
        out[str(label)] = series
    return out
