"""``l2w-infer``: run a trained run's early exit for real over a split or a folder of images.

    l2w-infer --checkpoint RUN/checkpoints/last.pt --point 0.75 [--split test]
              [--batch-size B] [--threads T] [--device cpu|cuda] [--output OUT.json]
    l2w-infer --checkpoint CKPT --mflops 12 --images DIR --output OUT.json

The operating point is a budget point of the run's eval.json (``--point P``, a ``p`` of its
budgeted rows, 0.05 ... 1.95) or the most expensive point costing at most ``--mflops F``
MFLOPs per image; the thresholds stored with it are applied as the evaluation applied
them, so on the test split every sample takes the exit the budgeted evaluation gave it.
The same inputs also run through the full network (same batch size, threads and process)
for the measured speed-up. OUT.json: point, thresholds, num_samples, top1, exit_counts,
mflops_expected, mflops_counted, seconds, seconds_full, speedup (and the settings).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def image_batches(folder: Path, cfg: Any, batch_size: int) -> tuple[list[str], Iterator]:
    """The images of ``folder`` (sorted by name) with the run's eval transform, in batches."""
    from PIL import Image

    from ..data.transforms import build_transforms

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"--images {folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    # loader normalisation: float images; device normalisation: uint8, the model's hook normalises
    transform = build_transforms(
        cfg.data.dataset, False, cfg.data.img_size, normalize=cfg.data.normalize_on == "loader"
    )

    def batches() -> Iterator:
        for i in range(0, len(files), batch_size):
            chunk = files[i : i + batch_size]
            xs = [transform(Image.open(p).convert("RGB")) for p in chunk]
            yield torch.stack(xs), None

    return [p.name for p in files], batches()


def run_predictor(
    predictor: Any, batches: Iterable, num_batches: int | None = None, progress: bool = True
) -> dict[str, Any]:
    """Every batch through the predictor and, right after, through the full network; the
    OUT.json figures and the per-sample results (``classes``, ``exits``, ``confidence``)."""
    from tqdm import tqdm

    from ..evaluate.collect import _split_batch

    classes, exits, confs, labels = [], [], [], []
    seconds = seconds_full = flops = 0.0
    warm = False
    for batch in tqdm(batches, total=num_batches, disable=not progress, desc="l2w-infer", unit="batch"):
        x, y = batch if isinstance(batch, tuple) and batch[1] is None else _split_batch(batch)
        if not warm:  # one untimed pass each: allocator and kernel choice out of the timings
            predictor.predict(x), predictor.full(x)
            warm = True
        out, dynamic, full = predictor.timed(x)
        seconds += dynamic
        seconds_full += full
        flops += predictor.counted_flops(out.stage_samples)
        classes.append(out.classes)
        exits.append(out.exits)
        confs.append(out.confidence)
        if y is not None:
            labels.append(torch.as_tensor(y).long().reshape(-1))
    if not classes:
        raise ValueError("the input yielded no batches")
    cls, ex, conf = torch.cat(classes), torch.cat(exits), torch.cat(confs)
    n = cls.numel()
    result = {
        **predictor.describe(),
        "num_samples": n,
        "top1": (cls == torch.cat(labels)).double().mean().item() * 100.0 if labels else None,
        "exit_counts": torch.bincount(ex, minlength=predictor.model.num_exits).tolist(),
        "mflops_counted": flops / n / 1e6,
        "seconds": seconds,
        "seconds_full": seconds_full,
        "speedup": seconds_full / seconds if seconds > 0 else None,
        "mflops_full": predictor.exit_flops[-1] / 1e6,
    }
    return {"result": result, "classes": cls, "exits": ex, "confidence": conf}


def infer(args: argparse.Namespace) -> dict[str, Any]:
    """What ``main`` runs once the arguments are checked; returns the OUT.json record."""
    from ..data import eval_loader, resolve_data_spec
    from ..distributed.env import DistEnv
    from ..utils import atomic_write_json
    from .predictor import DynamicPredictor

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = list(args.overrides)
    if args.batch_size:
        overrides.append(f"data.eval_batch_size={args.batch_size}")
    thresholds = None
    if args.thresholds is not None:
        thresholds = [None if t.lower() in ("none", "null", "inf") else float(t) for t in args.thresholds.split(",")]
    if args.exported:
        predictor = DynamicPredictor.from_exported(
            args.exported, args.device, args.precision, args.channels_last, overrides=overrides
        )
    else:
        predictor = DynamicPredictor.from_checkpoint(
            args.checkpoint,
            point=args.point,
            mflops=args.mflops,
            thresholds=thresholds,
            eval_json=args.eval_json,
            weights=args.weights,
            device=args.device,
            precision=args.precision,
            channels_last=args.channels_last,
            overrides=overrides,
        )
    cfg = predictor.config
    progress = not args.no_progress
    if args.images:
        names, batches = image_batches(Path(args.images), cfg, cfg.data.eval_batch_size)
        num_batches = -(-len(names) // cfg.data.eval_batch_size)
    else:
        env = DistEnv(device=torch.device(args.device))
        loader = eval_loader(cfg, env, resolve_data_spec(cfg, env), args.split)
        count = getattr(loader, "num_samples", None)  # known when the sidecar has shard counts
        batch = cfg.data.eval_batch_size
        names, batches, num_batches = None, loader, -(-count // batch) if count else None
    if args.export:
        return export_predictor(predictor, batches, Path(args.export))
    run = run_predictor(predictor, batches, num_batches, progress=progress)
    record = {
        **run["result"],
        "split": None if args.images else args.split,
        "images": str(args.images) if args.images else None,
        "batch_size": cfg.data.eval_batch_size,
        "threads": torch.get_num_threads(),
        "device": args.device,
        "precision": args.precision,
    }
    if names is not None or args.per_sample:
        record["per_sample"] = {
            **({"file": names} if names is not None else {}),
            "class": run["classes"].tolist(),
            "exit": run["exits"].tolist(),
            "confidence": run["confidence"].tolist(),
        }
    if args.output:
        atomic_write_json(Path(args.output), record)
    summary = {k: record[k] for k in ("point", "num_samples", "top1", "mflops_counted", "speedup")}
    print(f"l2w-infer: {summary}; exits {record['exit_counts']}")
    return record


def export_predictor(predictor: Any, batches: Iterable, folder: Path) -> dict[str, Any]:
    """``--export DIR``: the stages as torch.export programs, traced on the first batch."""
    from ..evaluate.collect import _split_batch
    from .export import export_stages

    first = next(iter(batches))
    x = first[0] if isinstance(first, tuple) and first[1] is None else _split_batch(first)[0]
    point = predictor.describe()
    export_stages(predictor.model.cpu(), x[:2].cpu(), folder, point, predictor.config.to_dict())
    print(f"l2w-infer: exported {predictor.model.num_exits} stages and point {point['point']} to {folder}")
    return {"exported": str(folder), **point}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="l2w-infer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", help="a checkpoint written by l2w-train")
    parser.add_argument("--exported", help="a folder written by --export (instead of --checkpoint and a point)")
    parser.add_argument("--export", help="write the stages (torch.export) and the point into this folder, then stop")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--point", type=float, help="a budget point p of eval.json (0.05 ... 1.95), e.g. 0.75")
    which.add_argument("--mflops", type=float, help="a budget: the most expensive point costing at most F MFLOPs")
    which.add_argument("--thresholds", help="explicit thresholds T_1,...,T_{K-1} (none = nobody leaves there)")
    parser.add_argument("--split", default="test", choices=("test", "val", "holdout", "train"))
    parser.add_argument("--images", help="a folder of images to classify instead of a split")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the run's data.eval_batch_size")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    parser.add_argument("--eval-json", default=None, help="where the thresholds are (default: RUN/eval.json)")
    parser.add_argument("--weights", default="auto", choices=("auto", "model", "ema"))
    parser.add_argument("--output", default=None, help="OUT.json")
    parser.add_argument("--per-sample", action="store_true", help="also write each sample's class, exit, confidence")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. data.spec=/data/in1k.json")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .export import ExportError
    from .predictor import PredictorError

    chosen = [a for a in (args.point, args.mflops, args.thresholds) if a is not None]
    if args.exported:
        if args.checkpoint or chosen or args.export:
            parser.exit(2, "l2w-infer: --exported carries its model and point; drop --checkpoint/--point/--mflops\n")
        if not (Path(args.exported) / "meta.json").is_file():
            parser.exit(2, f"l2w-infer: no exported model at {args.exported} (meta.json missing)\n")
    else:
        if not args.checkpoint:
            parser.exit(2, "l2w-infer: give --checkpoint CKPT (and --point/--mflops/--thresholds) or --exported DIR\n")
        if not chosen:
            parser.exit(2, "l2w-infer: give one of --point P, --mflops F or --thresholds T1,...\n")
        if not Path(args.checkpoint).is_file():
            parser.exit(2, f"l2w-infer: no checkpoint at {args.checkpoint}\n")
    if args.batch_size is not None and args.batch_size < 1:
        parser.exit(2, f"l2w-infer: --batch-size must be a positive integer; got {args.batch_size}\n")
    if args.threads is not None and args.threads < 1:
        parser.exit(2, f"l2w-infer: --threads must be a positive integer; got {args.threads}\n")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.exit(2, "l2w-infer: --device cuda, but CUDA is not available here; use --device cpu\n")
    if args.images and not Path(args.images).is_dir():
        parser.exit(2, f"l2w-infer: --images {args.images} is not a folder\n")
    try:
        return infer(args)
    except (PredictorError, ExportError, FileNotFoundError) as err:
        parser.exit(2, f"l2w-infer: {err}\n")
    return None


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
