"""Write a dataset as WebDataset tar shards plus a JSON sidecar (``tools/make_shards.py``).

Layout for ``--output OUT/fmnist``::

    OUT/fmnist-train-000000.tar ...    training split (minus the held-out samples)
    OUT/fmnist-holdout-000000.tar ...  held-out split (clean calibration data)
    OUT/fmnist-test-000000.tar ...     test split (``val`` for ImageNet's layout)
    OUT/fmnist.json                    the sidecar: the loader's ``spec``
    OUT/fmnist-train-000000.idx ...    each shard's index for DALI's reader (``--no-dali-index``: none)

Each sample is ``<key>.<png|jpg>`` + ``<key>.cls`` (the label as decimal text), the plain
WebDataset convention, so ``wds.WebDataset(url).decode("pil").to_tuple("png;jpg", "cls")``
reads the shards with no code from this package.

Determinism: the held-out split is a pure function of (training keys, seed), training
samples are permuted with ``random.Random(seed)`` before being cut into shards (an
ImageFolder tree is sorted by class; unshuffled shards would each hold one class), the
other splits keep key order, and tar headers carry a fixed mtime/owner. The same input and
seed give byte-identical shards whatever ``--workers`` is.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from ..utils import atomic_write, atomic_write_json
from .dali_index import write_index
from .sources import SOURCES, RawSample, read_source

SIDECAR_FORMAT = "l2w_dist.shards/1"
DEFAULT_HOLDOUT = {"imagefolder": 50_000, "cifar": 5_000, "fashion-mnist": 5_000, "numpy": 5_000}
DATASET_KIND = {"imagefolder": "imagenet", "cifar": "cifar", "fashion-mnist": "fashion-mnist", "numpy": None}
HOLDOUT_RULE = (
    "holdout = the {count} training keys with the smallest sha256('{seed}:' + key) hex digest "
    "(ties broken by key); they are removed from 'train'"
)


def holdout_keys(keys: list[str], count: int, seed: int) -> set[str]:
    """The held-out keys: a pure function of the key set and the seed, independent of the
    input order, the number of workers and the shard size, so the split is stable across
    runs and machines, and adding images elsewhere does not reshuffle it."""
    if count < 0 or count >= len(keys):
        raise ValueError(f"holdout count {count} must be in [0, {len(keys)}) (training samples)")
    ranked = sorted(keys, key=lambda k: (hashlib.sha256(f"{seed}:{k}".encode()).hexdigest(), k))
    return set(ranked[:count])


def _encode_image(sample: RawSample) -> tuple[str, bytes]:
    """Files are copied byte for byte (JPEG stays JPEG); arrays become lossless PNG."""
    if sample.path is not None:
        ext = Path(sample.path).suffix.lower().lstrip(".")
        ext = {"jpeg": "jpg"}.get(ext, ext)
        return ext, Path(sample.path).read_bytes()
    from PIL import Image

    arr = np.asarray(sample.array)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return "png", buf.getvalue()


def _write_shard(path: str, samples: list[RawSample], dali_index: bool = True) -> int:
    """Write one tar atomically (a shard that exists is complete; two ranks preparing the same
    data each write their own temporary file), then its DALI index beside it."""
    import webdataset as wds

    with atomic_write(path, "wb") as stream, wds.TarWriter(stream, mtime=0, user="l2w", group="l2w") as sink:
        for s in samples:
            ext, data = _encode_image(s)
            sink.write({"__key__": s.key, ext: data, "cls": str(s.label).encode()})
    if dali_index:
        write_index(path)
    return len(samples)


def write_shards(
    source: str,
    input_path: str | os.PathLike,
    output_prefix: str | os.PathLike,
    *,
    maxcount: int = 5000,
    holdout: int | None = None,
    seed: int = 0,
    workers: int = 1,
    progress: bool = True,
    dali_index: bool = True,
) -> Path:
    """Convert ``input_path`` (read as ``source``) into shards; returns the sidecar path.

    ``holdout=None`` takes the source's default (50,000 ImageNet, 5,000 otherwise);
    ``holdout=0`` writes no held-out split. ``dali_index``: also write each shard's index
    for DALI's reader (``x.tar`` -> ``x.idx``, see :mod:`.dali_index`).
    """
    from tqdm import tqdm

    if maxcount <= 0:
        raise ValueError(f"maxcount must be positive, got {maxcount}")
    splits, classes = read_source(source, input_path)
    holdout = DEFAULT_HOLDOUT[source] if holdout is None else holdout
    train = splits.pop("train")
    held = holdout_keys([s.key for s in train], holdout, seed) if holdout else set()
    out = {"train": [s for s in train if s.key not in held]}
    random.Random(seed).shuffle(out["train"])
    if holdout:
        out["holdout"] = sorted((s for s in train if s.key in held), key=lambda s: s.key)
    for name, samples in splits.items():
        out[name] = sorted(samples, key=lambda s: s.key)

    prefix = Path(output_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tasks, meta = [], {}
    for name, samples in out.items():
        chunks = [samples[i : i + maxcount] for i in range(0, len(samples), maxcount)]
        names = [f"{prefix.name}-{name}-{i:06d}.tar" for i in range(len(chunks))]
        meta[name] = {"count": len(samples), "shards": names, "shard_counts": [len(c) for c in chunks]}
        tasks += [(str(prefix.parent / n), c) for n, c in zip(names, chunks)]

    total = sum(len(c) for _, c in tasks)
    bar = tqdm(total=total, unit="img", desc=f"shards {prefix.name}", disable=not progress)
    if workers <= 1:
        for path, chunk in tasks:
            bar.update(_write_shard(path, chunk, dali_index))
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for n in pool.map(_write_shard, *zip(*tasks), [dali_index] * len(tasks)):
                bar.update(n)
    bar.close()

    sidecar = {
        "format": SIDECAR_FORMAT,
        "source": source,
        "dataset_kind": DATASET_KIND[source],
        "seed": seed,
        "maxcount": maxcount,
        "num_classes": len(classes),
        "classes": classes,
        "holdout": {
            "from": "train",
            "count": len(held),
            "seed": seed,
            "rule": HOLDOUT_RULE.format(count=len(held), seed=seed),
        },
        "splits": meta,
    }
    path = prefix.parent / (prefix.name + ".json")
    atomic_write_json(path, sidecar)  # written last: a sidecar that exists describes complete shards
    return path


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="make_shards.py")
    p.add_argument("--source", required=True, choices=SOURCES)
    p.add_argument("--input", required=True, help="ImageFolder root, CIFAR pickle dir, idx dir or .npz")
    p.add_argument("--output", required=True, help="OUT_PREFIX: writes OUT_PREFIX-{split}-NNNNNN.tar + .json")
    p.add_argument("--maxcount", type=int, default=5000, help="samples per shard (default 5000)")
    p.add_argument(
        "--holdout",
        type=int,
        default=None,
        help="held-out training samples (default 50000 imagefolder, 5000 otherwise; 0: none)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--no-dali-index", action="store_true", help="no DALI index files (x.idx; built on first use)")
    args = p.parse_args(argv)
    path = write_shards(
        args.source,
        args.input,
        args.output,
        maxcount=args.maxcount,
        holdout=args.holdout,
        seed=args.seed,
        workers=args.workers,
        dali_index=not args.no_dali_index,
    )
    side = json.loads(path.read_text())
    counts = ", ".join(f"{k}={v['count']} ({len(v['shards'])} shards)" for k, v in side["splits"].items())
    print(f"wrote {path}: {counts}", file=sys.stderr)
    return path
