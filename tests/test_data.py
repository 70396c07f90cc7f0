"""Data pipeline: shard writer round trips (4 sources), held-out split, exact and resampled
loaders across simulated ranks × DataLoader workers, resume, bad data, transforms."""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import pickle
import random
import struct
from itertools import product
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from l2w_dist.data import (
    BadDataError,
    build_eval_loader,
    build_train_loader,
    build_transforms,
    holdout_keys,
    load_spec,
    prepare_fashion_mnist,
    write_shards,
)
from l2w_dist.data.loader import _nested_partition
from l2w_dist.data.shards import main as make_shards_main

RNG = np.random.default_rng(0)


# ------------------------------------------------------------ tiny inputs
def make_imagefolder(root: Path) -> Path:
    for split, n in (("train", 7), ("val", 2)):
        for c, cls in enumerate(("cat", "dog")):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                arr = RNG.integers(0, 255, (12 + c, 16, 3), dtype=np.uint8)
                ext = "png" if i == 0 else "JPEG"
                Image.fromarray(arr).save(d / f"{cls}_{i}.x.{ext}")  # a dot in the name on purpose
    return root


def make_cifar10(root: Path, n_train=(6, 5), n_test=4) -> Path:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)

    def batch(n):
        data = RNG.integers(0, 255, (n, 3072), dtype=np.uint8)
        return {b"data": data, b"labels": list(RNG.integers(0, 10, n))}

    for i, n in enumerate(n_train):
        pickle.dump(batch(n), open(d / f"data_batch_{i + 1}", "wb"))
    pickle.dump(batch(n_test), open(d / "test_batch", "wb"))
    pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, open(d / "batches.meta", "wb"))
    return root


def make_cifar100(root: Path) -> Path:
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    for name, n in (("train", 9), ("test", 3)):
        data = {
            b"data": RNG.integers(0, 255, (n, 3072), dtype=np.uint8),
            b"fine_labels": list(RNG.integers(0, 100, n)),
            b"coarse_labels": list(RNG.integers(0, 20, n)),
        }
        pickle.dump(data, open(d / name, "wb"))
    pickle.dump({b"fine_label_names": [f"f{i}".encode() for i in range(100)]}, open(d / "meta", "wb"))
    return root


def write_idx(path: Path, arr: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def make_fmnist(root: Path, n_train=12, n_test=5) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", RNG.integers(0, 255, (n, 28, 28)))
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", RNG.integers(0, 10, n))
    return root


def make_npz(path: Path, n_train=31, n_test=21, shape=(8, 8, 3)) -> Path:
    """Labels = sample index, so a loader's output identifies which samples it produced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        path,
        train_x=RNG.integers(0, 255, (n_train, *shape), dtype=np.uint8),
        train_y=np.arange(n_train),
        test_x=RNG.integers(0, 255, (n_test, *shape), dtype=np.uint8),
        test_y=np.arange(1000, 1000 + n_test),
    )
    return path


def read_back(sidecar: Path, split: str) -> dict[str, tuple[bytes, str, int]]:
    """Read a split with plain webdataset, no l2w_dist code: key -> (image bytes, ext, label)."""
    side = json.loads(sidecar.read_text())
    urls = [str(sidecar.parent / s) for s in side["splits"][split]["shards"]]
    out = {}
    for s in wds.WebDataset(urls, shardshuffle=False):
        ext = next(k for k in ("png", "jpg") if k in s)
        assert s["__key__"] not in out, "duplicate key"
        out[s["__key__"]] = (s[ext], ext, int(s["cls"]))
    assert len(out) == side["splits"][split]["count"]
    return out


def png_array(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


# ------------------------------------------------------------ round trips
def test_roundtrip_imagefolder_copies_bytes(tmp_path):
    root = make_imagefolder(tmp_path / "in")
    sidecar = make_shards_main(
        [
            "--source",
            "imagefolder",
            "--input",
            str(root),
            "--output",
            str(tmp_path / "out/inet"),
            "--maxcount",
            "4",
            "--holdout",
            "3",
            "--workers",
            "1",
        ]
    )
    side = json.loads(sidecar.read_text())
    assert side["classes"] == ["cat", "dog"] and side["dataset_kind"] == "imagenet"
    assert {k: v["count"] for k, v in side["splits"].items()} == {"train": 11, "holdout": 3, "val": 4}
    for split, folder in (("train", "train"), ("holdout", "train"), ("val", "val")):
        files = {
            p.relative_to(root / folder).with_suffix("").as_posix().replace(".", "_"): p
            for p in (root / folder).rglob("*.*")
        }
        for key, (data, ext, label) in read_back(sidecar, split).items():
            matches = [files[key]]
            assert data == matches[0].read_bytes()  # JPEG bytes copied, not re-encoded
            assert ext == ("png" if matches[0].suffix == ".png" else "jpg")
            assert label == ["cat", "dog"].index(matches[0].parent.name)


@pytest.mark.parametrize("maker", [make_cifar10, make_cifar100])
def test_roundtrip_cifar(tmp_path, maker):
    root = maker(tmp_path / "in")
    sidecar = write_shards("cifar", root, tmp_path / "out/c", maxcount=4, holdout=2, progress=False)
    sub = next(root.iterdir())
    meta = "batches.meta" if (sub / "batches.meta").exists() else "meta"
    train_files = sorted(sub.glob("data_batch_*")) or [sub / "train"]
    batches = [pickle.load(open(f, "rb"), encoding="bytes") for f in train_files]
    images = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    label_key = b"labels" if meta == "batches.meta" else b"fine_labels"
    labels = [int(v) for b in batches for v in b[label_key]]
    got = read_back(sidecar, "train") | read_back(sidecar, "holdout")
    assert len(got) == len(labels)
    for key, (data, ext, label) in got.items():
        i = int(key.split("_")[1])
        assert ext == "png" and label == labels[i]
        np.testing.assert_array_equal(png_array(data), images[i])
    assert len(read_back(sidecar, "test")) == (4 if meta == "batches.meta" else 3)
    assert json.loads(sidecar.read_text())["num_classes"] == (10 if meta == "batches.meta" else 100)


def test_roundtrip_fashion_mnist_idx(tmp_path):
    root = make_fmnist(tmp_path / "in")
    sidecar = write_shards("fashion-mnist", root, tmp_path / "out/f", maxcount=5, holdout=3, progress=False)
    with gzip.open(root / "train-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(root / "train-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    got = read_back(sidecar, "train") | read_back(sidecar, "holdout")
    assert len(got) == 12
    for key, (data, _ext, label) in got.items():
        i = int(key.split("_")[1])
        np.testing.assert_array_equal(png_array(data), images[i])  # lossless, 1 channel
        assert label == labels[i]
    assert len(read_back(sidecar, "test")) == 5
    assert json.loads(sidecar.read_text())["classes"][0] == "T-shirt/top"


@pytest.mark.integration
def test_roundtrip_numpy_and_parallel_writer_is_byte_identical(tmp_path):
    npz = make_npz(tmp_path / "in.npz")
    a = write_shards("numpy", npz, tmp_path / "a/n", maxcount=6, holdout=4, seed=3, workers=1, progress=False)
    b = write_shards("numpy", npz, tmp_path / "b/n", maxcount=6, holdout=4, seed=3, workers=2, progress=False)
    side = json.loads(a.read_text())
    assert side == json.loads(b.read_text())
    for split in side["splits"].values():
        for shard in split["shards"]:
            assert (a.parent / shard).read_bytes() == (b.parent / shard).read_bytes()
    with np.load(npz) as z:
        x, y = z["train_x"], z["train_y"]
    for key, (data, _ext, label) in (read_back(a, "train") | read_back(a, "holdout")).items():
        i = int(key.split("_")[1])
        assert label == y[i]
        np.testing.assert_array_equal(png_array(data), x[i])


def test_bad_writer_input_is_named(tmp_path):
    with pytest.raises(ValueError, match="unknown source 'tfrecord'.*imagefolder"):
        write_shards("tfrecord", tmp_path, tmp_path / "o")
    with pytest.raises(FileNotFoundError, match="nope"):
        write_shards("numpy", tmp_path / "nope.npz", tmp_path / "o")
    npz = make_npz(tmp_path / "in.npz", n_train=5)
    with pytest.raises(ValueError, match="holdout count 5"):
        write_shards("numpy", npz, tmp_path / "o", holdout=5, progress=False)


# ------------------------------------------------------------ held-out split
def test_holdout_disjoint_stable_and_order_independent(tmp_path):
    npz = make_npz(tmp_path / "in.npz", n_train=40)
    s1 = write_shards("numpy", npz, tmp_path / "a/n", maxcount=7, holdout=6, seed=1, progress=False)
    s2 = write_shards("numpy", npz, tmp_path / "b/n", maxcount=13, holdout=6, seed=1, progress=False)
    train, held = set(read_back(s1, "train")), set(read_back(s1, "holdout"))
    assert len(held) == 6 and not train & held and len(train | held) == 40
    assert set(read_back(s2, "holdout")) == held  # stable across runs and shard sizes
    keys = [f"train_{i:05d}" for i in range(40)]
    assert holdout_keys(keys, 6, 1) == held == holdout_keys(keys[::-1], 6, 1)
    assert holdout_keys(keys, 6, 2) != held  # the seed matters
    assert holdout_keys(keys + ["extra_1", "extra_2"], 6, 1) & held  # mostly unchanged by new data
    # the loader reads exactly the held-out keys' labels from the holdout split
    ev = build_eval_loader(s1, "holdout", batch_size=4, rank=0, world_size=1, num_workers=0, transform=None)
    labels = sorted(int(v) for _x, y in ev for v in y)
    assert labels == sorted(int(k.split("_")[1]) for k in held)
    # training never sees it, unless the released behaviour is asked for explicitly
    for include, expect in ((False, 34), (True, 40)):
        tl = build_train_loader(
            s1,
            batch_size=1,
            rank=0,
            world_size=1,
            num_workers=0,
            transform=None,
            seed=0,
            resampled=False,
            include_holdout=include,
        )
        ids = sorted(int(v) for _x, y in tl for v in y)
        assert len(tl) == expect and len(ids) == expect
        assert not include or {int(k.split("_")[1]) for k in held} <= set(ids)
        assert include or not {int(k.split("_")[1]) for k in held} & set(ids)


# ------------------------------------------------------------ loaders
@pytest.fixture(scope="module")
def npz_shards(tmp_path_factory):
    """train: 31 samples in 5 shards (7,7,7,7,3: uneven); test: 21 samples in 3 shards."""
    tmp = tmp_path_factory.mktemp("npz")
    npz = make_npz(tmp / "in.npz")
    return write_shards("numpy", npz, tmp / "out/n", maxcount=7, holdout=0, progress=False)


def _ids(batches):
    return [int(v) for _x, y in batches for v in y]


def test_partition_covers_every_sample_once():
    """The rank × worker split (whole shards, or every k-th sample when shards are few)."""
    for n_shards, world, workers in product(range(1, 7), range(1, 4), range(1, 4)):
        sizes = [5 + (i % 3) for i in range(n_shards)]
        seen = []
        for rank, worker in product(range(world), range(workers)):
            mine, stride, offset = _nested_partition(n_shards, rank, world, worker, workers)
            stream = [(s, j) for s in mine for j in range(sizes[s])]
            seen += stream[offset::stride]
        assert sorted(seen) == sorted((s, j) for s in range(n_shards) for j in range(sizes[s]))


@pytest.mark.integration
def test_exact_eval_2_ranks_2_workers_each_sample_once(npz_shards):
    per_rank = []
    for rank in range(2):
        ev = build_eval_loader(npz_shards, "test", batch_size=4, rank=rank, world_size=2, num_workers=2, transform=None)
        ids = _ids(ev)
        assert len(ids) == ev.num_samples
        assert ids == _ids(ev)  # deterministic order
        per_rank.append(ids)
    assert sorted(per_rank[0] + per_rank[1]) == list(range(1000, 1021))


@pytest.mark.integration
def test_resampled_equal_batches_per_rank_uneven_shards(npz_shards):
    counts = []
    for rank in range(2):
        tl = build_train_loader(
            npz_shards, batch_size=4, rank=rank, world_size=2, num_workers=2, transform=None, seed=0, shuffle_buffer=8
        )
        assert len(tl) == tl.num_batches == 31 // 8
        batches = list(tl)
        counts.append(len(batches))
        assert all(x.shape == (4, 3, 8, 8) and y.dtype == torch.long for x, y in batches)
    assert counts == [3, 3]
    # a fixed, longer epoch and the non-resampled mode also give equal counts on both ranks
    for resampled in (True, False):
        n = [
            len(
                list(
                    build_train_loader(
                        npz_shards,
                        batch_size=4,
                        rank=r,
                        world_size=2,
                        num_workers=0,
                        transform=None,
                        seed=0,
                        epoch_length=11,
                        resampled=resampled,
                    )
                )
            )
            for r in range(2)
        ]
        assert n == [11, 11]


def test_non_resampled_epoch_is_a_permutation(npz_shards):
    """Without resampling one epoch of 31 // 1 batches reads each training sample once."""
    tl = build_train_loader(
        npz_shards,
        batch_size=1,
        rank=0,
        world_size=1,
        num_workers=0,
        transform=None,
        seed=0,
        resampled=False,
        shuffle_buffer=4,
    )
    ids = _ids(tl)
    assert sorted(ids) == list(range(31)) and ids != list(range(31))


def noisy_tensor(image):
    """A random augmentation: resume must reproduce it exactly."""
    return pil_to_tensor(image).float() + torch.rand(())


@pytest.mark.integration
def test_train_deterministic_epochs_and_exact_resume(npz_shards):
    def make():
        return build_train_loader(
            npz_shards,
            batch_size=2,
            rank=1,
            world_size=2,
            num_workers=2,
            transform=noisy_tensor,
            seed=5,
            epoch_length=7,
            shuffle_buffer=8,
        )

    a, b = make(), make()
    a.set_epoch(3)
    b.set_epoch(3)
    full, again = list(a), list(b)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(full, again))
    assert a.epoch == 4  # iterating moves to the next epoch
    assert _ids(a) != _ids(full)  # epoch 4 differs from epoch 3
    for k in (3, 4):  # resume mid-epoch: odd and even k with 2 workers
        b.set_epoch(3, start_batch=k)
        tail = list(b)
        assert len(tail) == 7 - k
        for (x1, y1), (x2, y2) in zip(full[k:], tail):
            assert torch.equal(y1, y2) and torch.equal(x1, x2)  # augmentation RNG included
    b.set_epoch(3, start_batch=6)  # one worker has nothing left: it must stop, not stream forever
    (last,) = list(b)
    assert torch.equal(last[0], full[6][0])
    b.set_epoch(3, start_batch=7)
    assert list(b) == []
    short = build_train_loader(
        npz_shards, batch_size=2, rank=0, world_size=1, num_workers=2, transform=None, seed=0, epoch_length=1
    )
    assert len(list(short)) == 1  # fewer batches than workers


def test_channels_last_and_transforms(npz_shards):
    tf = build_transforms("fashion-mnist", True, in_chans=3)  # pads the 8×8 test images to 32
    tl = build_train_loader(
        npz_shards,
        batch_size=3,
        rank=0,
        world_size=1,
        num_workers=0,
        transform=tf,
        seed=0,
        epoch_length=1,
        channels_last=True,
    )
    ((x, y),) = list(tl)
    assert x.shape == (3, 3, 32, 32) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    "kind,train,size,chans,expect",
    [
        ("fashion-mnist", True, None, None, (3, 32, 32)),
        ("fashion-mnist", False, None, 1, (1, 32, 32)),
        ("fashion-mnist", False, 28, 3, (3, 28, 28)),
        ("cifar", False, None, None, (3, 32, 32)),
        ("imagenet", True, 48, None, (3, 48, 48)),
        ("imagenet", False, 48, None, (3, 48, 48)),
    ],
)
def test_transform_shapes(kind, train, size, chans, expect):
    side = 32 if kind == "cifar" else 28
    img = Image.fromarray(RNG.integers(0, 255, (side, side), dtype=np.uint8)).convert("RGB")
    out = build_transforms(kind, train, size, in_chans=chans)(img)
    assert tuple(out.shape) == expect
    if kind == "fashion-mnist" and not train and size is None:  # zero padding = black background
        assert torch.allclose(out[:, :2, :], torch.tensor(-0.2860 / 0.3530))


def test_transform_bad_kind():
    with pytest.raises(ValueError, match="unknown dataset_kind 'mnist'.*fashion-mnist"):
        build_transforms("mnist", True)


# ------------------------------------------------------------ bad data
def _corrupt_spec(tmp_path: Path, n_good: int, n_bad: int) -> dict:
    with wds.TarWriter(str(tmp_path / "bad-000000.tar")) as sink:
        for i in range(n_good + n_bad):
            img = io.BytesIO()
            Image.fromarray(np.full((4, 4, 3), i, np.uint8)).save(img, format="PNG")
            data = img.getvalue() if i >= n_bad else img.getvalue()[:30]  # truncated PNG
            sink.write({"__key__": f"s{i:03d}", "png": data, "cls": str(i).encode()})
    # a second, truncated shard: its first samples are readable, then the tar ends
    whole = (tmp_path / "bad-000000.tar").read_bytes()
    (tmp_path / "bad-000001.tar").write_bytes(whole[: len(whole) // 2 + 100])
    return {"base_dir": str(tmp_path), "splits": {"test": {"shards": ["bad-000000.tar", "bad-000001.tar"]}}}


def test_corrupt_samples_skipped_and_counted(tmp_path, caplog):
    spec = _corrupt_spec(tmp_path, n_good=20, n_bad=2)
    ev = build_eval_loader(
        spec,
        "test",
        batch_size=8,
        rank=0,
        world_size=1,
        num_workers=0,
        transform=None,
        max_bad_fraction=0.2,
        bad_warmup=10,
    )
    with caplog.at_level(logging.WARNING, logger="l2w_dist.data"):
        ids = _ids(ev)
    assert set(ids[:20]) == set(range(2, 22))  # first shard: the 20 good samples
    assert 0 < len(ids) - 20 < 20  # the truncated shard: some, not all
    warnings = [r for r in caplog.records if "skipping bad data" in r.getMessage()]
    assert len(warnings) >= 3  # 2 corrupt images + the truncated tar (at least)


@pytest.mark.parametrize("num_workers", [0, pytest.param(2, marks=pytest.mark.integration)])
def test_bad_data_totals_summed_over_workers(tmp_path, num_workers):
    """The loader's bad_data() sums every worker's counts (shared memory), across epochs."""
    spec = _corrupt_spec(tmp_path, n_good=20, n_bad=2)
    ev = build_eval_loader(
        spec,
        "test",
        batch_size=8,
        rank=0,
        world_size=1,
        num_workers=num_workers,
        transform=None,
        max_bad_fraction=0.5,
        bad_warmup=10,
    )
    n = len(_ids(ev))
    bad, read = ev.bad_data()
    assert bad >= 3 and read >= n + 2  # 2 corrupt images + the truncated tar; read counts the corrupt ones too
    _ids(ev)
    assert ev.bad_data() == (2 * bad, 2 * read)


@pytest.mark.parametrize("num_workers", [0, pytest.param(2, marks=pytest.mark.integration)])
def test_bad_fraction_threshold_stops_the_run(tmp_path, num_workers):
    spec = _corrupt_spec(tmp_path, n_good=20, n_bad=4)
    ev = build_eval_loader(
        spec,
        "test",
        batch_size=8,
        rank=0,
        world_size=1,
        num_workers=num_workers,
        transform=None,
        max_bad_fraction=0.1,
        bad_warmup=10,
    )
    with pytest.raises(BadDataError, match="max_bad_fraction=0.1"):
        list(ev)


def test_missing_shard_fails_at_start_naming_it(npz_shards, tmp_path):
    side = json.loads(npz_shards.read_text())
    side["base_dir"] = str(npz_shards.parent)
    side["splits"]["train"]["shards"] = side["splits"]["train"]["shards"] + ["n-train-000099.tar"]
    with pytest.raises(FileNotFoundError, match="n-train-000099.tar"):
        build_train_loader(side, batch_size=2, rank=0, world_size=1, num_workers=0, transform=None, seed=0)
    with pytest.raises(ValueError, match="split 'holdout' not in the dataset spec; available: train, test"):
        build_eval_loader(npz_shards, "holdout", batch_size=2, rank=0, world_size=1, num_workers=0, transform=None)


def test_spec_brace_patterns_and_pipe_urls(npz_shards):
    side = json.loads(npz_shards.read_text())
    side["base_dir"] = str(npz_shards.parent)
    side["splits"]["test"]["shards"] = "n-test-{000000..000002}.tar"
    urls = load_spec(side)["splits"]["test"]["urls"]
    assert urls == [str(npz_shards.parent / f"n-test-00000{i}.tar") for i in range(3)]
    side["splits"]["test"]["shards"] = [f"pipe:cat {u}" for u in urls]
    ev = build_eval_loader(side, "test", batch_size=5, rank=0, world_size=1, num_workers=0, transform=None)
    assert sorted(_ids(ev)) == list(range(1000, 1021))


# ------------------------------------------------------------ Fashion-MNIST default
def test_prepare_fashion_mnist_idempotent(tmp_path, monkeypatch):
    monkeypatch.setenv("L2W_FASHION_MNIST", str(make_fmnist(tmp_path / "raw", n_train=30, n_test=10)))
    sidecar = prepare_fashion_mnist(tmp_path / "shards", holdout=5, seed=0)
    side = json.loads(sidecar.read_text())
    assert {k: v["count"] for k, v in side["splits"].items()} == {"train": 25, "holdout": 5, "test": 10}
    shard = sidecar.parent / side["splits"]["train"]["shards"][0]
    stamp = shard.stat().st_mtime_ns
    assert prepare_fashion_mnist(tmp_path / "shards", holdout=5, seed=0) == sidecar
    assert shard.stat().st_mtime_ns == stamp  # complete: nothing rewritten
    os.remove(shard)
    prepare_fashion_mnist(tmp_path / "shards", holdout=5, seed=0)
    assert shard.exists()  # incomplete: rebuilt


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").exists(), reason="needs apt package dataset-fashion-mnist"
)
def test_prepare_fashion_mnist_real(tmp_path):
    sidecar = prepare_fashion_mnist(tmp_path, holdout=5000, seed=0)
    side = json.loads(sidecar.read_text())
    counts = {k: v["count"] for k, v in side["splits"].items()}
    assert counts == {"train": 55000, "holdout": 5000, "test": 10000}
    ev = build_eval_loader(
        sidecar,
        "test",
        batch_size=1000,
        rank=0,
        world_size=1,
        num_workers=2,
        transform=build_transforms("fashion-mnist", False),
    )
    labels = torch.cat([y for _x, y in ev])
    assert len(labels) == 10000 and torch.bincount(labels).tolist() == [1000] * 10


@pytest.mark.parametrize(
    "kind,train", [("imagenet", False), ("imagenet", True), ("cifar", True), ("fashion-mnist", False)]
)
def test_uint8_transforms_with_device_normalizer_equal_loader_normalization(kind, train):
    """build_transforms(normalize=False) + attach_input_normalizer = the normalising transform."""
    from l2w_dist.data import attach_input_normalizer

    rng = np.random.default_rng(0)
    shape = (375, 500, 3) if kind == "imagenet" else (28, 28, 3) if kind == "fashion-mnist" else (32, 32, 3)
    image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
    outs = []
    for normalize in (True, False):
        torch.manual_seed(3)
        random.seed(3)  # the same random crop / flip for both
        outs.append(build_transforms(kind, train, normalize=normalize)(image))
    as_float, as_uint8 = outs
    assert as_float.dtype == torch.float32 and as_uint8.dtype == torch.uint8
    model = torch.nn.Identity()
    attach_input_normalizer(model, kind)
    batch = as_uint8[None].contiguous(memory_format=torch.channels_last)
    got = model(batch)
    assert got.dtype == torch.float32 and got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got[0], as_float, rtol=0, atol=2e-6)
    assert model(as_float) is as_float  # float inputs pass unchanged
    with pytest.raises(ValueError, match="unknown dataset_kind 'mnist'"):
        attach_input_normalizer(model, "mnist")


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("num_workers", [0, pytest.param(2, marks=pytest.mark.integration)])
def test_loader_normalisation_in_the_batch_equals_the_transforms(npz_shards, channels_last, num_workers):
    """build_*_loader(normalize=(mean, std)) over uint8 transforms = normalising transforms."""
    from l2w_dist.data import DATASET_INFO

    info = DATASET_INFO["cifar"]
    batches = {}
    for fused in (False, True):
        tf = build_transforms("cifar", True, 16, normalize=not fused)
        kw = {"normalize": (info.mean, info.std)} if fused else {}
        train = build_train_loader(
            npz_shards,
            batch_size=8,
            rank=0,
            world_size=1,
            num_workers=num_workers,
            transform=tf,
            seed=1,
            epoch_length=3,
            channels_last=channels_last,
            **kw,
        )
        ev = build_eval_loader(
            npz_shards,
            "test",
            batch_size=8,
            rank=0,
            world_size=1,
            num_workers=num_workers,
            transform=build_transforms("cifar", False, 16, normalize=not fused),
            channels_last=channels_last,
            **kw,
        )
        batches[fused] = list(train) + list(ev)
    assert len(batches[True]) == len(batches[False]) > 3
    for (xa, ya), (xb, yb) in zip(batches[False], batches[True]):
        assert torch.equal(ya, yb) and xb.dtype == torch.float32
        assert xb.is_contiguous(memory_format=torch.channels_last) == channels_last
        torch.testing.assert_close(xb, xa, rtol=0, atol=2e-6)
    bad = build_train_loader(
        npz_shards,
        batch_size=8,
        rank=0,
        world_size=1,
        num_workers=0,
        transform=build_transforms("cifar", True, 16),
        seed=1,
        epoch_length=1,
        normalize=(info.mean, info.std),
    )
    with pytest.raises(TypeError, match="normalize=False"):
        list(bad)
