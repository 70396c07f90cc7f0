"""Readers that turn a dataset on disk into a list of samples for the shard writer.

Every reader returns ``(splits, classes)``: ``splits`` maps a split name ("train",
"test", "val") to a list of :class:`RawSample`, ``classes`` is the list of class names
(index = label). A sample's payload is either a file path (ImageFolder: the original
JPEG bytes are copied into the shard unchanged, no re-encoding loss) or a uint8 array
(CIFAR, Fashion-MNIST, numpy: encoded as lossless PNG by the writer).

Keys are stable, source-derived names (``train_00042``, ``n01440764/n01440764_10026``):
the held-out rule hashes them, so the same input always gives the same split.
"""

from __future__ import annotations

import gzip
import os
import pickle
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SOURCES = ("imagefolder", "cifar", "fashion-mnist", "numpy")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".JPEG", ".JPG", ".PNG")

FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass
class RawSample:
    """One sample before encoding: a WebDataset key, a label and a path or uint8 array."""

    key: str
    label: int
    path: str | None = None
    array: np.ndarray | None = None


def sanitize_key(name: str) -> str:
    """WebDataset splits a tar member name at the first dot of its last path component,
    so a key must hold no dots; other odd characters are replaced to keep keys portable."""
    return re.sub(r"[^A-Za-z0-9_/\-]", "_", name)


def read_source(source: str, path: str | os.PathLike) -> tuple[dict[str, list[RawSample]], list[str]]:
    """Read ``path`` as ``source`` (one of :data:`SOURCES`)."""
    readers = {
        "imagefolder": read_imagefolder,
        "cifar": read_cifar,
        "fashion-mnist": read_fashion_mnist,
        "numpy": read_numpy,
    }
    if source not in readers:
        raise ValueError(f"unknown source {source!r}; allowed: {', '.join(SOURCES)}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input for source {source!r} not found: {path}")
    return readers[source](path)


# ---------------------------------------------------------------- ImageFolder
def _class_dirs(root: Path) -> list[str]:
    return sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def _folder_split(root: Path, classes: list[str], split: str) -> list[RawSample]:
    samples = []
    index = {c: i for i, c in enumerate(classes)}
    for cls in _class_dirs(root):
        if cls not in index:
            raise ValueError(f"class folder {root / cls} is not among the training classes")
        for dirpath, _dirs, files in os.walk(root / cls):
            for f in sorted(files):
                if not f.endswith(IMAGE_SUFFIXES):
                    continue
                full = Path(dirpath) / f
                rel = full.relative_to(root).with_suffix("").as_posix()
                samples.append(RawSample(key=sanitize_key(rel), label=index[cls], path=str(full)))
    samples.sort(key=lambda s: s.key)
    if not samples:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    return samples


def read_imagefolder(root: Path) -> tuple[dict[str, list[RawSample]], list[str]]:
    """ImageNet layout ``root/train/<class>/*.JPEG`` (+ optional ``root/val/<class>/``), or a
    single tree ``root/<class>/*.jpg`` that becomes the "train" split."""
    subsplits = [s for s in ("train", "val", "test") if (root / s).is_dir()]
    if "train" in subsplits:
        classes = _class_dirs(root / "train")
        splits = {s: _folder_split(root / s, classes, s) for s in subsplits}
    else:
        classes = _class_dirs(root)
        splits = {"train": _folder_split(root, classes, "train")}
    return splits, classes


# ---------------------------------------------------------------------- CIFAR
def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def _cifar_images(batch: dict) -> np.ndarray:
    return np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def read_cifar(root: Path) -> tuple[dict[str, list[RawSample]], list[str]]:
    """CIFAR-10 (``data_batch_1..5``, ``test_batch``, ``batches.meta``) or CIFAR-100
    (``train``, ``test``, ``meta``; fine labels) python pickles, as distributed."""
    for sub in ("cifar-10-batches-py", "cifar-100-python"):
        if (root / sub).is_dir():
            root = root / sub
    if (root / "batches.meta").exists():
        classes = [c.decode() for c in _unpickle(root / "batches.meta")[b"label_names"]]
        parts = {"train": sorted(root.glob("data_batch_*")), "test": [root / "test_batch"]}
        label_key = b"labels"
    elif (root / "meta").exists():
        classes = [c.decode() for c in _unpickle(root / "meta")[b"fine_label_names"]]
        parts = {"train": [root / "train"], "test": [root / "test"]}
        label_key = b"fine_labels"
    else:
        raise ValueError(f"{root}: neither CIFAR-10 (batches.meta) nor CIFAR-100 (meta) pickles found")
    splits = {}
    for split, files in parts.items():
        files = [f for f in files if f.exists()]
        if not files:
            continue
        images, labels = [], []
        for f in files:
            batch = _unpickle(f)
            images.append(_cifar_images(batch))
            labels.extend(int(x) for x in batch[label_key])
        splits[split] = _array_samples(split, np.concatenate(images), labels)
    return splits, classes


# -------------------------------------------------------------- Fashion-MNIST
def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (MNIST format), gzip-compressed or not."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not a uint8 idx file (magic {data[:4].hex()})")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find_idx(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        for cand in (root / name, root / "FashionMNIST" / "raw" / name, root / "raw" / name):
            if cand.exists():
                return cand
    raise FileNotFoundError(f"Fashion-MNIST file {stem}[.gz] not found under {root}")


def read_fashion_mnist(root: Path) -> tuple[dict[str, list[RawSample]], list[str]]:
    """The four idx files (``train-images-idx3-ubyte.gz`` ...), as in the Debian package
    dataset-fashion-mnist or torchvision's ``FashionMNIST/raw`` folder."""
    splits = {}
    for split, (img_stem, lab_stem) in FASHION_MNIST_FILES.items():
        images = read_idx(_find_idx(root, img_stem))
        labels = read_idx(_find_idx(root, lab_stem))
        if len(images) != len(labels):
            raise ValueError(f"{root}: {split} has {len(images)} images but {len(labels)} labels")
        splits[split] = _array_samples(split, images, labels.tolist())
    return splits, list(FASHION_MNIST_CLASSES)


# ---------------------------------------------------------------------- numpy
def read_numpy(path: Path) -> tuple[dict[str, list[RawSample]], list[str]]:
    """An ``.npz`` with ``{split}_x`` (uint8, N×H×W or N×H×W×C) and ``{split}_y`` (int, N)
    for split in train/val/test, and optionally ``classes`` (N_classes strings)."""
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    splits = {}
    for split in ("train", "val", "test"):
        if f"{split}_x" not in arrays:
            continue
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if x.dtype != np.uint8 or x.ndim not in (3, 4):
            raise ValueError(f"{path}: {split}_x must be uint8 N×H×W[×C], got {x.dtype} {x.shape}")
        splits[split] = _array_samples(split, x, [int(v) for v in y])
    if "train" not in splits:
        raise ValueError(f"{path}: needs arrays train_x and train_y (found {sorted(arrays)})")
    if "classes" in arrays:
        classes = [str(c) for c in arrays["classes"]]
    else:
        n = 1 + max(max(s.label for s in samples) for samples in splits.values())
        classes = [str(i) for i in range(n)]
    return splits, classes


def _array_samples(split: str, images: np.ndarray, labels: list[int]) -> list[RawSample]:
    width = max(5, len(str(len(images))))
    return [RawSample(key=f"{split}_{i:0{width}d}", label=int(labels[i]), array=images[i]) for i in range(len(images))]
