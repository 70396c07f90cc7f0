"""Regenerate the README's demo results from run folders (never type them).

    python tools/readme_results.py --l2w runs/demo runs/demo_s1 runs/demo_s2 \\
        --baseline runs/demo_baseline runs/demo_baseline_s1 runs/demo_baseline_s2 \\
        --wall-s 301 296 310 [--baseline-wall-s 90 92 95] [--readme README.md]

Reads each run's eval.json and config.yaml, writes the overlaid accuracy-vs-FLOPs figure
(the seeds' mean per method) to docs/demo_curves.png, the first L2W run's weights figure to
docs/demo_weights.png, the runs' records to docs/demo_results.json (from which
tests/test_readme.py renders the block again), and rewrites the part of the README between
``<!-- demo-results:begin -->`` and ``<!-- demo-results:end -->``. ``--wall-s``: the
measured wall times (seconds, training + evaluation) of the L2W runs, reported as a median.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BEGIN, END = "<!-- demo-results:begin -->", "<!-- demo-results:end -->"
RESULTS = ROOT / "docs" / "demo_results.json"
CURVES = "docs/demo_curves.png"
WEIGHTS = "docs/demo_weights.png"


def load_run(folder: str | Path) -> dict:
    """A run's eval record, seed and the config keys the README names."""
    import yaml

    from l2w_dist.evaluate import load_eval_json

    folder = Path(folder)
    cfg = yaml.safe_load((folder / "config.yaml").read_text())
    return {"run": folder.name, "seed": cfg["train"]["seed"], "config": cfg, "eval": load_eval_json(folder)}


def _spread(values: Sequence[float]) -> str:
    """``mean`` for one value, ``mean ± half-range`` (the seeds' min..max) for several."""
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {(max(values) - min(values)) / 2:.2f}"


def _per_exit(runs: list[dict], key: str) -> list[list[float]]:
    return [[r["eval"]["anytime"][k][key] for r in runs] for k in range(len(runs[0]["eval"]["anytime"]))]


def _budgeted_mean(runs: list[dict]) -> list[dict]:
    points = zip(*(r["eval"]["budgeted"] for r in runs))
    return [{key: statistics.fmean(p[key] for p in group) for key in ("p", "flops", "top1")} for group in points]


def mean_record(runs: list[dict]) -> dict:
    """The seeds' mean eval record (per exit and per operating point), for the overlaid figure."""
    anytime = [
        {"exit": k + 1, "flops": statistics.fmean(f), "top1": statistics.fmean(t), "top5": 0.0}
        for k, (f, t) in enumerate(zip(_per_exit(runs, "flops"), _per_exit(runs, "top1")))
    ]
    return {"anytime": anytime, "budgeted": _budgeted_mean(runs)}


def _exits(first: int, last: int) -> str:
    return f"exit {first}" if first == last else f"exits {first}–{last}"


def _claim(exits: list[dict]) -> str:
    """The paper's claim read in the weights: easy samples weigh more early, hard ones late."""
    signs = ["−" if e["spearman"] < 0 else "+" for e in exits]
    first_late = next((i for i, s in enumerate(signs) if s == "+"), len(signs))
    ordered = signs == ["−"] * first_late + ["+"] * (len(signs) - first_late)
    if ordered and 0 < first_late < len(signs):
        verdict = (
            f"as the paper claims: easy samples weigh more at {_exits(1, first_late)}, "
            f"hard samples at {_exits(first_late + 1, len(signs))}"
        )
    elif all(s == "+" for s in signs) or all(s == "−" for s in signs):
        who = "hard" if signs[0] == "+" else "easy"
        verdict = f"not as the paper claims: {who} samples weigh more at every exit"
    else:
        verdict = f"only partly as the paper claims: the correlation's signs by exit are {' '.join(signs)}"
    rising = all(a["spearman"] <= b["spearman"] for a, b in zip(exits, exits[1:]))
    trend = "rises" if rising else "does not rise steadily"
    return f"{verdict}; the correlation {trend} from the first exit to the last"


def render(l2w: list[dict], baseline: list[dict], wall_s: Sequence[float], baseline_wall_s: Sequence[float]) -> str:
    """The README block (Markdown) for these runs."""
    cfg = l2w[0]["config"]
    model, meta, train, data = cfg["model"]["options"], cfg["meta"], cfg["train"], cfg["data"]
    seeds = ", ".join(str(r["seed"]) for r in l2w)
    base_seeds = ", ".join(str(r["seed"]) for r in baseline)
    lines = [
        f"`configs/demo.yaml`: MSDNet (`msdnet_cifar`, {model.get('channels')} channels, growth "
        f"{model.get('growth_rate')}, 5 exits) on Fashion-MNIST, {train['epochs']} epoch(s) of the "
        f"training images less the {data['holdout']:,} held out, at batch {train['batch_size']}, "
        f"L2W ε {meta['epsilon']} "
        f"`{meta['constraint']}`, target p index {meta['target_p_index']}; thresholds calibrated on the "
        f"{data['holdout']:,} held-out training images; top-1 on the 10,000 test images. "
        f"L2W seeds {seeds}; baseline (`meta.enabled=false`, the same commands) seeds {base_seeds}. "
        "Each cell: the seeds' mean ± half their range (min..max).",
        "",
    ]
    if wall_s:
        text = f"Wall time (training + evaluation, after install): median {statistics.median(wall_s) / 60:.1f} min"
        text += f" of {len(wall_s)} L2W runs ({', '.join(f'{s / 60:.1f}' for s in wall_s)} min)"
        if baseline_wall_s:
            text += f"; baseline median {statistics.median(baseline_wall_s) / 60:.1f} min"
        lines += [text + ", on the project's 2-core CPU machine, nothing else running.", ""]
    lines += ["| exit | MFLOPs | L2W top-1 % | baseline top-1 % | L2W − baseline |", "|---:|---:|---:|---:|---:|"]
    flops = _per_exit(l2w, "flops")
    for k, (ours, theirs) in enumerate(zip(_per_exit(l2w, "top1"), _per_exit(baseline, "top1"))):
        diff = statistics.fmean(ours) - statistics.fmean(theirs)
        lines.append(
            f"| {k + 1} | {statistics.fmean(flops[k]) / 1e6:.1f} | {_spread(ours)} | {_spread(theirs)} | {diff:+.2f} |"
        )
    ours_b, theirs_b = _budgeted_mean(l2w), _budgeted_mean(baseline)
    diffs = [a["top1"] - b["top1"] for a, b in zip(ours_b, theirs_b)]
    ahead = sum(d > 0 for d in diffs)
    lo, hi = ours_b[0], max(ours_b, key=lambda r: r["top1"])
    blo, bhi = theirs_b[0], max(theirs_b, key=lambda r: r["top1"])
    lines += [
        "",
        f"Budgeted batch ({len(diffs)} operating points, seeds' mean): L2W {lo['top1']:.2f}% at "
        f"{lo['flops'] / 1e6:.1f} MFLOPs, best {hi['top1']:.2f}% at {hi['flops'] / 1e6:.1f} MFLOPs; baseline "
        f"{blo['top1']:.2f}% at {blo['flops'] / 1e6:.1f} MFLOPs, best {bhi['top1']:.2f}% at "
        f"{bhi['flops'] / 1e6:.1f} MFLOPs. At the same operating point L2W is ahead at {ahead} of {len(diffs)} "
        f"(mean difference {statistics.fmean(diffs):+.2f} points, from {min(diffs):+.2f} to {max(diffs):+.2f}).",
        "",
        f"![accuracy vs FLOPs, L2W and baseline]({CURVES})",
        "",
    ]
    weighted = [r for r in l2w if "weights" in r["eval"]]
    if weighted:
        exits = weighted[0]["eval"]["weights"]["exits"]
        lines += [
            f"**What L2W learned** (`RUN/weights.png`, eval.json `weights`; run `{weighted[0]['run']}`, seed "
            f"{weighted[0]['seed']}, on the {weighted[0]['eval']['weights']['samples']:,} held-out images): "
            "the weight the weight net gives each image at each exit against the image's difficulty (its "
            "cross-entropy at the last exit). Spearman correlation over the seeds and the first run's mean "
            "weight of the easiest and hardest 20 %:",
            "",
            "| exit | Spearman (weight, difficulty) | easiest 20 % | hardest 20 % |",
            "|---:|---:|---:|---:|",
        ]
        for k, row in enumerate(exits):
            rho = [r["eval"]["weights"]["exits"][k]["spearman"] for r in weighted]
            lines.append(f"| {row['exit']} | {_spread(rho)} | {row['easy_mean']:.3f} | {row['hard_mean']:.3f} |")
        lines += ["", f"Read against the paper: in this run the weights behave {_claim(exits)}.", ""]
        lines += [f"![weights against difficulty]({WEIGHTS})", ""]
    return "\n".join(lines).strip("\n")


def replace_block(readme: str, block: str) -> str:
    if readme.count(BEGIN) != 1 or readme.count(END) != 1 or readme.index(BEGIN) > readme.index(END):
        raise ValueError(f"the README needs exactly one {BEGIN} ... {END} block")
    head, rest = readme.split(BEGIN)
    _, tail = rest.split(END)
    return f"{head}{BEGIN}\n{block}\n{END}{tail}"


def readme_block(readme: str) -> str:
    """The text between the markers (as :func:`replace_block` wrote it)."""
    return readme.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--l2w", nargs="+", required=True, help="L2W run folders (one per seed)")
    parser.add_argument("--baseline", nargs="+", required=True, help="baseline run folders (meta.enabled=false)")
    parser.add_argument("--wall-s", nargs="*", type=float, default=[], help="measured L2W wall times, seconds")
    parser.add_argument("--baseline-wall-s", nargs="*", type=float, default=[], help="baseline wall times")
    parser.add_argument("--readme", default=str(ROOT / "README.md"))
    parser.add_argument("--root", default=str(ROOT), help="where docs/ gets the figures and the records")
    args = parser.parse_args(argv)

    from l2w_dist.evaluate import plot_curves
    from l2w_dist.evaluate.weights import plot_weights
    from l2w_dist.utils import atomic_write, atomic_write_json

    l2w, baseline = [load_run(f) for f in args.l2w], [load_run(f) for f in args.baseline]
    root = Path(args.root)
    record = {"l2w": l2w, "baseline": baseline, "wall_s": args.wall_s, "baseline_wall_s": args.baseline_wall_s}
    atomic_write_json(root / RESULTS.relative_to(ROOT), record)
    plot_curves(
        {f"L2W ({len(l2w)} seeds)": mean_record(l2w), f"baseline ({len(baseline)} seeds)": mean_record(baseline)},
        root / CURVES,
        title="Demo: L2W vs baseline (seeds' mean)",
    )
    if "weights" in l2w[0]["eval"]:
        plot_weights(l2w[0]["eval"]["weights"], root / WEIGHTS)
    block = render(l2w, baseline, args.wall_s, args.baseline_wall_s)
    readme = Path(args.readme)
    text = replace_block(readme.read_text(), block)
    with atomic_write(readme, "w") as f:
        f.write(text)
    print(f"rewrote the demo results in {readme}; figures {CURVES}, {WEIGHTS}; records {RESULTS.relative_to(ROOT)}")


def render_saved(path: str | Path = RESULTS) -> str:
    """The block again from docs/demo_results.json (what tests/test_readme.py compares)."""
    saved = json.loads(Path(path).read_text())
    return render(saved["l2w"], saved["baseline"], saved["wall_s"], saved["baseline_wall_s"])


if __name__ == "__main__":
    main()
