"""The embedded default dataset: Fashion-MNIST (60k train / 10k test 28×28 grayscale photos
of clothing, 10 classes) as WebDataset shards, prepared offline when possible.

Lookup order for the raw idx files: ``$L2W_FASHION_MNIST`` if set, then
``/usr/share/datasets/fashion-mnist`` (Debian/Ubuntu: ``apt-get install dataset-fashion-mnist``),
then ``<out_dir>/raw`` (a previous download), then torchvision's ``FashionMNIST`` download.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .shards import write_shards

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
PREFIX = "fashion-mnist"


def _raw_dir(out_dir: Path) -> Path:
    candidates = [Path(p) for p in [os.environ.get("L2W_FASHION_MNIST")] if p] + [DEBIAN_DIR, out_dir / "raw"]
    for cand in candidates:
        if (cand / "train-images-idx3-ubyte.gz").exists() or (
            cand / "FashionMNIST" / "raw" / "train-images-idx3-ubyte"
        ).exists():
            return cand
    try:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(root=str(out_dir / "raw"), train=True, download=True)
        FashionMNIST(root=str(out_dir / "raw"), train=False, download=True)
    except Exception as exn:  # offline, blocked mirror, ...
        raise RuntimeError(
            "Fashion-MNIST not found locally and the torchvision download failed "
            f"({exn!r}). Offline on Debian/Ubuntu: `apt-get install dataset-fashion-mnist` "
            f"(files in {DEBIAN_DIR}); elsewhere copy the four *-idx?-ubyte.gz files into "
            f"{out_dir / 'raw'} or set L2W_FASHION_MNIST to their folder."
        ) from exn
    return out_dir / "raw"


def _complete(sidecar: Path, holdout: int, seed: int) -> bool:
    """Shards are reusable if the sidecar (written last) matches the request and every shard
    it lists exists (shards are renamed into place only once fully written)."""
    if not sidecar.exists():
        return False
    try:
        side = json.loads(sidecar.read_text())
    except json.JSONDecodeError:
        return False
    if side.get("holdout", {}).get("count") != holdout or side.get("seed") != seed:
        return False
    return all((sidecar.parent / s).exists() for split in side["splits"].values() for s in split["shards"])


def prepare_fashion_mnist(
    out_dir: str | os.PathLike, holdout: int = 5000, seed: int = 0, workers: int = 1, maxcount: int = 10000
) -> Path:
    """Write Fashion-MNIST shards under ``out_dir`` (train 55k, holdout 5k, test 10k by default)
    and return the sidecar path; a no-op when complete shards with the same holdout/seed exist."""
    out_dir = Path(out_dir)
    sidecar = out_dir / f"{PREFIX}.json"
    if _complete(sidecar, holdout, seed):
        return sidecar
    return write_shards(
        "fashion-mnist",
        _raw_dir(out_dir),
        out_dir / PREFIX,
        maxcount=maxcount,
        holdout=holdout,
        seed=seed,
        workers=workers,
    )
