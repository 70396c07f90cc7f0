"""Streaming loaders over WebDataset shards: a training loader with a fixed per-rank epoch
length, and an exact evaluation loader (every sample once across ranks × workers).

Both are built from webdataset's pipeline stages (``ResampledShards``/``SimpleShardList``,
``url_opener``, ``group_by_keys``, ``shuffle``, ``decode``, ``to_tuple``, ``batched``,
``with_epoch``; tar members are read by the lean :mod:`l2w_dist.data.tarstream`) inside a
small ``IterableDataset`` that knows its rank and DataLoader worker explicitly (wds's
``split_by_node`` reads the rank from the environment / the default process group; taking it
as an argument lets one process simulate many ranks in tests and lets the trainer use
sub-groups).

Training (see docs/data.md, "Resuming"): the epoch has ``num_batches`` batches per rank.
Global batch ``i`` of an epoch is produced by DataLoader worker ``i % W`` as its
``i // W``-th batch; each worker's stream (shard choice, shuffle buffer, augmentation RNG)
is seeded by (seed, epoch, rank, worker role), so the epoch is a pure function of
(spec, seed, epoch, rank, world_size, num_workers, batch_size) and
``set_epoch(e, start_batch=k)`` reproduces batches k.. of epoch e without producing 0..k-1.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.transforms.functional import pil_to_tensor

from l2w_dist.data.tarstream import tar_samples
from l2w_dist.data.transforms import uint8_normalization

log = logging.getLogger("l2w_dist.data")

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "ppm", "bmp")
IMAGE_KEYS = ";".join(IMAGE_EXTS)
SPLIT_ALIASES = {"test": ("test", "val"), "val": ("val", "test")}


class BadDataError(RuntimeError):
    """Too many corrupt samples or unreadable shards: the data, not the code, is broken."""


# ----------------------------------------------------------------------- spec
def _is_remote(url: str) -> bool:
    return url.startswith("pipe:") or "://" in url


def load_spec(spec: str | os.PathLike | dict) -> dict:
    """Read a sidecar (path or dict) and resolve each split's shard list to URLs.

    ``splits[name]["shards"]`` may be a list or a brace pattern string
    (``"/data/in-train-{000000..000127}.tar"``); relative local paths are resolved against the
    sidecar's folder (or ``spec["base_dir"]`` for a dict); ``pipe:`` commands and URLs
    (object stores: ``pipe:aws s3 cp s3://bucket/x.tar -``) are passed through.
    """
    if isinstance(spec, dict):
        side = json.loads(json.dumps(spec))
        base = Path(side.get("base_dir", "."))
    else:
        path = Path(spec)
        if not path.exists():
            raise FileNotFoundError(f"dataset sidecar not found: {path}")
        side = json.loads(path.read_text())
        base = path.parent
    if "splits" not in side:
        raise ValueError(f"dataset spec has no 'splits' (keys: {sorted(side)})")
    for name, split in side["splits"].items():
        shards = split["shards"]
        urls = wds.shardlists.expand_urls(shards) if isinstance(shards, str) else list(shards)
        split["urls"] = [u if _is_remote(u) or os.path.isabs(u) else str(base / u) for u in urls]
        if not split["urls"]:
            raise ValueError(f"split {name!r} lists no shards")
    return side


def _split_urls(side: dict, split: str) -> tuple[list[str], list[int] | None, int | None]:
    """(urls, per-shard counts or None, total count or None) of a split; missing local shards
    fail here, at start, naming the path."""
    names = SPLIT_ALIASES.get(split, (split,))
    found = next((n for n in names if n in side["splits"]), None)
    if found is None:
        raise ValueError(f"split {split!r} not in the dataset spec; available: {', '.join(side['splits'])}")
    entry = side["splits"][found]
    for url in entry["urls"]:
        if not _is_remote(url) and not os.path.exists(url):
            raise FileNotFoundError(f"shard of split {found!r} not found: {url}")
    counts = entry.get("shard_counts")
    if counts is not None and len(counts) != len(entry["urls"]):
        counts = None
    return entry["urls"], counts, entry.get("count")


def split_count(side: dict, split: str) -> int | None:
    """The sample count of ``split`` of a loaded spec (None when the sidecar gives none), after
    checking that its local shards exist and can be read: a run checks its data before any work."""
    urls, counts, count = _split_urls(side, split)
    for url in urls:
        if not _is_remote(url) and not os.access(url, os.R_OK):
            raise PermissionError(f"shard of split {split!r} cannot be read: {url}")
    return count if count is not None else (sum(counts) if counts is not None else None)


# ------------------------------------------------------------------ bad data
class BadDataGuard:
    """wds exception handler that skips bad data with a warning, counts the samples it cost,
    and raises :class:`BadDataError` once ``lost > max_bad_fraction * max(read, warmup)``.

    A corrupt sample costs one; a damaged or unreadable shard costs every sample the sidecar
    says it held and did not deliver (``ShardDamage.samples_lost``; without the sidecar's
    per-shard counts, one per damaged stretch). ``seen`` counts the samples read from the
    tars plus those lost unread (per DataLoader worker: the guard lives in the worker that
    reads). ``warmup`` keeps the first few failures from stopping a run on a fraction
    computed over a handful of samples.
    """

    FLUSH_EVERY = 256  # samples between updates of the shared totals (a shared-tensor add costs µs)

    def __init__(
        self, max_bad_fraction: float = 0.01, warmup: int = 1000, where: str = "", totals: torch.Tensor | None = None
    ):
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        self.max_bad_fraction, self.warmup, self.where = max_bad_fraction, warmup, where
        self.seen = 0
        self.bad = 0
        self.totals = totals  # shared [read, lost] across DataLoader workers (the loader's bad_data())
        self._unflushed_seen = 0

    def _flush(self, bad: int = 0) -> None:
        if self.totals is not None and (self._unflushed_seen or bad):
            self.totals.add_(torch.tensor([self._unflushed_seen, bad]))
        self._unflushed_seen = 0

    def count(self, src: Iterator) -> Iterator:
        try:
            for sample in src:
                self.seen += 1
                self._unflushed_seen += 1
                if self._unflushed_seen >= self.FLUSH_EVERY:
                    self._flush()
                yield sample
        finally:  # also when the epoch cut (with_epoch) closes the stream early
            self._flush()

    def __call__(self, exn: Exception) -> bool:
        lost = getattr(exn, "samples_lost", 1)
        if getattr(exn, "unread", False):  # samples never read: part of the data the run went through
            self.seen += lost
            self._unflushed_seen += lost
        self.bad += lost
        self._flush(bad=lost)
        log.warning("%s: skipping bad data (%d samples lost of %d): %s", self.where, self.bad, self.seen, exn)
        if self.bad > self.max_bad_fraction * max(self.seen, self.warmup):
            raise BadDataError(
                f"{self.where}: {self.bad} samples lost out of {self.seen} exceeds "
                f"max_bad_fraction={self.max_bad_fraction} (warmup {self.warmup}); last error: {exn!r}"
            ) from exn
        return True


# ------------------------------------------------------------- small stages
def _seed_of(*parts: int) -> int:
    """A 32-bit seed from integers, stable across processes (splitmix64 steps, cheap
    enough to run per sample)."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 29)) & 0xFFFFFFFF


def _decode_rgb(key: str, data: bytes) -> Image.Image | None:
    """Decode an image to RGB, fully (so a truncated file fails here, inside the bad-data
    handler) and without the extra copy of PIL's convert() when it is RGB already."""
    ext = key.rsplit(".", 1)[-1].lower()
    if ext not in IMAGE_EXTS:
        return None
    image = Image.open(io.BytesIO(data))
    image.load()
    return image if image.mode == "RGB" else image.convert("RGB")


def _every(stride: int, offset: int) -> Callable[[Iterator], Iterator]:
    def stage(src: Iterator) -> Iterator:
        for i, sample in enumerate(src):
            if i % stride == offset:
                yield sample

    return stage


class _Skip:
    """Drop the first n raw samples once (before decoding: resuming costs reading, not decoding)."""

    def __init__(self, n: int):
        self.left = n

    def __call__(self, src: Iterator) -> Iterator:
        for sample in src:
            if self.left > 0:
                self.left -= 1
                continue
            yield sample


class _SeededTransform:
    """Apply the transform with torch/python RNGs seeded per sample from (stream seed, index),
    so a sample's augmentation does not depend on what was decoded before it (exact resume).
    No transform: the image as a uint8 tensor [C, H, W]."""

    def __init__(self, transform: Callable | None, seed: int, start: int = 0):
        self.transform, self.seed, self.index = transform, seed, start

    def __call__(self, src: Iterator) -> Iterator:
        for image, label in src:
            if self.transform is None:
                image = pil_to_tensor(image)
            else:
                s = _seed_of(self.seed, self.index)
                torch.default_generator.manual_seed(s)  # CPU only: torch.manual_seed also queues
                random.seed(s)  # lazy CUDA/XPU/MTIA seeding with a stack trace (costly per sample)
                image = self.transform(image)
            self.index += 1
            yield image, label


def _collate(
    channels_last: bool, normalize: tuple[Sequence[float], Sequence[float]] | None = None
) -> Callable[[list], tuple[torch.Tensor, torch.Tensor]]:
    """Stack a batch; inside a DataLoader worker, straight into shared memory (as torch's
    default_collate does) so handing the batch to the main process costs no extra copy.

    ``normalize=(mean, std)``: the samples are uint8 images and each is converted and
    normalised while it is written into its slot of the float32 batch — one read of the
    uint8 image and two in-cache passes over the slot, instead of ToTensor + Normalize's
    five passes and three allocations per image followed by the copy into the batch.
    """
    shift, scale = uint8_normalization(*normalize) if normalize is not None else (None, None)

    def collate(samples: list) -> tuple[torch.Tensor, torch.Tensor]:
        first = samples[0][0]
        b = len(samples)
        if shift is not None and first.dtype != torch.uint8:
            raise TypeError(
                f"the loader normalises uint8 images, but the transform gave {first.dtype}: "
                "build it with build_transforms(..., normalize=False)"
            )
        proto = first.new_empty(0, dtype=torch.float32 if shift is not None else first.dtype)
        if get_worker_info() is not None:
            storage = proto._typed_storage()._new_shared(b * first.numel(), device=first.device)
            flat = proto.new(storage)
        else:
            flat = proto.new_empty(b * first.numel())
        if channels_last and first.dim() == 3:
            c, h, w = first.shape
            images = flat.view(b, h, w, c).permute(0, 3, 1, 2)  # NCHW view with NHWC memory
        else:
            images = flat.view(b, *first.shape)
        for i, sample in enumerate(samples):
            slot = images[i]
            slot.copy_(sample[0])
            if shift is not None:
                slot.sub_(shift).mul_(scale)
        return images, torch.tensor([int(s[1]) for s in samples], dtype=torch.long)

    return collate


def partition(n_items: int, parts: int, index: int) -> tuple[slice, int, int]:
    """Which shards and which samples within them belong to part ``index`` of ``parts``.

    Returns ``(shard_slice, stride, offset)``: the part reads ``urls[shard_slice]`` and keeps
    the samples whose position in that stream is ``offset`` mod ``stride``. Whole shards are
    split when there are at least as many shards as parts (no wasted reading); otherwise every
    part reads all shards and keeps every ``parts``-th sample (small eval sets).
    """
    if n_items >= parts:
        return slice(index, None, parts), 1, 0
    return slice(None), parts, index


def _nested_partition(n: int, rank: int, world: int, worker: int, workers: int) -> tuple[list[int], int, int]:
    """Shard indices + (stride, offset) for (rank, worker): rank level first, then workers."""
    idx = list(range(n))
    sl, s1, o1 = partition(n, world, rank)
    idx = idx[sl]
    if s1 == 1:
        sl, s2, o2 = partition(len(idx), workers, worker)
        return idx[sl], s2, o2
    return idx, s1 * workers, o1 + s1 * worker


# --------------------------------------------------------------- the streams
class _Stream(IterableDataset):
    """One rank's sample stream; each DataLoader worker builds its own wds pipeline."""

    def __init__(self, **cfg: Any):
        super().__init__()
        self.cfg = cfg
        # [samples read, samples lost] over all workers and epochs: shared memory, so the
        # workers' guards (forked or spawned) add to the tensor the main process reads
        self.data_totals = torch.zeros(2, dtype=torch.int64).share_memory_()

    def __iter__(self) -> Iterator:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        build = self._train if self.cfg["mode"] == "train" else self._eval
        return iter(build(worker, workers))

    def _guard(self, role: int) -> BadDataGuard:
        c = self.cfg
        where = f"{c['name']} rank {c['rank']} worker {role}"
        return BadDataGuard(c["max_bad_fraction"], c["bad_warmup"], where, totals=self.data_totals)

    def _decode_stages(self, guard: BadDataGuard) -> list:
        return [wds.decode(_decode_rgb, handler=guard), wds.to_tuple(IMAGE_KEYS, "cls", handler=guard)]

    def _train(self, worker: int, workers: int) -> wds.DataPipeline | list:
        c = self.cfg
        role = (worker + c["start_batch"]) % workers  # see module docstring: resume keeps i -> i % W
        n_role = c["num_batches"] // workers + (role < c["num_batches"] % workers)
        skip = c["start_batch"] // workers + (role < c["start_batch"] % workers)
        seed = _seed_of(c["seed"], c["epoch"], c["rank"], role)
        guard = self._guard(role)
        urls = c["urls"]
        if c["resampled"]:
            source = wds.ResampledShards(urls, seed=seed, deterministic=True, worker_seed=lambda: 0)
            sample_filter = []
        else:  # one shuffled pass over this rank's partition, cycled until the epoch is full
            order = list(range(len(urls)))
            random.Random(_seed_of(c["seed"], c["epoch"])).shuffle(order)
            mine, stride, offset = _nested_partition(len(urls), c["rank"], c["world_size"], role, workers)
            source = wds.SimpleShardList([urls[order[i]] for i in mine], seed=seed)
            sample_filter = [_every(stride, offset)] if stride > 1 else []
        bs = c["batch_size"]
        pipe = wds.DataPipeline(
            source,
            tar_samples(handler=guard, expected=c["shard_counts"]),
            guard.count,
            *sample_filter,
            wds.shuffle(c["shuffle_buffer"], initial=c["shuffle_buffer"], rng=random.Random(seed)),
            _Skip(skip * bs),
            *self._decode_stages(guard),
            _SeededTransform(c["transform"], seed, start=skip * bs),
            wds.batched(bs, collation_fn=_collate(c["channels_last"], c["normalize"]), partial=False),
        )
        if n_role - skip <= 0:  # with_epoch(0) would mean "unbounded": this worker has nothing left
            return []
        return pipe.with_epoch(nbatches=n_role - skip)

    def _eval(self, worker: int, workers: int) -> wds.DataPipeline:
        c = self.cfg
        mine, stride, offset = _nested_partition(len(c["urls"]), c["rank"], c["world_size"], worker, workers)
        guard = self._guard(worker)
        return wds.DataPipeline(
            wds.SimpleShardList([c["urls"][i] for i in mine]),
            tar_samples(handler=guard, expected=c["shard_counts"]),
            guard.count,
            *([_every(stride, offset)] if stride > 1 else []),
            *self._decode_stages(guard),
            wds.map_tuple(c["transform"] or pil_to_tensor, int),
            wds.batched(c["batch_size"], collation_fn=_collate(c["channels_last"], c["normalize"]), partial=True),
        )


class _Loader:
    """Shared plumbing: a fresh DataLoader per iteration (workers see the current epoch)."""

    def __init__(self, stream: _Stream, num_workers: int, pin_memory: bool, prefetch_factor: int | None):
        self.stream, self.num_workers, self.pin_memory = stream, num_workers, pin_memory
        self.prefetch_factor = prefetch_factor

    def bad_data(self) -> tuple[int, int]:
        """``(lost, read)``: samples lost to bad data (corrupt samples, and the samples a
        damaged shard did not deliver) and samples this rank's loader went through (read, or
        lost unread), summed over its DataLoader workers and all epochs so far (a worker's
        count arrives every 256 samples and when it stops)."""
        seen, bad = self.stream.data_totals.tolist()
        return bad, seen

    def _dataloader(self) -> DataLoader:
        kw = {}
        if self.num_workers > 0 and self.prefetch_factor:
            kw["prefetch_factor"] = self.prefetch_factor
        return DataLoader(self.stream, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory, **kw)


class TrainLoader(_Loader):
    """Iterable of ``(images [B,C,H,W] float, labels [B] long)``, ``num_batches`` per epoch on
    every rank. ``set_epoch(e, start_batch=k)`` selects the next iteration's epoch (and resume
    point); without a call, each new iteration moves on to the next epoch."""

    def __init__(self, stream: _Stream, num_workers: int, pin_memory: bool, prefetch_factor: int | None):
        super().__init__(stream, num_workers, pin_memory, prefetch_factor)
        self._next_epoch, self._start_batch = 0, 0

    @property
    def num_batches(self) -> int:
        return self.stream.cfg["num_batches"]

    def __len__(self) -> int:
        return self.num_batches

    @property
    def epoch(self) -> int:
        """The epoch the next iteration will produce."""
        return self._next_epoch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if not 0 <= start_batch <= self.num_batches:
            raise ValueError(f"start_batch must be in [0, {self.num_batches}], got {start_batch}")
        self._next_epoch, self._start_batch = int(epoch), int(start_batch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.stream.cfg.update(epoch=self._next_epoch, start_batch=self._start_batch)
        self._next_epoch, self._start_batch = self._next_epoch + 1, 0
        if self.stream.cfg["start_batch"] == self.num_batches:
            return iter(())
        return iter(self._dataloader())


class EvalLoader(_Loader):
    """Iterable of ``(images, labels)``; across ranks × workers every sample exactly once, in a
    deterministic order for a given (world_size, num_workers). Ranks may get different
    numbers of batches: gather predictions after the loop, not per batch."""

    def __init__(self, stream: _Stream, num_workers: int, pin_memory: bool, num_samples: int | None):
        super().__init__(stream, num_workers, pin_memory, None)
        self.num_samples = num_samples  # this rank's sample count when the sidecar has shard_counts

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter(self._dataloader())


def _check_rank(rank: int, world_size: int, batch_size: int, num_workers: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")


def build_train_loader(
    spec: str | os.PathLike | dict,
    *,
    batch_size: int,
    rank: int,
    world_size: int,
    num_workers: int,
    transform: Callable | None,
    seed: int,
    epoch_length: int | None = None,
    resampled: bool = True,
    pin_memory: bool = False,
    channels_last: bool = False,
    include_holdout: bool = False,
    shuffle_buffer: int = 1000,
    max_bad_fraction: float = 0.01,
    bad_warmup: int = 1000,
    prefetch_factor: int | None = None,
    normalize: tuple[Sequence[float], Sequence[float]] | None = None,
) -> TrainLoader:
    """The training loader for one rank (``batch_size`` is per rank).

    ``epoch_length``: batches per rank per epoch (default ``count // (world_size*batch_size)``).
    ``resampled=True``: each worker draws shards with replacement (infinite stream, cut to the
    epoch length: uneven shard counts cannot make ranks disagree). ``resampled=False``: each
    rank reads its own partition of a per-epoch shuffled shard list without replacement,
    cycling if the epoch is longer. ``include_holdout=True`` also trains on the held-out split
    (the released code's behaviour: no clean calibration data then). ``normalize=(mean, std)``:
    ``transform`` yields uint8 images (``build_transforms(..., normalize=False)``) and the
    batch is normalised to float32 as it is assembled (the same values as the transform's own
    normalisation to ~1e-7, fewer passes over each image).
    """
    _check_rank(rank, world_size, batch_size, num_workers)
    side = load_spec(spec)
    urls, counts, count = _split_urls(side, "train")
    shard_counts = dict(zip(urls, counts)) if counts is not None else {}
    if include_holdout:
        h_urls, h_counts, h_count = _split_urls(side, "holdout")
        urls = urls + h_urls
        count = None if count is None or h_count is None else count + h_count
        shard_counts.update(zip(h_urls, h_counts) if h_counts is not None else {})
    if epoch_length is None:
        if not count:
            raise ValueError("the spec has no sample count for 'train'; pass epoch_length")
        epoch_length = count // (world_size * batch_size)
    if epoch_length < 1:
        raise ValueError(
            f"epoch of {epoch_length} batches: {count} samples < world_size {world_size} × batch {batch_size}"
        )
    stream = _Stream(
        mode="train",
        name="train",
        urls=urls,
        rank=rank,
        world_size=world_size,
        batch_size=batch_size,
        transform=transform,
        seed=seed,
        num_batches=epoch_length,
        resampled=resampled,
        channels_last=channels_last,
        normalize=normalize,
        shuffle_buffer=shuffle_buffer,
        max_bad_fraction=max_bad_fraction,
        bad_warmup=bad_warmup,
        shard_counts=shard_counts,
        epoch=0,
        start_batch=0,
    )
    return TrainLoader(stream, num_workers, pin_memory, prefetch_factor)


def build_eval_loader(
    spec: str | os.PathLike | dict,
    split: str,
    *,
    batch_size: int,
    rank: int,
    world_size: int,
    num_workers: int,
    transform: Callable | None,
    pin_memory: bool = False,
    channels_last: bool = False,
    max_bad_fraction: float = 0.01,
    bad_warmup: int = 1000,
    normalize: tuple[Sequence[float], Sequence[float]] | None = None,
) -> EvalLoader:
    """Exact loader for ``split`` ("holdout", "test"/"val", or "train" for the released
    calibration-on-training-images option, then with a train transform); ``normalize`` as
    in :func:`build_train_loader`."""
    _check_rank(rank, world_size, batch_size, num_workers)
    side = load_spec(spec)
    urls, counts, _count = _split_urls(side, split)
    num_samples = None
    if counts is not None:
        workers = max(num_workers, 1)
        num_samples = 0
        for w in range(workers):
            mine, stride, offset = _nested_partition(len(urls), rank, world_size, w, workers)
            n = sum(counts[i] for i in mine)
            num_samples += len(range(offset, n, stride))
    stream = _Stream(
        mode="eval",
        name=split,
        urls=urls,
        rank=rank,
        world_size=world_size,
        batch_size=batch_size,
        transform=transform,
        channels_last=channels_last,
        normalize=normalize,
        max_bad_fraction=max_bad_fraction,
        bad_warmup=bad_warmup,
        shard_counts=dict(zip(urls, counts)) if counts is not None else {},
    )
    return EvalLoader(stream, num_workers, pin_memory, num_samples)
