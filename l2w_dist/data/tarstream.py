"""A lean reader for WebDataset tar streams: the ``tarfile_to_samples`` stage with the
per-member cost of Python's ``tarfile`` taken out.

Why: ``tarfile.open(mode="r|*")`` parses every header field (mode, uid, mtime, …) into a
``TarInfo`` and reads through a buffering ``_Stream`` in small chunks: a noticeable share
of the whole per-image cost (JPEG decode + RandomResizedCrop) of an ImageNet training
loader, which made the shard loader slower than ImageFolder's one-file-per-image reads
(bench/loader.py; figures in docs/benchmarks/data.md). Here a header is one 512-byte read, a
checksum and two slices; the member is one read.

Handled: ustar/GNU/POSIX-pax uncompressed archives (the formats ``webdataset.TarWriter``
and GNU tar write), long names by GNU ``L`` or pax ``path`` records, directories and links
skipped. A stream that does not start with a tar header (gzip/bz2/xz shards) goes through
``webdataset``'s own ``tarfile`` path unchanged. Truncated members raise ``tarfile.ReadError``.
A header with a bad checksum raises too, unless the caller asks to resynchronise: then the
reader scans on, block by block, to the next valid ustar header (a zero block followed by a
valid header is damage too, not the end), reports what it skipped and goes on.

Accounting: :func:`tar_expander` counts the samples (keys) each shard delivered; when the
sidecar says how many the shard holds, every sample missing from it is reported to the
bad-data handler as lost (:class:`ShardDamage`), so a damaged shard costs its real count,
not one event.

The surrounding stages are webdataset's own: ``url_opener`` before, ``group_by_keys`` after.
"""

from __future__ import annotations

import logging
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, BinaryIO

from webdataset import tariterators

log = logging.getLogger("l2w_dist.data")

BLOCK = 512
_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")  # gzip, bzip2, xz magic
_SKIP_META = re.compile(r"__[^/]*__($|/)")  # webdataset's default: keys like __index__ are metadata
_REGULAR = (b"0", b"\0", b"7")  # regular file, old-style regular file, contiguous file


def _number(field: bytes) -> int:
    """A numeric header field: octal text, or GNU base-256 (high bit set) for huge values."""
    if field and field[0] & 0x80:
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * (len(field) - 1))) if field[0] & 0x40 else value
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _checksum_ok(header: bytes) -> bool:
    stored = _number(header[148:156])
    unsigned = sum(header[:148]) + 8 * 32 + sum(header[156:])  # chksum field counted as spaces
    return stored == unsigned


def _pax_path(records: bytes) -> str | None:
    """The ``path`` record of a pax extended header ("<len> path=<value>\\n" records)."""
    pos = 0
    while pos < len(records):
        space = records.index(b" ", pos)
        length = int(records[pos:space])
        key, _, value = records[space + 1 : pos + length - 1].partition(b"=")
        if key == b"path":
            return value.decode("utf-8")
        pos += length
    return None


class _Prepend:
    """A read()-able stream that first returns ``head``: hands a peeked-at stream back intact."""

    def __init__(self, head: bytes, stream: BinaryIO):
        self.head, self.stream = head, stream

    def read(self, n: int = -1) -> bytes:
        if not self.head:
            return self.stream.read(n)
        if n is None or n < 0:
            out, self.head = self.head + self.stream.read(), b""
            return out
        out, self.head = self.head[:n], self.head[n:]
        if len(out) < n:
            out += self.stream.read(n - len(out))
        return out


def _read_exact(stream: BinaryIO, n: int, what: str) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise tarfile.ReadError(f"unexpected end of tar stream in {what} ({len(data)} of {n} bytes)")
    return data


class ShardDamage(tarfile.ReadError):
    """Samples of one shard lost to damage: ``samples_lost`` of them (never read, so the
    bad-data handler counts them among the samples read as well as among the lost)."""

    def __init__(self, url: str, samples_lost: int, what: str):
        super().__init__(f"{url}: {samples_lost} samples lost ({what})")
        self.url, self.samples_lost, self.what = url, samples_lost, what
        self.unread = True


def _valid_header(block: bytes) -> bool:
    return len(block) == BLOCK and block[257:262] == b"ustar" and _checksum_ok(block)


def _resync(stream: BinaryIO, pos: int) -> tuple[bytes, int]:
    """The next valid ustar header at or after block offset ``pos`` and its offset, or
    ``(b"", offset of the end)`` when the stream has none."""
    while True:
        block = stream.read(BLOCK)
        if len(block) < BLOCK:
            return b"", pos + len(block)
        if _valid_header(block):
            return block, pos
        pos += BLOCK


def iter_tar_members(stream: BinaryIO, on_damage: Callable[[str], None] | None = None) -> Iterator[tuple[str, bytes]]:
    """``(name, data)`` of each regular file of a tar stream, in order; metadata keys
    (``__…__``), directories and links are skipped. Compressed streams are delegated to
    ``tarfile``.

    ``on_damage``: resynchronise after a corrupt header at the next valid one, calling
    ``on_damage(what)`` for each damaged stretch; without it a corrupt header raises
    ``tarfile.ReadError``."""
    header = stream.read(BLOCK)
    pos = 0  # offset of ``header`` in the stream
    if header and header != bytes(BLOCK) and not (len(header) == BLOCK and _checksum_ok(header)):
        if on_damage is None or header.startswith(_COMPRESSED):
            # not an uncompressed tar: let tarfile detect gzip/bz2/xz (and report what it is not)
            for member in tariterators.tar_file_iterator(_Prepend(header, stream)):
                yield member["fname"], member["data"]
            return
    long_name: str | None = None
    while True:
        if len(header) < BLOCK:
            if not header:
                return  # end of stream without the two zero blocks: tolerated, as tarfile does
            raise tarfile.ReadError(f"truncated tar header ({len(header)} of {BLOCK} bytes)")
        if header == bytes(BLOCK):
            if on_damage is None:
                return  # end-of-archive marker
            following, at = _resync(stream, pos + BLOCK)
            if not following:
                return  # zero blocks to the end: the end-of-archive marker
            on_damage(f"zero block at byte {pos} inside the archive; resynchronised at byte {at}")
            header, pos, long_name = following, at, None
            continue
        if not _checksum_ok(header):
            if on_damage is None:
                raise tarfile.ReadError("bad tar header checksum (corrupt or not a tar)")
            bad_at = pos
            header, pos = _resync(stream, pos + BLOCK)
            found = f"resynchronised at byte {pos}" if header else "no valid header after it"
            on_damage(f"corrupt tar header at byte {bad_at}; {found}")
            long_name = None  # a long name before the damage belonged to a member lost in it
            if not header:
                return
            continue
        size = _number(header[124:136])
        kind = header[156:157]
        data = _read_exact(stream, size, "a member") if size else b""
        if size % BLOCK:
            _read_exact(stream, BLOCK - size % BLOCK, "member padding")
        pos += BLOCK + -(-size // BLOCK) * BLOCK
        if kind == b"L":  # GNU long name of the next member
            long_name = data.rstrip(b"\0").decode("utf-8")
        elif kind == b"x":  # pax extended header of the next member
            long_name = _pax_path(data) or long_name
        elif kind == b"g":  # pax global header: no per-member name
            pass
        else:
            if long_name is not None:
                name, long_name = long_name, None
            else:
                name = header[:100].split(b"\0", 1)[0].decode("utf-8")
                if header[257:262] == b"ustar" and header[345] != 0:
                    name = header[345:500].split(b"\0", 1)[0].decode("utf-8") + "/" + name
            if kind in _REGULAR and not _SKIP_META.match(name):
                yield name, data
        header = stream.read(BLOCK)


def tar_expander(
    data: Iterable[dict[str, Any]],
    handler: Callable[[Exception], bool],
    expected: Mapping[str, int] | None = None,
) -> Iterator[dict[str, Any]]:
    """webdataset's ``tar_file_expander`` contract (file dicts with ``__url__``, an empty dict
    after each shard), over :func:`iter_tar_members`, resynchronising after corrupt headers.

    A damaged shard calls ``handler`` once, after its readable members were yielded, with a
    :class:`ShardDamage` whose ``samples_lost`` is the shard's sample count in ``expected``
    (url -> samples, from the sidecar) minus the samples it delivered; without a count, one
    per damaged stretch. The end-of-shard marker still follows, so a half-read sample is not
    glued to the next shard's first."""
    for source in data:
        url = source["url"]
        damage: list[str] = []
        delivered, last_key = 0, None
        try:
            for name, payload in iter_tar_members(source["stream"], on_damage=damage.append):
                key = tariterators.base_plus_ext(name)[0]
                if key is not None and key != last_key:
                    delivered, last_key = delivered + 1, key
                yield {"fname": name, "data": payload, "__url__": url}
        except Exception as exn:  # noqa: BLE001 - reported below, with the count of what it cost
            damage.append(f"{type(exn).__name__}: {' '.join(str(a) for a in exn.args)}")
        count = expected.get(url) if expected else None
        lost = count - delivered if count is not None else len(damage)
        if lost <= 0:
            if damage:
                log.warning("%s: damaged but every sample was recovered: %s", url, "; ".join(damage))
            yield {}
            continue
        what = "; ".join(damage) or "the shard ended early"
        if count is not None:
            what += f"; {delivered} of the {count} samples the sidecar lists were read"
        if not handler(ShardDamage(url, lost, what)):
            break
        yield {}


def tar_samples(
    handler: Callable[[Exception], bool], expected: Mapping[str, int] | None = None
) -> Callable[[Iterable[dict]], Iterator[dict]]:
    """Pipeline stage: shard URLs -> samples (``{"__key__", "__url__", ext: bytes, …}``).
    ``expected``: samples per shard URL (the sidecar's ``shard_counts``) for the accounting
    of damaged and unreadable shards."""

    def unopened(exn: Exception) -> bool:  # a shard that cannot be opened loses all its samples
        url = exn.args[-1] if exn.args else None
        if expected and url in expected:
            exn = ShardDamage(url, expected[url], f"cannot open it: {exn}")
        return handler(exn)

    def stage(src: Iterable[dict]) -> Iterator[dict]:
        streams = tariterators.url_opener(src, handler=unopened)
        return tariterators.group_by_keys(tar_expander(streams, handler, expected), handler=handler)

    return stage
