"""Atomic, durable file writes: a crash or a kill at any moment leaves the old file or the new one.

The data goes to a temporary file in the target's folder, is flushed and fsynced, then
``os.replace``d over the target, and the folder is fsynced so the rename itself survives a
power loss. Every file l2w_dist writes for later reading (checkpoints, eval.json, launcher
state) goes through :func:`atomic_write`.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

# mkstemp creates 0600 files; the written file gets the permissions open() would give it.
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """``with atomic_write(path) as f: f.write(...)``: ``path`` appears whole or not at all.

    ``mode`` is ``"wb"`` or ``"w"``. On an exception inside the block the temporary file is
    removed and ``path`` is left as it was.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write mode={mode!r}; expected 'wb' or 'w'")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~_UMASK)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: str | os.PathLike, data: Any, indent: int | None = 1) -> Path:
    """``json.dump`` through :func:`atomic_write` (a trailing newline included)."""
    with atomic_write(path, "w") as f:
        json.dump(data, f, indent=indent)
        f.write("\n")
    return Path(path)


def _fsync_dir(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
