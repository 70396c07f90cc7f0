#!/usr/bin/env python
"""DALI input pipeline on the GPU: the ImageNet training recipe (fused decode + random
resized crop 224, flip, uint8 or normalised) with ``mixed`` decoding (nvJPEG) over the same
WebDataset shards, as ``data.backend=dali`` builds it for a CUDA run. Reports images/s and
images per CPU-second with a given number of DALI CPU threads (the goal: ≥ 5,000 img/s on
one H200 with ≤ 4 CPU cores, the step 4 plain training rate).

    python bench/gpu_dali.py --threads 4 --images 2048 --batch-size 256       # on a GPU
    python bench/gpu_dali.py --device cpu --images 128 --batch-size 32        # CPU smoke mode

Also run by ``bench/gpu_suite.py --dali`` (its own section of the suite's JSON).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measure(
    device: str = "cuda",
    threads: int = 4,
    images: int = 2048,
    batch_size: int = 256,
    passes: int = 3,
    normalize_on: str = "device",
    workdir: str | None = None,
) -> dict:
    """Steady-state img/s (after the first batch) and img per CPU-second over ``passes`` epochs
    of ``images // batch_size`` batches; the median pass is reported."""
    from loader import make_jpegs

    from l2w_dist.data import DATASET_INFO, write_shards
    from l2w_dist.data.dali import build_dali_train_loader

    work = Path(workdir or tempfile.mkdtemp(prefix="l2w-dali-"))
    make_jpegs(work / "jpeg", images, (500, 375))
    spec = write_shards("imagefolder", work / "jpeg", work / "shards/b", maxcount=256, holdout=0, progress=False)
    info = DATASET_INFO["imagenet"]
    loader = build_dali_train_loader(
        spec,
        dataset_kind="imagenet",
        img_size=224,
        batch_size=batch_size,
        rank=0,
        world_size=1,
        num_workers=threads,
        seed=0,
        epoch_length=max(2, images // batch_size),
        channels_last=True,
        normalize=(info.mean, info.std) if normalize_on == "loader" else None,
        device=torch.device(device),
    )
    runs = []
    for _ in range(passes):
        it = iter(loader)
        first, _ = next(it)
        if device == "cuda":
            torch.cuda.synchronize()
        c0, t0, n = _cpu_seconds(), time.perf_counter(), 0
        for x, _y in it:
            n += len(x)
        if device == "cuda":
            torch.cuda.synchronize()
        runs.append({"img_s": n / (time.perf_counter() - t0), "img_per_cpu_s": n / (_cpu_seconds() - c0)})
    runs.sort(key=lambda r: r["img_s"])
    mid = runs[len(runs) // 2]
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "decode": "mixed" if device == "cuda" else "cpu",
        "threads": threads,
        "batch_size": batch_size,
        "images": images,
        "normalize_on": normalize_on,
        "out_device": str(first.device),
        "out_dtype": str(first.dtype),
        "img_s": mid["img_s"],
        "img_per_cpu_s": mid["img_per_cpu_s"],
        "passes": runs,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--normalize-on", default="device", choices=("loader", "device"))
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here; use --device cpu for the smoke mode")
    r = measure(args.device, args.threads, args.images, args.batch_size, args.passes, args.normalize_on)
    print(
        f"dali {r['decode']} decode, {r['threads']} CPU threads, batch {r['batch_size']}: "
        f"{r['img_s']:.0f} img/s, {r['img_per_cpu_s']:.0f} img per CPU-second ({r['out_dtype']} on {r['out_device']})"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))
    return r


if __name__ == "__main__":
    main()
