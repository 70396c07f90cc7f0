"""The lean tar reader equals Python's tarfile on every format a shard may come in, and turns
broken shards into errors the loader's bad-data handler can count."""

from __future__ import annotations

import gzip
import io
import tarfile

import pytest
import webdataset as wds

from l2w_dist.data.tarstream import iter_tar_members, tar_samples


def _tar(members: list[tuple[str, bytes]], fmt: int, extra: bool = True) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        if extra:
            d = tarfile.TarInfo("somedir")
            d.type = tarfile.DIRTYPE
            tar.addfile(d)
            link = tarfile.TarInfo("alink")
            link.type, link.linkname = tarfile.SYMTYPE, "somewhere"
            tar.addfile(link)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.uid = len(data), 1_700_000_000, 12345
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


MEMBERS = [
    ("a/0001.jpg", b"\xff\xd8jpeg bytes" * 37),
    ("a/0001.cls", b"7"),
    ("b" * 150 + "/x.png", b"long-named member " * 3),  # > 100 chars: GNU 'L' or pax 'path'
    ("ü-ñame.cls", b"3"),  # non-ASCII: pax in PAX_FORMAT
    ("empty.txt", b""),
    ("c/%s.cls" % ("d" * 120), bytes(512)),  # exactly one block of payload
]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_members_equal_tarfile(fmt):
    members = MEMBERS if fmt != tarfile.USTAR_FORMAT else [m for m in MEMBERS if len(m[0]) < 100]
    blob = _tar(members, fmt)
    ours = list(iter_tar_members(io.BytesIO(blob)))
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        ref = [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]
    assert ours == ref == members


def test_metadata_keys_skipped_like_webdataset():
    blob = _tar([("__index__", b"meta"), ("k.cls", b"1"), ("__dir__/x.txt", b"m")], tarfile.GNU_FORMAT, False)
    assert list(iter_tar_members(io.BytesIO(blob))) == [("k.cls", b"1")]


def test_gzip_shard_goes_through_tarfile():
    blob = gzip.compress(_tar(MEMBERS, tarfile.PAX_FORMAT))
    assert list(iter_tar_members(io.BytesIO(blob))) == MEMBERS


def test_truncated_and_corrupt_streams_raise():
    blob = _tar(MEMBERS, tarfile.GNU_FORMAT, extra=False)
    with pytest.raises(tarfile.ReadError, match="unexpected end"):
        list(iter_tar_members(io.BytesIO(blob[: 512 + 100])))  # cut inside the first payload
    with pytest.raises(tarfile.ReadError, match="truncated tar header"):
        list(iter_tar_members(io.BytesIO(blob[: 512 + 512 + 200])))  # cut inside the 2nd header
    bad = bytearray(blob)
    bad[1024 + 10] ^= 0xFF  # flip a byte of the second header's name
    got = []
    with pytest.raises(tarfile.ReadError, match="checksum"):
        for member in iter_tar_members(io.BytesIO(bytes(bad))):
            got.append(member)
    assert got == MEMBERS[:1]  # what came before the damage is delivered


def test_stage_matches_webdataset(tmp_path):
    paths = []
    for s in range(2):
        path = tmp_path / f"s-{s}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(5):
                sink.write({"__key__": f"{s}_{i:03d}", "cls": str(i), "png": bytes([i]) * (100 + 300 * i)})
        paths.append(str(path))

    def run(stage):
        return [
            {k: v for k, v in sample.items() if k != "__local_path__"} for sample in stage([{"url": p} for p in paths])
        ]

    ours = run(tar_samples(handler=wds.reraise_exception))
    ref = run(wds.tarfile_to_samples(handler=wds.reraise_exception))
    assert len(ours) == 10 and ours == ref


def test_stage_reports_broken_shard_to_handler_and_goes_on(tmp_path):
    good, cut = tmp_path / "good.tar", tmp_path / "cut.tar"
    with wds.TarWriter(str(good)) as sink:
        for i in range(4):
            sink.write({"__key__": f"k{i}", "cls": str(i), "png": bytes(700)})
    cut.write_bytes(good.read_bytes()[:3000])  # some samples, then the end mid-member
    errors = []
    samples = list(tar_samples(handler=lambda e: errors.append(e) or True)([{"url": str(cut)}, {"url": str(good)}]))
    assert len(errors) == 1 and errors[0].url == str(cut) and str(cut) in str(errors[0])
    keys = [s["__key__"] for s in samples]
    assert keys[-4:] == ["k0", "k1", "k2", "k3"] and 1 <= len(keys) - 4 <= 3
