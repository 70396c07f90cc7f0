#!/usr/bin/env python
"""Loader throughput: the WebDataset training loader (data.backend=torch), NVIDIA DALI over
the same shards (data.backend=dali) and torchvision ImageFolder on the same JPEGs, same
recipe (ImageNet train: RandomResizedCrop 224 + flip + normalize), same batch size, for each
worker / thread count; plus the single-core decode rate and the number of CPU cores an
8-GPU node needs to feed a given per-GPU training throughput.

    PYTHONPATH=. python bench/loader.py --images 512 --workers 1 2 --gpu-img-s 2240
    PYTHONPATH=. python bench/loader.py --backends torch dali --workers 1 2 --repeats 5

With ``dali`` and ``torch`` both given the last line is ``dali/torch img per CPU-second:
X.XX``, the median over back-to-back pairs of passes (all worker counts): images per
CPU-second count the main process, its threads (DALI's) and the DataLoader workers, so the
figure holds on a shared host where wall-clock rates do not.

The JPEGs are generated (ImageNet-like: ~500×375, smooth content + noise, quality 90,
~70 kB). Throughput is measured in steady state: from the moment every worker delivered its
first batch to the end of the pass; the total including start-up is printed too.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402


def make_jpegs(root: Path, n: int, size: tuple[int, int], classes: int = 10, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    paths = []
    for i in range(n):
        f = rng.uniform(0.005, 0.05, 3)
        phase = rng.uniform(0, 6.28, 3)
        img = np.stack([128 + 100 * np.sin(f[c] * xx + f[(c + 1) % 3] * yy + phase[c]) for c in range(3)], -1)
        img += rng.normal(0, 12, img.shape)
        d = root / "train" / f"class{i % classes:02d}"
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"img{i:05d}.JPEG"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(p, quality=90)
        paths.append(p)
    return paths


def decode_rate(paths: list[Path], transform) -> tuple[float, float]:
    """Single process, one thread: (decode-only img/s, decode + transform img/s)."""
    blobs = [p.read_bytes() for p in paths]
    for b in blobs[:16]:  # warm-up: the first decodes pay for library loading and cold caches
        transform(Image.open(io.BytesIO(b)).convert("RGB"))
    t = time.perf_counter()
    imgs = [Image.open(io.BytesIO(b)).convert("RGB") for b in blobs]
    t_dec = time.perf_counter() - t
    t = time.perf_counter()
    for b in blobs:
        transform(Image.open(io.BytesIO(b)).convert("RGB"))
    t_all = time.perf_counter() - t
    del imgs
    return len(blobs) / t_dec, len(blobs) / t_all


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the DataLoader workers, once joined)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed(loader, warm_batches: int) -> tuple[float, float, float]:
    """(steady-state img/s, total img/s incl. start-up, images per CPU-second).

    Steady state starts once ``warm_batches`` batches arrived (one per worker: every worker
    started, the shuffle buffers filled), so a short run measures the per-image cost, not
    the start-up. Images per CPU-second (main process + workers, start-up included) does not
    depend on what else runs on the machine: the robust figure on a shared host."""
    c0 = _cpu_seconds()
    t0 = time.perf_counter()
    it = iter(loader)
    n_warm = sum(len(next(it)[0]) for _ in range(warm_batches))
    t1 = time.perf_counter()
    n_after = 0
    for x, _y in it:
        n_after += len(x)
    t2 = time.perf_counter()
    del it  # joins the workers, so their CPU time is counted
    gc.collect()
    cpu = _cpu_seconds() - c0
    return n_after / (t2 - t1), (n_warm + n_after) / (t2 - t0), (n_warm + n_after) / cpu


def _median(values: list[float]) -> float:
    v = sorted(values)
    return (v[(len(v) - 1) // 2] + v[len(v) // 2]) / 2


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--size", default="500x375", help="WxH of the generated JPEGs")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="DataLoader workers / DALI threads")
    p.add_argument(
        "--backends",
        nargs="+",
        default=["imagefolder", "torch"],
        choices=("imagefolder", "torch", "dali"),
        help="loaders to compare (torch: the WebDataset loader, data.backend=torch; dali: data.backend=dali); "
        "ratios are the last over the first",
    )
    p.add_argument(
        "--shuffle-buffer",
        type=int,
        default=1000,
        help="samples per worker buffered before the first is yielded (the loader's default)",
    )
    p.add_argument("--repeats", type=int, default=2, help="passes per loader; the best is reported")
    p.add_argument(
        "--gpu-img-s",
        type=float,
        default=2240.0,
        help="training throughput per GPU to feed (default: msdnet step4 plain step, H200)",
    )
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument(
        "--normalize-on",
        default="loader",
        choices=("loader", "device"),
        help="device: both loaders yield uint8 (the model normalises; data.normalize_on)",
    )
    p.add_argument("--workdir", default=None, help="where to write images/shards (default: a temp dir)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch_name = "wds"  # the torch WebDataset loader's name in the rows (and in older JSON)
    backends = [torch_name if b == "torch" else b for b in dict.fromkeys(args.backends)]

    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    from l2w_dist.data import DATASET_INFO, build_train_loader, build_transforms, write_shards

    work = Path(args.workdir or tempfile.mkdtemp(prefix="l2w-bench-"))
    size = tuple(int(v) for v in args.size.split("x"))
    paths = make_jpegs(work / "jpeg", args.images, size)
    mean_kb = sum(p.stat().st_size for p in paths) / len(paths) / 1024
    spec = write_shards(
        "imagefolder", work / "jpeg", work / "shards/bench", maxcount=128, holdout=0, workers=1, progress=False
    )
    tf = build_transforms("imagenet", train=True, img_size=224, normalize=args.normalize_on == "loader")
    # Our loader as the trainer builds it: uint8 transform, normalised into the batch by the
    # loader (normalize_on=loader) or on the device (normalize_on=device) — the same values.
    tf_uint8 = build_transforms("imagenet", train=True, img_size=224, normalize=False)
    info = DATASET_INFO["imagenet"]
    fused = (info.mean, info.std) if args.normalize_on == "loader" else None
    dec_only, dec_tf = decode_rate(paths[:128], tf)
    nb = args.images // args.batch_size

    def build(name: str, w: int):
        common = {"batch_size": args.batch_size, "rank": 0, "world_size": 1, "num_workers": w, "seed": 0}
        common.update(epoch_length=nb, shuffle_buffer=args.shuffle_buffer, normalize=fused)
        if name == "imagefolder":
            folder_ds = ImageFolder(str(work / "jpeg" / "train"), transform=tf)
            return DataLoader(folder_ds, args.batch_size, shuffle=True, num_workers=w, drop_last=True)
        if name == "dali":  # the same recipe as DALI ops; w CPU threads in this process
            from l2w_dist.data.dali import build_dali_train_loader

            return build_dali_train_loader(spec, dataset_kind="imagenet", img_size=224, **common)
        return build_train_loader(spec, transform=tf_uint8, **common)

    rows = []
    for w in args.workers:
        steady_runs = {b: [] for b in backends}
        total_runs = {b: [] for b in backends}
        cpu_runs = {b: [] for b in backends}
        for _ in range(args.repeats):  # back-to-back passes of every backend: drifts in load cancel in ratios
            for name in backends:
                steady, total, per_cpu = timed(build(name, w), warm_batches=max(1, w))
                steady_runs[name].append(steady)
                total_runs[name].append(total)
                cpu_runs[name].append(per_cpu)
        row = {"workers": w}
        for name in backends:
            row[f"{name}_img_s"] = max(steady_runs[name])
            row[f"{name}_median_img_s"] = _median(steady_runs[name])
            row[f"{name}_total_img_s"] = max(total_runs[name])
            row[f"{name}_img_per_cpu_s"] = max(cpu_runs[name])
            row[f"{name}_median_img_per_cpu_s"] = _median(cpu_runs[name])
            row[f"{name}_runs_img_per_cpu_s"] = cpu_runs[name]
        base, other = backends[0], backends[-1]
        row["pair_ratios"] = [a / b for a, b in zip(steady_runs[other], steady_runs[base])]
        row["cpu_pair_ratios"] = [a / b for a, b in zip(cpu_runs[other], cpu_runs[base])]
        row["median_pair_ratio"] = _median(row["pair_ratios"])
        row["median_cpu_pair_ratio"] = _median(row["cpu_pair_ratios"])
        rows.append(row)

    per_core = max(r[f"{torch_name}_img_per_cpu_s"] for r in rows) if torch_name in backends else 0.0
    need = args.gpu_img_s * args.gpus
    result = {
        "images": args.images,
        "backends": backends,
        "shuffle_buffer": args.shuffle_buffer,
        "normalize_on": args.normalize_on,
        "size": args.size,
        "mean_jpeg_kb": mean_kb,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "cpu_count": os.cpu_count(),
        "loadavg_1min": os.getloadavg()[0],
        "decode_only_img_s_1core": dec_only,
        "decode_transform_img_s_1core": dec_tf,
        "rows": rows,
        "per_core_img_s": per_core,
        "gpu_img_s": args.gpu_img_s,
        "gpus": args.gpus,
        "node_img_s": need,
        "cores_needed": need / per_core if per_core else None,
    }

    print(
        f"{args.images} JPEGs {args.size}, mean {mean_kb:.0f} kB; batch {args.batch_size}; "
        f"normalised on the {args.normalize_on}; {args.repeats} back-to-back passes per backend; "
        f"{os.cpu_count()} cores, load {result['loadavg_1min']:.1f} (at the end)"
    )
    print(f"1 core: decode only {dec_only:.0f} img/s; decode + RRC/flip/normalize {dec_tf:.0f} img/s")
    base, other = backends[0], backends[-1]
    for r in rows:
        pairs = " ".join(f"{v:.2f}" for v in r["cpu_pair_ratios"])
        print(f"  {r['workers']} worker(s): {other}/{base} img per CPU-s of back-to-back passes {pairs}")
    print("workers | " + " | ".join(f"{n} img/s best, median | {n} img per CPU-s median" for n in backends))
    for r in rows:
        cells = [
            f"{r[f'{n}_img_s']:.0f}, {r[f'{n}_median_img_s']:.0f} | {r[f'{n}_median_img_per_cpu_s']:.0f}"
            for n in backends
        ]
        print(f"{r['workers']:7d} | " + " | ".join(cells))
    if per_core:
        print(
            f"per core (img per CPU-second, torch loader) {per_core:.0f} img/s -> "
            f"{args.gpus} GPUs × {args.gpu_img_s:.0f} img/s "
            f"= {need:.0f} img/s needs ≈ {result['cores_needed']:.0f} decode cores"
        )
    if "dali" in backends and torch_name in backends:
        ratios = [
            d / t for r in rows for d, t in zip(r["dali_runs_img_per_cpu_s"], r[f"{torch_name}_runs_img_per_cpu_s"])
        ]
        result["dali_over_torch_img_per_cpu_s"] = _median(ratios)
        print(f"dali/torch img per CPU-second: {result['dali_over_torch_img_per_cpu_s']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
