#!/usr/bin/env python
"""Overlay accuracy-vs-FLOPs curves of several runs (e.g. L2W vs baseline) and reference points.

    python tools/plot_curves.py runs/l2w runs/baseline/eval.json --labels L2W baseline \\
        --reference paper_msdnet_imagenet --out compare.png

Each input is a run folder (its eval.json is read) or an eval.json file. --reference is a
built-in set (listed by --list-references) or a JSON file {label: [[flops, top1], ...]}
(or {label: [{"flops": .., "top1": ..}]}); FLOPs are multiply-adds per image.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from l2w_dist.evaluate import REFERENCES, load_eval_json, plot_curves


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="*", help="run folders or eval.json files")
    parser.add_argument("--labels", nargs="+", help="one label per input (default: the folder names)")
    parser.add_argument("--reference", help=f"built-in set ({', '.join(sorted(REFERENCES))}) or JSON file")
    parser.add_argument("--title", help="figure title")
    parser.add_argument("--out", default="curves.png", help="output PNG (default: curves.png)")
    parser.add_argument("--list-references", action="store_true", help="print the built-in sets and exit")
    args = parser.parse_args(argv)

    if args.list_references:
        for name, sets in REFERENCES.items():
            print(f"{name}: {', '.join(sets)}")
        return 0
    if not args.inputs and not args.reference:
        parser.error("give at least one run folder / eval.json, or --reference")
    if args.labels is not None and len(args.labels) != len(args.inputs):
        parser.error(f"{len(args.labels)} labels for {len(args.inputs)} run(s); give one label per input")
    labels = args.labels or [_default_label(p) for p in args.inputs]
    if len(set(labels)) != len(labels):
        parser.error(f"labels must be distinct; got {labels} (use --labels)")
    try:
        runs = {label: load_eval_json(path) for label, path in zip(labels, args.inputs)}
        out = plot_curves(runs, args.out, reference=args.reference, title=args.title)
    except (ValueError, FileNotFoundError) as e:
        print(f"plot_curves: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


def _default_label(path: str) -> str:
    p = Path(path)
    return (p.parent if p.is_file() else p).name or str(p)


if __name__ == "__main__":
    sys.exit(main())
