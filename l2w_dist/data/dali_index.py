"""Index files that let DALI's webdataset reader open a shard without scanning it.

``fn.readers.webdataset`` reads each tar through an index (``<shard>.idx``, DALI's text
format ``v1.2``): a header line ``v1.2 <samples>`` then one line per sample listing, for
each component, ``<ext> <data offset> <size> <member name>``. Without one the reader walks
every tar at start-up. ``tools/make_shards.py`` writes the index beside each shard;
:func:`ensure_index` builds a missing or stale one on first use (atomically, so ranks that
race write the same bytes and none reads half a file).

The index lists only *complete* samples: an image member and a ``.cls`` member, both
inside the file. A truncated shard (the tail cut off) or a sample missing a component is
indexed up to the damage; the samples lost are the sidecar's count minus the index's,
which the DALI loader counts like the torch loader's skipped samples. A sample found
corrupt while decoding is removed from its shard's index the same way
(:func:`drop_from_index`).

Pure Python, no DALI import: the shard writer uses it whether or not DALI is installed.
The tar walk is the standard library's (``tarfile`` in seekable mode reads the headers and
seeks over the data), not DALI's ``wds2idx`` tool, which needs DALI installed, runs GNU
``tar`` twice per shard and writes the index in place.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..utils import atomic_write

INDEX_VERSION = "v1.2"
BLOCK = 512
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "ppm", "bmp")


@dataclass(frozen=True)
class Component:
    ext: str
    offset: int
    size: int
    name: str


@dataclass(frozen=True)
class ShardIndex:
    """A shard's readable samples (each a tuple of components) and what the walk found."""

    tar: Path
    samples: tuple[tuple[Component, ...], ...]
    damaged: str = ""  # why the walk stopped early or dropped samples ("" when the shard is whole)

    def __len__(self) -> int:
        return len(self.samples)


def index_path(tar: str | os.PathLike) -> Path:
    """Where a shard's index lives: beside it, ``x.tar`` -> ``x.idx`` (DALI's ``wds2idx`` name)."""
    tar = Path(tar)
    return tar.with_suffix(".idx") if tar.suffix == ".tar" else tar.with_name(tar.name + ".idx")


def _split_name(name: str) -> tuple[str, str]:
    """webdataset's rule: the key ends at the first dot of the last path component."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1 :])


def _complete(components: list[Component]) -> bool:
    exts = {c.ext.lower() for c in components}
    return "cls" in exts and any(e in exts for e in IMAGE_EXTS)


def _zero_block_at(tar: Path, offset: int) -> bool:
    with open(tar, "rb") as f:
        f.seek(offset)
        block = f.read(BLOCK)
    return len(block) == BLOCK and not any(block)


def scan_shard(tar: str | os.PathLike) -> ShardIndex:
    """Walk a tar's headers (no member data is read) and keep its complete samples."""
    tar = Path(tar)
    size = tar.stat().st_size
    groups: list[list[Component]] = []
    last_key = None
    damaged = ""
    try:
        with tarfile.open(tar, mode="r:") as archive:
            for member in archive:
                if not member.isreg():
                    continue
                key, ext = _split_name(member.name)
                base = key.rsplit("/", 1)[-1]
                if not base or base.startswith(".") or (base.startswith("__") and base.endswith("__")):
                    continue
                if member.offset_data + member.size > size:
                    damaged = f"member {member.name} ends past the end of the file (truncated shard)"
                    break
                comp = Component(ext, member.offset_data, member.size, member.name)
                if key != last_key:
                    groups.append([comp])
                    last_key = key
                else:
                    groups[-1].append(comp)
            end = archive.offset  # where the end-of-archive zero blocks should start
        if not damaged and not _zero_block_at(tar, end):  # tarfile stops silently at a cut-off header
            damaged = f"no end-of-archive marker at byte {end} (truncated shard)"
    except tarfile.TarError as exn:  # a bad header: keep the samples before it
        damaged = f"unreadable tar ({exn})"
    complete = [tuple(g) for g in groups if _complete(g)]
    if len(complete) < len(groups) and not damaged:
        damaged = f"{len(groups) - len(complete)} samples without an image or a .cls member"
    return ShardIndex(tar, tuple(complete), damaged)


def format_index(samples: Iterable[Sequence[Component]]) -> str:
    samples = list(samples)
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    lines += [" ".join(f"{c.ext} {c.offset} {c.size} {c.name}" for c in s) for s in samples]
    return "\n".join(lines) + "\n"


def write_index(tar: str | os.PathLike, index: ShardIndex | None = None) -> ShardIndex:
    """Write ``tar``'s index beside it (atomically); returns what was indexed."""
    index = index if index is not None else scan_shard(tar)
    with atomic_write(index_path(tar), "w") as f:
        f.write(format_index(index.samples))
    return index


def read_index(tar: str | os.PathLike) -> ShardIndex | None:
    """The index beside ``tar`` if it is usable: newer than the tar, well formed, and every
    component inside the file (an index written before the shard was cut short is stale)."""
    tar, idx = Path(tar), index_path(tar)
    try:
        if idx.stat().st_mtime_ns < tar.stat().st_mtime_ns:
            return None
        size = tar.stat().st_size
        lines = idx.read_text().splitlines()
        version, count = lines[0].split()
        if version != INDEX_VERSION or int(count) != len(lines) - 1:
            return None
        samples = []
        for line in lines[1:]:
            f = line.split(" ")
            comps = tuple(Component(f[i], int(f[i + 1]), int(f[i + 2]), f[i + 3]) for i in range(0, len(f), 4))
            if any(c.offset + c.size > size for c in comps):
                return None
            samples.append(comps)
    except (OSError, ValueError, IndexError):
        return None
    return ShardIndex(tar, tuple(samples))


def ensure_index(tar: str | os.PathLike) -> ShardIndex:
    """The shard's index, built and cached beside it when missing or stale."""
    return read_index(tar) or write_index(tar)


def drop_from_index(tar: str | os.PathLike, member: str) -> ShardIndex:
    """Remove the sample holding ``member`` from the shard's index (a sample found corrupt
    while decoding: the reader never returns it again)."""
    index = ensure_index(tar)
    key = _split_name(member)[0]
    kept = tuple(s for s in index.samples if _split_name(s[0].name)[0] != key)
    return write_index(tar, ShardIndex(index.tar, kept, f"corrupt sample {key} dropped"))
