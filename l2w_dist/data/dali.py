"""NVIDIA DALI loaders over the same WebDataset shards (``data.backend: dali``).

DALI's webdataset reader reads the tars through index files (:mod:`.dali_index`), its
decoders run in C++ threads on the CPU (libjpeg-turbo, no GIL) or on the GPU
(``device="mixed"``, nvJPEG, chosen when the loader is given a CUDA device), and the
augmentations follow :mod:`.transforms`' recipes:

- ``imagenet`` train: decode fused with the random-resized crop
  (``fn.decoders.image_random_crop``: area 0.08–1, aspect 3/4–4/3, 10 attempts), bilinear
  resize to ``img_size``, horizontal flip p=0.5; eval: resize the shorter side to
  ``floor(img_size / 0.875)``, centre crop.
- ``cifar`` / ``fashion-mnist``: zero-pad to ``img_size`` (Fashion-MNIST's 28 → 32), train
  adds the ``img_size // 8`` zero-pad random crop and the flip, as one ``fn.slice`` with an
  out-of-bounds anchor.
- Output: uint8, or float32 normalised with the dataset's mean/std (``normalize=``), NCHW or
  channels_last (an NCHW view of NHWC memory, as the torch loader's), labels int64.

The loaders keep :mod:`.loader`'s contract (docs/data.md, "The DALI backend"): per epoch,
each rank reads its own part of a shuffled shard list (DALI's ``shard_id``/``num_shards``
sample split when there are fewer shards than ranks), exactly ``num_batches`` batches,
seeds from (seed, epoch, rank); ``set_epoch(e, start_batch=k)`` replays the epoch's first
``k`` batches (decoded and dropped) and so yields the same batches as the uninterrupted run.
The eval loader gives every readable sample of a split once across ranks.

Bad data: a truncated shard is indexed up to the damage and the samples lost are counted;
a sample DALI cannot decode is found (the failing batch's samples are decoded one by one),
dropped from its shard's index, counted, and the epoch goes on with a fresh stream; the run
stops with :class:`BadDataError` past ``max_bad_fraction``. In an eval pass the corrupt
sample is dropped from the index and the pass stops, naming shard and key.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .dali_index import IMAGE_EXTS, drop_from_index, ensure_index, index_path
from .loader import BadDataError, _is_remote, _seed_of, _split_urls, load_spec
from .transforms import dataset_info

log = logging.getLogger("l2w_dist.data")

INSTALL_HINT = 'pip install -e ".[dali]"  (NVIDIA DALI: nvidia-dali-cuda120)'
LABEL_BYTES = 12  # a .cls member is a decimal label; padded to a fixed width to batch it
IMAGENET_CROP_PCT = 0.875  # timm's eval crop, as build_transforms uses


def dali_available() -> bool:
    """Whether NVIDIA DALI and its PyTorch plugin import."""
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except ImportError:
        return False
    return True


def require_dali() -> None:
    if not dali_available():
        raise ImportError(f"data.backend=dali needs NVIDIA DALI, which is not installed: {INSTALL_HINT}")


# ------------------------------------------------------------------ shards
@dataclass
class _Shards:
    """A split's local shards with their (cached) DALI indexes and the samples each lost."""

    paths: list[str]
    indexes: list[str]
    readable: list[int]
    lost: list[int]

    def pick(self, idx: Sequence[int]) -> _Shards:
        return _Shards(*([getattr(self, f)[i] for i in idx] for f in ("paths", "indexes", "readable", "lost")))


def _shards(urls: list[str], counts: list[int] | None, where: str) -> _Shards:
    paths, indexes, readable, lost = [], [], [], []
    for i, url in enumerate(urls):
        if _is_remote(url):
            raise ValueError(f"data.backend=dali reads local shard files; {where} lists {url!r} (use backend torch)")
        index = ensure_index(url)
        n_lost = max(0, counts[i] - len(index)) if counts is not None else 0
        if n_lost or index.damaged:
            log.warning("%s: shard %s: %d samples unreadable (%s)", where, url, n_lost, index.damaged or "index")
        paths.append(url)
        indexes.append(str(index_path(url)))
        readable.append(len(index))
        lost.append(n_lost)
    return _Shards(paths, indexes, readable, lost)


# ---------------------------------------------------------------- pipelines
@dataclass(frozen=True)
class _Recipe:
    """What one pipeline produces: the dataset's augmentation and the output form."""

    kind: str
    train: bool
    img_size: int
    normalize: tuple[tuple[float, ...], tuple[float, ...]] | None
    channels_last: bool


@dataclass
class _Reader:
    """The reader's arguments: which tars, which part of them, shuffled how."""

    shards: _Shards
    shard_id: int = 0
    num_shards: int = 1
    shuffle: bool = False
    shuffle_buffer: int = 1000
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def op(self):
        from nvidia.dali import fn

        return fn.readers.webdataset(
            paths=self.shards.paths,
            index_paths=self.shards.indexes,
            ext=[";".join(IMAGE_EXTS), "cls"],
            missing_component_behavior="error",
            shard_id=self.shard_id,
            num_shards=self.num_shards,
            stick_to_shard=True,
            random_shuffle=self.shuffle,
            initial_fill=max(1, self.shuffle_buffer),
            seed=self.seed,
            name="reader",
            **self.extra,
        )


def _seed31(*parts: int) -> int:
    return _seed_of(*parts) & 0x7FFFFFFF  # DALI seeds are non-negative int32


def _parity(v):
    return v - 2 * (v // 2)


def _resize_centre_crop(encoded, decoder: str, shorter: int, crop: int):
    """torchvision's Resize(shorter) + CenterCrop(crop) geometry exactly: the long side
    truncated (``int(shorter * long / short)``; DALI's ``resize_shorter`` rounds) and the crop
    offset rounded half to even (Python's ``round``), both from the encoded image's header."""
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, types

    shape = fn.peek_image_shape(encoded, dtype=types.INT32)  # on the CPU, also for GPU decoding
    h, w = shape[0], shape[1]
    short = dmath.min(h, w)
    nh, nw = (shorter * h) // short, (shorter * w) // short
    images = fn.decoders.image(encoded, device=decoder, output_type=types.RGB)
    images = fn.resize(
        images,
        resize_x=fn.cast(nw, dtype=types.FLOAT),
        resize_y=fn.cast(nh, dtype=types.FLOAT),
        interp_type=types.INTERP_LINEAR,
        antialias=True,
    )
    dy, dx = nh - crop, nw - crop
    anchor = fn.stack(dy // 2 + _parity(dy) * _parity(dy // 2), dx // 2 + _parity(dx) * _parity(dx // 2))
    crop_shape = np.array([crop, crop], dtype=np.int32)
    return fn.slice(images, anchor, crop_shape, axis_names="HW", normalized_anchor=False, normalized_shape=False)


def _augment(images, recipe: _Recipe, decoder: str):
    """The recipe's decode + augmentation + output ops (inside a pipeline's graph)."""
    from nvidia.dali import fn, types

    size = recipe.img_size
    if recipe.kind == "imagenet":
        if recipe.train:
            images = fn.decoders.image_random_crop(
                images,
                device=decoder,
                output_type=types.RGB,
                random_area=[0.08, 1.0],
                random_aspect_ratio=[3 / 4, 4 / 3],
                num_attempts=10,
            )
            images = fn.resize(images, size=[size, size], interp_type=types.INTERP_LINEAR, antialias=True)
        else:
            images = _resize_centre_crop(images, decoder, math.floor(size / IMAGENET_CROP_PCT), size)
    else:
        images = fn.decoders.image(images, device=decoder, output_type=types.RGB)
        native = 28 if recipe.kind == "fashion-mnist" else 32
        if size < native or (recipe.kind == "cifar" and size != native):
            images = fn.resize(images, resize_shorter=size, interp_type=types.INTERP_LINEAR, antialias=True)
            native = size
        # CenterCrop's zero padding up to img_size, then RandomCrop(img_size, padding=img_size // 8)
        base = -((size - native) // 2)
        pad = size // 8
        anchor = fn.random.uniform(values=list(range(base - pad, base + pad + 1)), shape=2, dtype=types.INT32)
        images = fn.slice(
            images,
            anchor if recipe.train else np.array([base, base], dtype=np.int32),
            np.array([size, size], dtype=np.int32),
            axis_names="HW",
            normalized_anchor=False,
            normalized_shape=False,
            out_of_bounds_policy="pad",
            fill_values=0,
        )
    kw: dict[str, Any] = {"dtype": types.UINT8}
    if recipe.normalize is not None:
        mean, std = recipe.normalize
        kw = {"dtype": types.FLOAT, "mean": [255 * m for m in mean], "std": [255 * s for s in std]}
    if recipe.train:
        kw["mirror"] = fn.random.coin_flip(probability=0.5)
    return fn.crop_mirror_normalize(images, output_layout="HWC" if recipe.channels_last else "CHW", **kw)


def _pipeline(reader: _Reader, recipe: _Recipe, *, batch_size: int, threads: int, device_id: int | None, seed: int):
    from nvidia.dali import fn
    from nvidia.dali.pipeline import Pipeline

    pipe = Pipeline(batch_size=batch_size, num_threads=threads, device_id=device_id, seed=seed, prefetch_queue_depth=2)
    with pipe:
        images, cls = reader.op()
        decoder = "mixed" if device_id is not None else "cpu"
        pipe.set_outputs(_augment(images, recipe, decoder), fn.pad(cls, axes=(0,), shape=(LABEL_BYTES,), fill_value=0))
    pipe.build()
    return pipe


def _labels(padded: torch.Tensor) -> torch.Tensor:
    """Decimal text labels (``[B, LABEL_BYTES]`` uint8, zero padded) -> int64 ``[B]``."""
    b = padded.to("cpu", torch.int64)
    value = torch.zeros(b.shape[0], dtype=torch.int64)
    for col in b.unbind(1):
        digit = (col >= 48) & (col <= 57)
        value = torch.where(digit, value * 10 + (col - 48), value)
    return value


def _batches(pipe, recipe: _Recipe, eval_pass: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    from nvidia.dali.plugin.base_iterator import LastBatchPolicy
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    kw = {"reader_name": "reader", "last_batch_policy": LastBatchPolicy.PARTIAL} if eval_pass else {}
    for out in DALIGenericIterator(pipe, ["images", "labels"], auto_reset=False, **kw):
        images, labels = out[0]["images"], out[0]["labels"]
        if recipe.channels_last:
            images = images.permute(0, 3, 1, 2)  # NCHW view, NHWC memory
        yield images, _labels(labels)


# ------------------------------------------------------------ bad samples
def _source_infos(reader: _Reader, batch_size: int, first: int, last: int) -> list[str]:
    """``tar:offset:member`` of the samples in batches ``first..last`` of the reader's stream
    (reader only, nothing decoded: the same order as the pipeline that failed)."""
    from nvidia.dali import fn
    from nvidia.dali.pipeline import Pipeline

    pipe = Pipeline(batch_size=batch_size, num_threads=1, device_id=None, seed=0)
    with pipe:
        images, _cls = reader.op()
        pipe.set_outputs(fn.get_property(images, key="source_info"))
    pipe.build()
    infos = []
    for b in range(last + 1):
        try:
            (out,) = pipe.run()
        except StopIteration:
            break
        if b >= first:
            infos += [bytes(np.asarray(out[i])).decode() for i in range(len(out))]
    return infos


def _find_corrupt(reader: _Reader, batch_size: int, first: int, last: int) -> tuple[str, str] | None:
    """The first sample of batches ``first..last`` that DALI's CPU decoder rejects, as
    ``(tar, member)``; None if all decode."""
    from nvidia.dali import fn
    from nvidia.dali.pipeline import Pipeline

    def decoder_pipe():  # synchronous: one fed sample, one run
        pipe = Pipeline(batch_size=1, num_threads=1, device_id=None, seed=0, exec_async=False, exec_pipelined=False)
        with pipe:
            pipe.set_outputs(fn.decoders.image(fn.external_source(name="bytes", dtype=types.UINT8), device="cpu"))
        pipe.build()
        return pipe

    from nvidia.dali import types

    pipe = decoder_pipe()
    for info in _source_infos(reader, batch_size, first, last):
        tar, offset, member = info.split(":", 2)
        size = next(c.size for s in ensure_index(tar).samples for c in s if c.name == member)
        with open(tar, "rb") as f:
            f.seek(int(offset))
            data = np.frombuffer(f.read(size), dtype=np.uint8)
        try:
            pipe.feed_input("bytes", [data])
            pipe.run()
        except Exception:  # noqa: BLE001 - any decoder failure marks the sample
            return tar, member
    return None


# ----------------------------------------------------------------- loaders
class _DaliLoader:
    def __init__(self, *, name: str, rank: int, batch_size: int, threads: int, device_id: int | None, **kw: Any):
        self.name, self.rank, self.batch_size, self.threads, self.device_id = name, rank, batch_size, threads, device_id
        self.max_bad_fraction, self.bad_warmup = kw["max_bad_fraction"], kw["bad_warmup"]
        self._read, self._bad = 0, 0

    @property
    def where(self) -> str:
        return f"{self.name} rank {self.rank} (dali)"

    def bad_data(self) -> tuple[int, int]:
        """``(bad, read)``: samples lost (truncated shards, corrupt images) and samples read by
        this rank's loader over all passes so far."""
        return self._bad, self._read

    def _count_bad(self, n: int, what: str) -> None:
        self._bad += n
        if self._bad > self.max_bad_fraction * max(self._read, self.bad_warmup):
            raise BadDataError(
                f"{self.where}: {self._bad} bad samples out of {self._read} read exceeds "
                f"max_bad_fraction={self.max_bad_fraction} (warmup {self.bad_warmup}); last: {what}"
            )

    def _pipe(self, reader: _Reader, recipe: _Recipe, seed: int):
        kw = {"batch_size": self.batch_size, "threads": self.threads, "device_id": self.device_id}
        return _pipeline(reader, recipe, seed=seed, **kw)

    def _diagnose(self, reader: _Reader, done: int, exn: Exception) -> str:
        """Find the sample that failed after ``done`` good batches, drop it from its shard's
        index and return ``"tar: member"``; re-raise as BadDataError when it cannot be found."""
        found = _find_corrupt(reader, self.batch_size, done, done + 3)  # the pipeline runs ≤ 2 batches ahead
        if found is None:
            raise BadDataError(f"{self.where}: DALI failed and no single corrupt sample was found: {exn}") from exn
        tar, member = found
        drop_from_index(tar, member)
        log.warning("%s: corrupt sample %s in shard %s dropped from its index", self.where, member, tar)
        return f"{tar}: {member}"


class DaliTrainLoader(_DaliLoader):
    """Iterable of ``(images, labels)``, ``num_batches`` per epoch on every rank; the torch
    :class:`~l2w_dist.data.loader.TrainLoader`'s interface (``set_epoch``, ``epoch``,
    ``bad_data``)."""

    def __init__(self, *, urls: list[str], counts: list[int] | None, recipe: _Recipe, seed: int, **kw: Any):
        self.world_size, self.num_batches = kw.pop("world_size"), kw.pop("num_batches")
        self.shuffle_buffer = kw.pop("shuffle_buffer")
        super().__init__(**kw)
        self.urls, self.counts, self.recipe, self.seed = urls, counts, recipe, seed
        self._next_epoch, self._start_batch = 0, 0

    def __len__(self) -> int:
        return self.num_batches

    @property
    def epoch(self) -> int:
        return self._next_epoch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if not 0 <= start_batch <= self.num_batches:
            raise ValueError(f"start_batch must be in [0, {self.num_batches}], got {start_batch}")
        self._next_epoch, self._start_batch = int(epoch), int(start_batch)

    def epoch_reader(self, epoch: int, attempt: int = 0) -> _Reader:
        """This rank's reader for ``epoch``: its part of the epoch's shuffled shard list."""
        shards = _shards(self.urls, self.counts, self.where)
        n = len(shards.paths)
        order = list(range(n))
        import random

        random.Random(_seed_of(self.seed, epoch)).shuffle(order)
        seed = _seed31(self.seed, epoch, self.rank, attempt)
        if n >= self.world_size:
            part, shard_id, num_shards = shards.pick(order[self.rank :: self.world_size]), 0, 1
        else:  # fewer shards than ranks: DALI's split of the samples into contiguous parts
            part, shard_id, num_shards = shards, self.rank, self.world_size
        if not sum(part.readable):
            raise BadDataError(f"{self.where}: no readable sample in shards {part.paths}")
        return _Reader(part, shard_id, num_shards, shuffle=True, shuffle_buffer=self.shuffle_buffer, seed=seed)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, start = self._next_epoch, self._start_batch
        self._next_epoch, self._start_batch = epoch + 1, 0
        reader = self.epoch_reader(epoch)
        lost = sum(reader.shards.lost) if reader.num_shards == 1 else sum(reader.shards.lost) // reader.num_shards
        self._read += sum(reader.shards.readable) // reader.num_shards
        if lost:
            self._count_bad(lost, f"{lost} samples lost in truncated/damaged shards of epoch {epoch}")
        done, attempt, segment = 0, 0, 0  # segment: batches done when the current stream began
        while done < self.num_batches:
            pipe = self._pipe(reader, self.recipe, _seed31(self.seed, epoch, self.rank, attempt, 1))
            try:
                for images, labels in _batches(pipe, self.recipe, eval_pass=False):
                    self._read += self.batch_size
                    done += 1
                    if done > start:  # the first `start` batches replay the epoch (resume)
                        yield images, labels
                    if done == self.num_batches:
                        break
            except RuntimeError as exn:
                bad = self._diagnose(reader, done - segment, exn)
                self._count_bad(1, f"corrupt sample {bad}")
                attempt, segment = attempt + 1, done  # a fresh stream for the rest, from the cleaned index
                reader = self.epoch_reader(epoch, attempt)
            finally:
                del pipe


class DaliEvalLoader(_DaliLoader):
    """Iterable of ``(images, labels)``: every readable sample of the split once across ranks
    (DALI's contiguous split of the samples), a partial last batch; ``num_samples`` is this
    rank's count."""

    def __init__(self, *, urls: list[str], counts: list[int] | None, recipe: _Recipe, seed: int, **kw: Any):
        self.world_size = kw.pop("world_size")
        super().__init__(**kw)
        self.urls, self.counts, self.recipe, self.seed = urls, counts, recipe, seed
        total = sum(_shards(urls, counts, self.where).readable)
        self.num_samples = total * (self.rank + 1) // self.world_size - total * self.rank // self.world_size

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        shards = _shards(self.urls, self.counts, self.where)
        lost = sum(shards.lost)
        self._read += self.num_samples
        if lost:
            self._count_bad(lost, f"{lost} samples lost in truncated/damaged shards")
        reader = _Reader(shards, self.rank, self.world_size)
        pipe = self._pipe(reader, self.recipe, _seed31(self.seed, self.rank))
        done = 0
        try:
            for batch in _batches(pipe, self.recipe, eval_pass=True):
                done += 1
                yield batch
        except RuntimeError as exn:
            bad = self._diagnose(reader, done, exn)
            raise BadDataError(
                f"{self.where}: corrupt sample {bad} (dropped from the shard's index: the next run skips it)"
            ) from exn


def _check(rank: int, world_size: int, batch_size: int, num_workers: int) -> None:
    from .loader import _check_rank

    _check_rank(rank, world_size, batch_size, num_workers)
    require_dali()


def _device_id(device: torch.device | str | None) -> int | None:
    """DALI's device_id: None (CPU-only pipeline) unless the batches go to a CUDA device."""
    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def build_dali_train_loader(
    spec: str | os.PathLike | dict,
    *,
    dataset_kind: str,
    img_size: int | None,
    batch_size: int,
    rank: int,
    world_size: int,
    num_workers: int,
    seed: int,
    epoch_length: int | None = None,
    channels_last: bool = False,
    include_holdout: bool = False,
    shuffle_buffer: int = 1000,
    max_bad_fraction: float = 0.01,
    bad_warmup: int = 1000,
    normalize: tuple[Sequence[float], Sequence[float]] | None = None,
    device: torch.device | str | None = None,
) -> DaliTrainLoader:
    """The DALI training loader for one rank; arguments as :func:`~l2w_dist.data.build_train_loader`
    (``num_workers`` = DALI CPU threads, at least 1), but the recipe is named
    (``dataset_kind``, ``img_size``) instead of passed as a transform, and ``device``: a CUDA
    device decodes there (``mixed``) and yields batches on it; otherwise CPU threads."""
    _check(rank, world_size, batch_size, num_workers)
    side = load_spec(spec)
    urls, counts, count = _split_urls(side, "train")
    if include_holdout:
        h_urls, h_counts, h_count = _split_urls(side, "holdout")
        urls = urls + h_urls
        counts = None if counts is None or h_counts is None else counts + h_counts
        count = None if count is None or h_count is None else count + h_count
    if epoch_length is None:
        if not count:
            raise ValueError("the spec has no sample count for 'train'; pass epoch_length")
        epoch_length = count // (world_size * batch_size)
    if epoch_length < 1:
        raise ValueError(
            f"epoch of {epoch_length} batches: {count} samples < world_size {world_size} × batch {batch_size}"
        )
    info = dataset_info(dataset_kind)
    recipe = _Recipe(dataset_kind, True, img_size or info.img_size, _tuple(normalize), channels_last)
    return DaliTrainLoader(
        name="train",
        urls=urls,
        counts=counts,
        recipe=recipe,
        seed=seed,
        rank=rank,
        world_size=world_size,
        num_batches=epoch_length,
        batch_size=batch_size,
        threads=max(1, num_workers),
        device_id=_device_id(device),
        shuffle_buffer=shuffle_buffer,
        max_bad_fraction=max_bad_fraction,
        bad_warmup=bad_warmup,
    )


def build_dali_eval_loader(
    spec: str | os.PathLike | dict,
    split: str,
    *,
    dataset_kind: str,
    img_size: int | None,
    batch_size: int,
    rank: int,
    world_size: int,
    num_workers: int,
    train_transform: bool = False,
    seed: int = 0,
    channels_last: bool = False,
    max_bad_fraction: float = 0.01,
    bad_warmup: int = 1000,
    normalize: tuple[Sequence[float], Sequence[float]] | None = None,
    device: torch.device | str | None = None,
) -> DaliEvalLoader:
    """Exact DALI loader over ``split`` (eval recipe; ``train_transform=True``: the training
    augmentation, seeded by ``seed`` and the rank on every pass)."""
    _check(rank, world_size, batch_size, num_workers)
    side = load_spec(spec)
    urls, counts, _count = _split_urls(side, split)
    info = dataset_info(dataset_kind)
    recipe = _Recipe(dataset_kind, train_transform, img_size or info.img_size, _tuple(normalize), channels_last)
    return DaliEvalLoader(
        name=split,
        urls=urls,
        counts=counts,
        recipe=recipe,
        seed=seed,
        rank=rank,
        world_size=world_size,
        batch_size=batch_size,
        threads=max(1, num_workers),
        device_id=_device_id(device),
        max_bad_fraction=max_bad_fraction,
        bad_warmup=bad_warmup,
    )


def _tuple(normalize) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    return None if normalize is None else (tuple(map(float, normalize[0])), tuple(map(float, normalize[1])))


__all__ = [
    "INSTALL_HINT",
    "DaliEvalLoader",
    "DaliTrainLoader",
    "build_dali_eval_loader",
    "build_dali_train_loader",
    "dali_available",
    "require_dali",
]
