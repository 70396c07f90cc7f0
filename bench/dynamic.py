#!/usr/bin/env python
"""Real early exit: measured wall-clock speed-up of ``DynamicPredictor`` against the full
network, and against the speed-up its FLOPs predict.

    PYTHONPATH=. python bench/dynamic.py [--models demo,msdnet_imagenet,deit_s] [--threads 1,2]
        [--batches 1,64,256] [--points 0.5,1.0,1.5] [--repeats 3] [--budget-s 480]
        [--device cpu|cuda] [--json OUT.json] [--md OUT.md]

Models (random initialisation; timing does not depend on the weights): ``demo`` (the
quick-start MSDNet of configs/demo.yaml, 32x32), ``msdnet_imagenet`` (step 4, 224x224),
``deit_s`` (``vit_exits`` on DeiT-S, exits after blocks 3/6/9/12). Thresholds: for each
budget point p the geometric targets ``q_k ∝ p^k`` of the evaluation, calibrated
(:func:`l2w_dist.evaluate.find_thresholds`, the evaluation's own rule) on the confidences of
the timed random inputs themselves, so the exits take the target shares; on random data the
accuracy means nothing and is not reported.

For every (model, threads, batch, point): the same inputs through the predictor and through
the full network, alternating, ``--repeats`` times; medians. ``predicted`` = full-network
FLOPs / FLOPs the predictor actually spent on these inputs; ``ratio`` = measured speed-up /
predicted. ``predicted by stage time``: the speed-up the stages' own measured times predict
(each stage timed with every sample running it), which separates what the FLOPs miss (stages
whose time share exceeds their FLOPs share) from the predictor's overhead. Batch 1 also
gives the latency per exit taken (median over the samples that left there) and, batched,
the time split of the predictor (stage forwards, exit rule, compaction).
``--budget-s``: no new case starts after that many seconds (the cases left out are listed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from l2w_dist.evaluate import confidence_and_prediction, find_thresholds, target_counts  # noqa: E402
from l2w_dist.infer import DynamicPredictor  # noqa: E402
from l2w_dist.models import create_model  # noqa: E402
from l2w_dist.utils import autocast  # noqa: E402

MODELS = {
    "demo": lambda: create_model("msdnet_cifar", num_classes=10, channels=8, growth_rate=4),
    "msdnet_imagenet": lambda: create_model("msdnet_imagenet", step=4),
    "deit_s": lambda: create_model("vit_exits", backbone="deit_small_patch16_224", fused_attn=True),
}
# images timed one at a time at batch 1, per repeat
LATENCY_IMAGES = {"demo": 32, "msdnet_imagenet": 6, "deit_s": 6}


def calibrated_thresholds(model, x: torch.Tensor, p: float, device: torch.device, args) -> torch.Tensor:
    """Thresholds [K] putting the share q_k ∝ p^k of ``x`` at exit k (the evaluation's rule)."""
    logits = []
    with torch.inference_mode(), autocast(device, args.precision):
        for chunk in x.split(64):
            logits.append(torch.stack([o.float().cpu() for o in model(chunk.to(device))]))
    conf, _ = confidence_and_prediction(torch.cat(logits, dim=1))
    counts = torch.tensor([target_counts(conf.shape[1], conf.shape[0], p)])
    return find_thresholds(conf, counts)[0]


def run_case(name: str, model, threads: int, batch: int, points: list[float], args, device) -> list[dict]:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    n = LATENCY_IMAGES[name] if batch == 1 else batch
    x = torch.randn(n, *model.input_size)
    rows = []
    # each stage's own time with every sample running it (nobody leaves): what the time of
    # the stages, rather than their FLOPs, predicts for the dynamic run
    everyone = DynamicPredictor(
        model, [None] * (model.num_exits - 1), device=device, precision=args.precision, channels_last=args.channels_last
    )
    for c in x.split(batch)[:1]:
        everyone.predict(c)
    stage_s = {}
    for c in x.split(batch):
        everyone.predict(c, timings=stage_s)
    stage_time = [stage_s[f"stage_{k}"] / n for k in range(model.num_exits)]
    for p in points:
        predictor = DynamicPredictor(
            model,
            calibrated_thresholds(model, x, p, device, args),
            device=device,
            precision=args.precision,
            channels_last=args.channels_last,
        )
        flops_full = predictor.exit_flops[-1]
        chunks = list(x.split(batch))
        for c in chunks[:1]:  # warm-up: allocator, kernel choice
            predictor.predict(c), predictor.full(c)
        dyn, full, parts, per_exit = [], [], [], {}
        spent = 0.0
        exit_counts = [0] * model.num_exits
        for _ in range(args.repeats):
            t_dyn, t_full, split, spent = 0.0, 0.0, {}, 0.0
            exit_counts, ran = [0] * model.num_exits, [0] * model.num_exits
            for c in chunks:
                out, t, t_full_c = predictor.timed(c)
                t_dyn += t
                t_full += t_full_c
                spent += predictor.counted_flops(out.stage_samples)
                for k, m in enumerate(out.stage_samples):
                    ran[k] += m
                for e in out.exits.tolist():
                    exit_counts[e] += 1
                if batch == 1:
                    per_exit.setdefault(int(out.exits[0]), []).append(t)
            dyn.append(t_dyn)
            full.append(t_full)
            if batch > 1:  # one more, instrumented pass: where the predictor's time goes
                for c in chunks:
                    predictor.predict(c, timings=split)
                parts.append(split)
        med_dyn, med_full = statistics.median(dyn), statistics.median(full)
        predicted = flops_full * n / spent
        row = {
            "model": name,
            "threads": threads,
            "batch": batch,
            "p": p,
            "images": n,
            "exit_counts": exit_counts,
            "mflops_full": flops_full / 1e6,
            "mflops_spent": spent / n / 1e6,
            "ms_per_image_dynamic": med_dyn / n * 1e3,
            "ms_per_image_full": med_full / n * 1e3,
            "measured": med_full / med_dyn,
            "predicted": predicted,
            "ratio": med_full / med_dyn / predicted,
            "stage_time_share": [t / sum(stage_time) for t in stage_time],
            "stage_flops_share": [
                (f - (predictor.exit_flops[k - 1] if k else 0.0)) / flops_full
                for k, f in enumerate(predictor.exit_flops)
            ],
            "predicted_by_stage_time": sum(stage_time) * n / sum(t * m for t, m in zip(stage_time, ran)),
            "repeats": args.repeats,
        }
        if batch == 1:
            row["latency_ms_per_exit"] = {
                str(k + 1): {
                    "ms": statistics.median(v) * 1e3,
                    "flops_share": predictor.exit_flops[k] / flops_full,
                    "n": len(v),
                }
                for k, v in sorted(per_exit.items())
            }
            row["latency_ms_full"] = med_full / n * 1e3
        else:
            keys = sorted({k for s in parts for k in s})
            row["split_ms"] = {k: statistics.median(s.get(k, 0.0) for s in parts) * 1e3 for k in keys}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def markdown(rows: list[dict], skipped: list[str], device: str) -> str:
    lines = [
        f"Device: {device}. Medians; measured = full-network time / dynamic time on the same inputs;",
        "predicted = full-network FLOPs / FLOPs spent; ratio = measured / predicted.",
        "",
        "| model | threads | batch | p | exits taken | MFLOPs spent / full | ms/img dynamic | ms/img full "
        "| measured | predicted | ratio | predicted by stage time |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['threads']} | {r['batch']} | {r['p']:g} | {'/'.join(map(str, r['exit_counts']))} "
            f"| {r['mflops_spent']:.1f} / {r['mflops_full']:.1f} | {r['ms_per_image_dynamic']:.2f} "
            f"| {r['ms_per_image_full']:.2f} | {r['measured']:.2f}x | {r['predicted']:.2f}x | {r['ratio']:.2f} "
            f"| {r['predicted_by_stage_time']:.2f}x |"
        )
    shares = {(r["model"], r["threads"], r["batch"]): r for r in rows}
    lines += ["", "Share of the full network per stage (every sample running it): time vs FLOPs:", ""]
    lines += ["| model | threads | batch | time share | FLOPs share |", "|---|---:|---:|---|---|"]
    for (model, threads, batch), r in shares.items():
        time_share = " / ".join(f"{v:.2f}" for v in r["stage_time_share"])
        flops_share = " / ".join(f"{v:.2f}" for v in r["stage_flops_share"])
        lines.append(f"| {model} | {threads} | {batch} | {time_share} | {flops_share} |")
    lat = [r for r in rows if r["batch"] == 1]
    if lat:
        lines += ["", "Batch 1, latency by exit taken (median ms; FLOPs share of the full network):", ""]
        lines += ["| model | threads | p | full ms | per exit: ms (FLOPs share, n) |", "|---|---:|---:|---:|---|"]
        for r in lat:
            per = ", ".join(
                f"exit {k}: {v['ms']:.2f} ({v['flops_share']:.2f}, {v['n']})"
                for k, v in r["latency_ms_per_exit"].items()
            )
            lines.append(f"| {r['model']} | {r['threads']} | {r['p']:g} | {r['latency_ms_full']:.2f} | {per} |")
    split = [r for r in rows if "split_ms" in r]
    if split:
        lines += ["", "Batched, where the dynamic time goes (median ms per pass over the inputs):", ""]
        lines += ["| model | threads | batch | p | stages | exit rule | compaction |"]
        lines += ["|---|---:|---:|---:|---|---:|---:|"]
        for r in split:
            s = r["split_ms"]
            stages = " / ".join(f"{s[k]:.1f}" for k in sorted(s) if k.startswith("stage_"))
            lines.append(
                f"| {r['model']} | {r['threads']} | {r['batch']} | {r['p']:g} | {stages} "
                f"| {s.get('exit_rule', 0):.2f} | {s.get('compaction', 0):.2f} |"
            )
    if skipped:
        lines += ["", f"Not run (time budget): {', '.join(skipped)}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="demo,msdnet_imagenet,deit_s")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--points", default="0.5,1.0,1.5")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=480.0)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    points = [float(p) for p in args.points.split(",")]
    start, rows, skipped = time.perf_counter(), [], []
    models = {}
    # threads outermost: when the budget runs out, what is left out is the second thread count
    for threads in (int(t) for t in args.threads.split(",")):
        for name in args.models.split(","):
            for batch in (int(b) for b in args.batches.split(",")):
                case = f"{name} batch {batch} threads {threads}"
                if time.perf_counter() - start > args.budget_s:
                    skipped.append(case)
                    continue
                if name not in models:
                    models[name] = MODELS[name]().eval().to(device)
                rows += run_case(name, models[name], threads, batch, points, args, device)
    text = markdown(rows, skipped, f"{device} {args.precision}{' channels_last' if args.channels_last else ''}")
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "skipped": skipped}, indent=1))
    if args.md:
        Path(args.md).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
