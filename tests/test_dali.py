"""The DALI backend (data.backend=dali) on real DALI CPU pipelines over small generated shards:
index files, the loader contract (per-rank samples, held-out split, fixed epoch length, seeds,
resume), eval images against the torch path, train augmentation statistics, bad data, and a
few training steps through the trainer."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from l2w_dist.config import ConfigError, load_config
from l2w_dist.data import BadDataError, build_eval_loader, build_train_loader, build_transforms, write_shards
from l2w_dist.data.dali import build_dali_eval_loader, build_dali_train_loader
from l2w_dist.data.dali_index import drop_from_index, ensure_index, index_path, read_index, scan_shard
from l2w_dist.data.transforms import dataset_info

RNG = np.random.default_rng(0)
N_TRAIN, N_TEST, HOLDOUT = 70, 23, 10


def _labels(batches) -> list[int]:
    return [int(v) for _x, y in batches for v in y]


def _write_npz(path: Path, size: int, chans: int | None) -> Path:
    """Noise images whose label is the sample's id (train 0.., test 1000..): a label names a sample."""
    shape = (size, size) if chans is None else (size, size, chans)
    np.savez(
        path,
        train_x=RNG.integers(0, 255, (N_TRAIN, *shape), dtype=np.uint8),
        train_y=np.arange(N_TRAIN),
        test_x=RNG.integers(0, 255, (N_TEST, *shape), dtype=np.uint8),
        test_y=np.arange(1000, 1000 + N_TEST),
    )
    return path


@pytest.fixture(scope="module")
def cifar_shards(tmp_path_factory) -> str:
    """32×32 RGB: train 60 in 6 shards of 10 (holdout 10), test 23 in 3 shards."""
    tmp = tmp_path_factory.mktemp("dali_cifar")
    npz = _write_npz(tmp / "c.npz", 32, 3)
    return str(write_shards("numpy", npz, tmp / "out/c", maxcount=10, holdout=HOLDOUT, progress=False))


@pytest.fixture(scope="module")
def fmnist_shards(tmp_path_factory) -> str:
    tmp = tmp_path_factory.mktemp("dali_fmnist")
    npz = _write_npz(tmp / "f.npz", 28, None)
    return str(write_shards("numpy", npz, tmp / "out/f", maxcount=40, holdout=HOLDOUT, progress=False))


def _train(spec, rank=0, world=2, **kw):
    args = {"dataset_kind": "cifar", "img_size": 32, "batch_size": 5, "num_workers": 1, "seed": 3}
    args.update(kw)
    return build_dali_train_loader(spec, rank=rank, world_size=world, **args)


# ----------------------------------------------------------------- index files
def test_make_shards_writes_dali_indexes_and_a_stale_one_is_rebuilt(cifar_shards, tmp_path):
    folder = Path(cifar_shards).parent
    tars = sorted(folder.glob("c-train-*.tar"))
    assert len(tars) == 6 and all(index_path(t).exists() for t in tars)
    first = read_index(tars[0])
    assert first is not None and len(first) == 10
    # every component points at the member's bytes
    with open(tars[0], "rb") as f:
        comp = next(c for c in first.samples[0] if c.ext == "cls")
        f.seek(comp.offset)
        assert f.read(comp.size).decode().isdigit()
    # a truncated copy: the old index is stale (offsets past the end) and is rebuilt from the tar
    cut = tmp_path / "cut.tar"
    data = tars[0].read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    index_path(cut).write_text(index_path(tars[0]).read_text())
    os.utime(index_path(cut), ns=(cut.stat().st_mtime_ns + 10**9,) * 2)
    assert read_index(cut) is None
    rebuilt = ensure_index(cut)
    assert 0 < len(rebuilt) < 10 and "truncated" in rebuilt.damaged
    assert read_index(cut) is not None and len(read_index(cut)) == len(rebuilt)
    assert len(scan_shard(tars[0])) == 10


# ----------------------------------------------------------------- the contract
def test_train_ranks_disjoint_fixed_length_seeded_epochs_and_exact_resume(cifar_shards):
    holdout_and_test = set(range(1000, 1000 + N_TEST))
    loaders = [_train(cifar_shards, rank=r) for r in range(2)]
    assert len(loaders[0]) == (N_TRAIN - HOLDOUT) // (2 * 5) == 6
    epochs = []
    for epoch in range(2):
        per_rank = []
        for ld in loaders:
            ld.set_epoch(epoch)
            batches = list(ld)
            assert len(batches) == 6 and all(x.shape == (5, 3, 32, 32) and x.dtype == torch.uint8 for x, _ in batches)
            per_rank.append(_labels(batches))
        a, b = (set(p) for p in per_rank)
        assert not a & b  # each rank its own samples
        assert len(a) == len(b) == 30  # 3 whole shards each, every sample once
        assert not (a | b) & holdout_and_test and max(a | b) < N_TRAIN
        epochs.append(per_rank)
    holdout = set(range(N_TRAIN)) - set(epochs[0][0]) - set(epochs[0][1])
    assert len(holdout) == HOLDOUT and not holdout & (set(epochs[1][0]) | set(epochs[1][1]))
    assert epochs[0][0] != epochs[1][0]  # a new shard split / order per epoch

    again = _train(cifar_shards, rank=0)
    again.set_epoch(1)
    ref = list(again)
    assert _labels(ref) == epochs[1][0]  # a pure function of (seed, epoch, rank)
    threads = _train(cifar_shards, rank=0, num_workers=2)
    threads.set_epoch(1)
    assert all(torch.equal(x, tx) for (x, _), (tx, _) in zip(ref, threads))  # whatever the thread count
    other_seed = _train(cifar_shards, rank=0, seed=4)
    other_seed.set_epoch(1)
    assert _labels(other_seed) != epochs[1][0]
    for k in (2, 3):
        again.set_epoch(1, start_batch=k)
        resumed = list(again)
        assert len(resumed) == 6 - k
        for (x, y), (rx, ry) in zip(ref[k:], resumed):
            assert torch.equal(x, rx) and torch.equal(y, ry)  # images (augmentation included) and labels
    assert again.epoch == 2


def test_fewer_shards_than_ranks_still_disjoint_and_full(fmnist_shards):
    """2 training shards (40 + 20) over 3 ranks: DALI's sample split, 20 each, disjoint."""
    loaders = [_train(fmnist_shards, rank=r, world=3, dataset_kind="fashion-mnist", batch_size=4) for r in range(3)]
    sets = [set(_labels(ld)) for ld in loaders]
    assert all(len(ld) == 5 for ld in loaders)
    assert sum(len(s) for s in sets) == len(set.union(*sets))  # disjoint


def test_eval_every_sample_once_and_equal_to_the_torch_path(cifar_shards, fmnist_shards):
    for spec, kind in ((cifar_shards, "cifar"), (fmnist_shards, "fashion-mnist")):
        ids = []
        for rank in range(2):
            ev = build_dali_eval_loader(
                spec, "test", dataset_kind=kind, img_size=32, batch_size=4, rank=rank, world_size=2, num_workers=2
            )
            batches = list(ev)
            assert sum(len(y) for _, y in batches) == ev.num_samples
            ids += _labels(batches)
        assert sorted(ids) == list(range(1000, 1000 + N_TEST))
        # one rank, against the torch loader: the same images in the same order, bit for bit
        dali = list(build_dali_eval_loader(spec, "test", dataset_kind=kind, img_size=32, batch_size=8, rank=0,
                                           world_size=1, num_workers=1))  # fmt: skip
        ref = list(build_eval_loader(spec, "test", batch_size=8, rank=0, world_size=1, num_workers=0,
                                     transform=build_transforms(kind, False, 32, normalize=False)))  # fmt: skip
        assert _labels(dali) == _labels(ref)
        for (x, _), (rx, _) in zip(dali, ref):
            assert x.shape == rx.shape == (len(x), 3, 32, 32)
            assert torch.equal(x, rx)


@pytest.fixture(scope="module")
def photo_shards(tmp_path_factory) -> dict[str, str]:
    """ImageNet-like: smooth colour images of varied sizes as JPEG and as PNG (imagefolder source)."""
    tmp = tmp_path_factory.mktemp("dali_photo")
    out = {}
    for ext in ("JPEG", "png"):
        root = tmp / ext
        for split, n in (("train", 12), ("val", 12)):
            for c in ("a", "b"):
                d = root / split / c
                d.mkdir(parents=True)
                for i in range(n):
                    h, w = 60 + 7 * i, 90 - 3 * i
                    yy, xx = np.mgrid[0:h, 0:w]
                    arr = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy + 40 * i) % 256], -1).astype(np.uint8)
                    Image.fromarray(arr).save(d / f"{c}{i}.{ext}", quality=95)
        out[ext] = str(write_shards("imagefolder", root, tmp / f"out/{ext}", maxcount=8, holdout=0, progress=False))
    return out


@pytest.mark.parametrize("ext, tol_mean, tol_max", [("png", 0.25, 1), ("JPEG", 0.5, 2)])
def test_imagenet_eval_resize_centre_crop_matches_timm(photo_shards, ext, tol_mean, tol_max):
    """Resize (shorter side to img_size/0.875) + centre crop, against timm's PIL transform: the
    same geometry (sizes and crop offsets), so only the bilinear filters' rounding differs.
    Stated tolerance, in grey levels: mean |Δ| per image ≤ 0.25 and max |Δ| ≤ 1 for PNG;
    ≤ 0.5 and ≤ 2 for JPEG (the two libjpeg-turbo builds may differ in the last bit too)."""
    spec = photo_shards[ext]
    kw = {"batch_size": 6, "rank": 0, "world_size": 1}
    dali = list(build_dali_eval_loader(spec, "val", dataset_kind="imagenet", img_size=48, num_workers=1, **kw))
    tf = build_transforms("imagenet", False, 48, normalize=False)
    ref = list(build_eval_loader(spec, "val", num_workers=0, transform=tf, **kw))
    assert _labels(dali) == _labels(ref)
    for (x, _), (rx, _) in zip(dali, ref):
        assert x.shape == rx.shape and x.shape[1:] == (3, 48, 48)
        diff = (x.float() - rx.float()).abs()
        assert diff.mean(dim=(1, 2, 3)).max() <= tol_mean
        assert diff.max() <= tol_max


def _gradient_spec(tmp: Path, size: int, n: int, ext: str) -> str:
    """Every image the same: R = 10 + 7·x, G = 10 + 7·y (so the crop window and the flip can be
    read back from the output), size×size."""
    root = tmp / "grad" / "train"
    yy, xx = np.mgrid[0:size, 0:size]
    scale = 200 / size
    arr = np.stack([10 + xx * scale, 10 + yy * scale, np.full_like(xx, 128)], -1).astype(np.uint8)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(n // 2):
            Image.fromarray(arr).save(root / c / f"{c}{i}.{ext}")
    return str(write_shards("imagefolder", tmp / "grad", tmp / "grad_out/g", maxcount=50, holdout=0, progress=False))


def _crop_stats(images: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image: flipped?, x extent and y extent of the crop (fractions of the source)."""
    r, g = images[:, 0].float(), images[:, 1].float()
    scale = 200 / size
    flipped = r[:, :, 0].mean(1) > r[:, :, -1].mean(1)
    dx = (r[:, :, 0].mean(1) - r[:, :, -1].mean(1)).abs() / scale / size
    dy = (g[:, -1, :].mean(1) - g[:, 0, :].mean(1)).abs() / scale / size
    return flipped, dx, dy


def test_imagenet_train_crop_and_flip_statistics_match_timm(tmp_path):
    """RandomResizedCrop(scale 0.08–1, ratio 3/4–4/3) + flip: flip rate and the crop's area and
    aspect distributions of DALI's fused decode-crop match timm's over 400 crops each (means
    within 0.05 area, 0.1 log-aspect; 3–4 standard errors)."""
    spec = _gradient_spec(tmp_path, 128, 400, "png")
    dali = _train(spec, world=1, rank=0, dataset_kind="imagenet", img_size=32, batch_size=50, epoch_length=8)
    d_img = torch.cat([x for x, _ in dali])
    tf = build_transforms("imagenet", True, 32, normalize=False)
    kw = {"batch_size": 50, "rank": 0, "world_size": 1, "seed": 3, "epoch_length": 8}
    ref = build_train_loader(spec, num_workers=0, transform=tf, **kw)
    t_img = torch.cat([x for x, _ in ref])
    stats = {}
    for name, imgs in (("dali", d_img), ("torch", t_img)):
        flipped, dx, dy = _crop_stats(imgs, 128)
        stats[name] = (flipped.float().mean(), (dx * dy).mean(), torch.log(dx / dy).abs().mean(), dx.min())
    (df, da, dr, dmin), (tf_, ta, tr, _) = stats["dali"], stats["torch"]
    assert abs(df - 0.5) < 0.1 and abs(tf_ - 0.5) < 0.1
    assert abs(da - ta) < 0.05, (da, ta)
    assert abs(dr - tr) < 0.1, (dr, tr)
    assert dmin < 0.5  # small crops do occur (scale down to 0.08)


def test_pad_crop_offsets_and_flip_statistics_match_torchvision(fmnist_shards, tmp_path):
    """CIFAR / Fashion-MNIST train: the 4-pixel pad-crop offsets are uniform over −4..4 (9
    values) on each axis and the flip rate is ½, as torchvision's RandomCrop + flip."""
    spec = _gradient_spec(tmp_path, 32, 200, "png")
    dali = _train(spec, world=1, rank=0, batch_size=50, epoch_length=8)
    imgs = torch.cat([x for x, _ in dali]).float()
    r, g = imgs[:, 0], imgs[:, 1]
    scale = 200 / 32
    flipped = []
    offsets_x, offsets_y = [], []
    for i in range(len(imgs)):
        row = r[i, 16]
        col = g[i, :, 16]
        valid = row > 0
        flip = bool(row[valid][0] > row[valid][-1])
        xs = torch.nonzero(valid).flatten()
        x0 = round(float((row[xs[0]] - 10) / scale))
        offsets_x.append((31 - x0 - int(xs[0])) if flip else (x0 - int(xs[0])))
        ys = torch.nonzero(col > 0).flatten()
        offsets_y.append(round(float((col[ys[0]] - 10) / scale)) - int(ys[0]))
        flipped.append(flip)
    for offs in (offsets_x, offsets_y):
        counts = np.bincount(np.array(offs) + 4, minlength=9)
        assert len(counts) == 9 and (counts > 0).all()  # every offset −4..4 occurs, none outside
        assert counts.max() < 3 * len(offs) / 9
    assert abs(np.mean(flipped) - 0.5) < 0.1


def test_channels_last_and_normalised_output_equal_the_torch_path(fmnist_shards):
    info = dataset_info("fashion-mnist")
    norm = (info.mean, info.std)
    kw = {"batch_size": 8, "rank": 0, "world_size": 1}
    dali = list(build_dali_eval_loader(fmnist_shards, "test", dataset_kind="fashion-mnist", img_size=32,
                                       num_workers=1, normalize=norm, channels_last=True, **kw))  # fmt: skip
    tf = build_transforms("fashion-mnist", False, 32, normalize=False)
    ref = list(build_eval_loader(fmnist_shards, "test", num_workers=0, transform=tf, normalize=norm, **kw))
    for (x, _), (rx, _) in zip(dali, ref):
        assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(x, rx, atol=2e-6, rtol=0)


# ------------------------------------------------------------------- bad data
def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _bad_spec(tmp: Path, corrupt: tuple[int, ...] = (), truncate: bool = False, n: int = 40) -> dict:
    """Two training shards of n/2; ``corrupt`` ids get a cut-short PNG; ``truncate`` cuts the
    second shard's tail off (after its index was written)."""
    names = []
    for s in range(2):
        name = f"b-train-{s:06d}.tar"
        with wds.TarWriter(str(tmp / name)) as sink:
            for i in range(s * n // 2, (s + 1) * n // 2):
                data = _png(i)[:40] if i in corrupt else _png(i)
                sink.write({"__key__": f"k{i:03d}", "png": data, "cls": str(i).encode()})
        ensure_index(tmp / name)
        names.append(name)
    if truncate:
        whole = (tmp / names[1]).read_bytes()
        (tmp / names[1]).write_bytes(whole[: len(whole) // 2])
    counts = [n // 2, n // 2]
    return {"base_dir": str(tmp), "splits": {"train": {"shards": names, "count": n, "shard_counts": counts}}}


def test_truncated_shard_is_indexed_to_the_damage_and_its_lost_samples_counted(tmp_path):
    spec = _bad_spec(tmp_path, truncate=True)
    ld = _train(spec, world=1, batch_size=4, max_bad_fraction=0.5, bad_warmup=10)
    ids = _labels(ld)
    assert len(ids) == 40  # still the full epoch (the readable samples cycle)
    lost = 20 - len(read_index(tmp_path / "b-train-000001.tar"))
    bad, read = ld.bad_data()
    assert 0 < lost < 20 and bad == lost and read >= 40
    assert set(ids) <= set(range(40))
    with pytest.raises(BadDataError, match="max_bad_fraction=0.1"):
        list(_train(spec, world=1, batch_size=4, max_bad_fraction=0.1, bad_warmup=10))


def test_corrupt_image_is_found_dropped_from_the_index_and_counted(tmp_path, caplog):
    spec = _bad_spec(tmp_path, corrupt=(7,))
    ld = _train(spec, world=1, batch_size=4, max_bad_fraction=0.1, bad_warmup=10)
    with caplog.at_level("WARNING", logger="l2w_dist.data"):
        ids = _labels(ld)
    assert len(ids) == 40 and 7 not in ids  # a full epoch without it
    assert ld.bad_data()[0] == 1
    assert any("k007.png" in r.getMessage() and "b-train-000000.tar" in r.getMessage() for r in caplog.records)
    assert len(read_index(tmp_path / "b-train-000000.tar")) == 19  # gone from the index for later epochs
    assert 7 not in _labels(ld) and ld.bad_data()[0] == 2  # the next epoch counts it as lost again


def test_corrupt_image_in_eval_stops_naming_shard_and_key(tmp_path):
    spec = _bad_spec(tmp_path, corrupt=(25,))
    spec["splits"]["test"] = spec["splits"].pop("train")
    ev = build_dali_eval_loader(spec, "test", dataset_kind="cifar", img_size=32, batch_size=4, rank=0, world_size=1,
                                num_workers=1)  # fmt: skip
    with pytest.raises(BadDataError, match=r"b-train-000001\.tar: k025\.png"):
        list(ev)
    assert sorted(_labels(ev)) == [i for i in range(40) if i != 25]  # the next pass skips it


def test_drop_from_index_and_remote_urls_refused(tmp_path):
    _bad_spec(tmp_path)
    tar = tmp_path / "b-train-000000.tar"
    assert len(drop_from_index(tar, "k003.png")) == 19
    remote = {"splits": {"train": {"shards": ["pipe:cat x.tar"], "count": 100}}}
    with pytest.raises(ValueError, match="reads local shard files"):
        list(_train(remote, world=1))


# ---------------------------------------------------------------- config, trainer
def test_backend_key_checked_with_the_install_command(monkeypatch):
    assert load_config(None, ["data.backend=dali"]).data.backend == "dali"
    import l2w_dist.config as config

    monkeypatch.setattr(config, "_dali_installed", lambda: False)
    with pytest.raises(ConfigError, match=r"data\.backend='dali'.*pip install -e \"\.\[dali\]\""):
        load_config(None, ["data.backend=dali"])
    with pytest.raises(ConfigError, match="data.backend"):
        load_config(None, ["data.backend=nvidia"])


@pytest.mark.integration
def test_demo_trains_a_few_steps_with_the_dali_backend(tmp_path):
    from l2w_dist.train import run_training
    from tests.helpers.tiny_run import make_tiny_spec, overrides

    spec = make_tiny_spec(tmp_path)
    extra = {"data.backend": "dali", "train.max_steps": 2, "eval.enabled": False, "meta.enabled": False}
    result = run_training(None, tmp_path / "run", overrides(spec, **extra))
    assert result["status"] == "finished" and result["step"] == 2


@pytest.mark.integration
def test_gpu_suite_dali_section_runs_in_cpu_smoke_mode(tmp_path):
    """bench/gpu_dali.py (the suite's mixed-decode section) on CPU decoding: a GPU session runs this code."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import gpu_dali

    r = gpu_dali.measure("cpu", threads=1, images=64, batch_size=16, passes=1, workdir=str(tmp_path))
    assert r["decode"] == "cpu" and r["out_dtype"] == "torch.uint8" and r["img_s"] > 0 and r["img_per_cpu_s"] > 0
