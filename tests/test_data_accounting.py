"""Bad-data accounting on real damaged shards: the reader resynchronises after a corrupt tar
header, and every sample a shard did not deliver is counted as lost (exact counts)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from l2w_dist.data import build_eval_loader, build_train_loader
from l2w_dist.data.loader import BadDataError
from l2w_dist.data.tarstream import iter_tar_members

N = 50  # samples per shard


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4, 3), i, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _shard(path: Path, start: int, broken_png: tuple[int, ...] = ()) -> None:
    """N samples ``s<id>`` (label = id), PNG + cls; ``broken_png``: ids whose PNG is cut short."""
    with wds.TarWriter(str(path)) as sink:
        for i in range(start, start + N):
            data = _png(i)[:30] if i in broken_png else _png(i)
            sink.write({"__key__": f"s{i:04d}", "png": data, "cls": str(i).encode()})


def _header_offset(path: Path, name: str) -> int:
    """The offset of the member's own header (after any pax header of its)."""
    with tarfile.open(path) as tar:
        return next(m.offset_data - 512 for m in tar if m.name == name)


def _spec(tmp_path: Path, counts: bool = True) -> dict:
    """Two shards of N samples (ids 0..N-1, N..2N-1) as split 'test' (and 'train')."""
    for s in range(2):
        _shard(tmp_path / f"d-{s:06d}.tar", s * N)
    split = {"shards": ["d-000000.tar", "d-000001.tar"], "count": 2 * N}
    if counts:
        split["shard_counts"] = [N, N]
    return {"base_dir": str(tmp_path), "splits": {"test": dict(split), "train": dict(split)}}


def _eval_loader(spec: dict, max_bad_fraction: float = 0.5, workers: int = 0):
    return build_eval_loader(
        spec,
        "test",
        batch_size=16,
        rank=0,
        world_size=1,
        num_workers=workers,
        transform=None,
        max_bad_fraction=max_bad_fraction,
        bad_warmup=10,
    )


def _eval(spec: dict, max_bad_fraction: float = 0.5, workers: int = 0):
    """One pass over the test split: the labels read (the sample ids) and ``bad_data()``."""
    loader = _eval_loader(spec, max_bad_fraction, workers)
    ids = [int(v) for _x, y in loader for v in y]
    return ids, loader.bad_data()


def _damage(path: Path, offset: int, how: str) -> None:
    blob = bytearray(path.read_bytes())
    if how == "flip":
        blob[offset + 3] ^= 0xFF  # a byte of the member name: the header checksum fails
    elif how == "zero":
        blob[offset : offset + 512] = bytes(512)
    path.write_bytes(bytes(blob))


def test_intact_shards_lose_nothing(tmp_path):
    ids, (lost, read) = _eval(_spec(tmp_path))
    assert sorted(ids) == list(range(2 * N)) and (lost, read) == (0, 2 * N)


@pytest.mark.parametrize("how", ["flip", "zero"])
def test_corrupt_header_mid_shard_resynchronises_and_loses_one_sample(tmp_path, how):
    spec = _spec(tmp_path)
    shard = tmp_path / "d-000000.tar"
    _damage(shard, _header_offset(shard, "s0020.png"), how)  # sample 20 keeps only its .cls
    ids, (lost, read) = _eval(spec)
    assert sorted(ids) == [i for i in range(2 * N) if i != 20]  # everything after the damage is read
    assert (lost, read) == (1, 2 * N)


def test_corrupt_first_header_resynchronises(tmp_path):
    spec = _spec(tmp_path)
    shard = tmp_path / "d-000001.tar"
    own = _header_offset(shard, "s0050.cls")
    _damage(shard, 0, "flip")  # the shard's very first block (sample 50's .cls: its pax header) ...
    _damage(shard, own, "flip")  # ... and its own header
    ids, (lost, read) = _eval(spec)
    assert sorted(ids) == [i for i in range(2 * N) if i != N] and (lost, read) == (1, 2 * N)


def test_several_damaged_stretches_each_cost_their_samples(tmp_path):
    spec = _spec(tmp_path)
    shard = tmp_path / "d-000000.tar"
    offsets = [_header_offset(shard, n) for n in ("s0005.cls", "s0006.png", "s0006.cls", "s0030.png")]
    for offset in offsets:  # samples 5, 6 and 30 lose members
        _damage(shard, offset, "flip")
    ids, (lost, read) = _eval(spec)
    assert sorted(ids) == [i for i in range(2 * N) if i not in (5, 6, 30)] and (lost, read) == (3, 2 * N)


def test_truncated_shard_counts_every_sample_it_did_not_deliver(tmp_path):
    spec = _spec(tmp_path)
    shard = tmp_path / "d-000001.tar"
    blob = shard.read_bytes()
    shard.write_bytes(blob[: _header_offset(shard, "s0080.png") + 700])  # cut inside sample 80's png
    ids, (lost, read) = _eval(spec)
    assert sorted(ids) == list(range(80))
    assert (lost, read) == (20, 2 * N)  # samples 80..99: the one cut and the 19 never reached


def test_corrupt_images_count_one_each(tmp_path):
    spec = _spec(tmp_path)
    _shard(tmp_path / "d-000000.tar", 0, broken_png=(3, 17))
    ids, (lost, read) = _eval(spec)
    assert sorted(ids) == [i for i in range(2 * N) if i not in (3, 17)] and (lost, read) == (2, 2 * N)


def test_unreadable_shard_loses_its_whole_count(tmp_path):
    spec = _spec(tmp_path)
    loader = _eval_loader(spec, max_bad_fraction=0.6)
    (tmp_path / "d-000001.tar").unlink()  # disappears after the loader was built
    ids = [int(v) for _x, y in loader for v in y]
    assert sorted(ids) == list(range(N)) and loader.bad_data() == (N, 2 * N)


def test_without_shard_counts_each_damaged_stretch_counts_one(tmp_path):
    """A hand-written spec without shard_counts: the reader cannot know what a stretch held,
    so it counts one per stretch, besides the incomplete sample next to it (an estimate)."""
    spec = _spec(tmp_path, counts=False)
    shard = tmp_path / "d-000000.tar"
    _damage(shard, _header_offset(shard, "s0020.png"), "flip")
    ids, (lost, _read) = _eval(spec)
    assert sorted(ids) == [i for i in range(2 * N) if i != 20]  # resynchronised all the same
    assert lost == 2  # the stretch + sample 20 without its image


def test_max_bad_fraction_uses_the_samples_lost(tmp_path):
    """A truncated shard losing 20 of 100 samples: one event, 20 % of the data."""
    spec = _spec(tmp_path)
    shard = tmp_path / "d-000001.tar"
    shard.write_bytes(shard.read_bytes()[: _header_offset(shard, "s0080.png") + 700])
    with pytest.raises(BadDataError, match="19 samples lost out of 99"):
        _eval(spec, max_bad_fraction=0.15)
    ids, (lost, _read) = _eval(spec, max_bad_fraction=0.25)
    assert lost == 20 and len(ids) == 80


def test_train_loader_counts_the_samples_a_damaged_shard_lost(tmp_path):
    spec = _spec(tmp_path)
    shard = tmp_path / "d-000000.tar"
    shard.write_bytes(shard.read_bytes()[: _header_offset(shard, "s0040.png")])  # ends before sample 40
    loader = build_train_loader(
        spec,
        batch_size=10,
        rank=0,
        world_size=1,
        num_workers=0,
        transform=None,
        seed=0,
        epoch_length=9,  # 90 of the 100 listed samples: one pass over both shards, cut at 90
        resampled=False,
        shuffle_buffer=1,
        max_bad_fraction=0.5,
        bad_warmup=10,
    )
    order = [int(v) for _x, y in loader for v in y]
    lost, read = loader.bad_data()
    assert sorted(order) == [i for i in range(2 * N) if not 40 <= i < N]
    assert (lost, read) == (10, 2 * N)


def test_lean_reader_without_resync_still_raises():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in ("a.cls", "b.cls"):
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"1"))
    blob = bytearray(buf.getvalue())
    blob[1024 + 3] ^= 0xFF
    with pytest.raises(tarfile.ReadError, match="checksum"):
        list(iter_tar_members(io.BytesIO(bytes(blob))))
    seen: list[str] = []
    assert list(iter_tar_members(io.BytesIO(bytes(blob)), on_damage=seen.append)) == [("a.cls", b"1")]
    assert len(seen) == 1 and "corrupt tar header at byte 1024" in seen[0]
