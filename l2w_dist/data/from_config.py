"""A run's data as its Config describes it: the data spec, the evaluation loaders (the
calibration split included) and where the uint8 images are normalised.

The trainer and ``l2w-eval`` both build their data here, so a checkpoint evaluated again
sees exactly the batches the trainer's own evaluation saw.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..config import Config
from .fashion_mnist import prepare_fashion_mnist
from .loader import build_eval_loader, build_train_loader
from .transforms import attach_input_normalizer, build_transforms, dataset_info

if TYPE_CHECKING:
    from ..distributed import DistEnv


def resolve_data_spec(cfg: Config, env: DistEnv) -> str:
    """The data set's JSON sidecar; the embedded Fashion-MNIST is prepared on first use (by rank 0)."""
    if cfg.data.spec:
        return cfg.data.spec
    if cfg.data.dataset != "fashion-mnist":
        raise ValueError(
            f"data.spec is empty: set it to the JSON sidecar written by tools/make_shards.py for "
            f"data.dataset={cfg.data.dataset!r} (only fashion-mnist is prepared automatically)"
        )
    if env.rank == 0:
        prepare_fashion_mnist(cfg.data.root, holdout=cfg.data.holdout, seed=cfg.train.seed)
    if env.world_size > 1:
        torch.distributed.barrier()
    return str(prepare_fashion_mnist(cfg.data.root, holdout=cfg.data.holdout, seed=cfg.train.seed))


def train_loader(cfg: Config, env: DistEnv, spec: str, batch_size: int, device: torch.device) -> Iterable:
    """The training loader ``data.backend`` names (``batch_size`` per rank): the torch
    DataLoader path, or DALI decoding on CPU threads / on the GPU for a CUDA ``device``."""
    common = {
        "batch_size": batch_size,
        "rank": env.rank,
        "world_size": env.world_size,
        "num_workers": cfg.data.num_workers,
        "normalize": loader_normalization(cfg),
        "seed": cfg.train.seed,
        "channels_last": cfg.train.channels_last,
        "max_bad_fraction": cfg.data.max_bad_fraction,
        "include_holdout": cfg.data.calibration == "train_augmented",  # the released code trains on all
    }
    if cfg.data.backend == "dali":
        from .dali import build_dali_train_loader

        return build_dali_train_loader(
            spec, dataset_kind=cfg.data.dataset, img_size=cfg.data.img_size, device=device, **common
        )
    return build_train_loader(
        spec,
        transform=build_transforms(cfg.data.dataset, True, cfg.data.img_size, normalize=False),
        pin_memory=device.type == "cuda",
        **common,
    )


def eval_loader(
    cfg: Config, env: DistEnv, spec: str, split: str, train_transform: bool = False, device: torch.device | None = None
) -> Iterable:
    """Exact-mode loader over one split (every sample once across ranks), eval transforms by
    default; ``data.backend`` picks the implementation (DALI decodes on a CUDA ``device``)."""
    common = {
        "batch_size": cfg.data.eval_batch_size,
        "rank": env.rank,
        "world_size": env.world_size,
        "num_workers": cfg.data.num_workers,
        "normalize": loader_normalization(cfg),
    }
    if cfg.data.backend == "dali":
        from .dali import build_dali_eval_loader

        return build_dali_eval_loader(
            spec,
            split,
            dataset_kind=cfg.data.dataset,
            img_size=cfg.data.img_size,
            train_transform=train_transform,
            seed=cfg.train.seed + env.rank,
            device=device,
            **common,
        )
    return build_eval_loader(
        spec,
        split,
        transform=build_transforms(cfg.data.dataset, train_transform, cfg.data.img_size, normalize=False),
        **common,
    )


def calibration_loader(cfg: Config, env: DistEnv, spec: str) -> Iterable:
    """The images the budgeted-batch thresholds are calibrated on, as ``data.calibration`` says.

    ``holdout``: the clean held-out split with eval transforms. ``train_augmented`` (the
    released code's choice): the training images with the training augmentation, whose
    random crops and flips start from ``train.seed`` (and the rank) on every pass, so that
    evaluating a checkpoint again draws the same augmented images.
    """
    if cfg.data.calibration == "holdout":
        return eval_loader(cfg, env, spec, "holdout")
    augmented = eval_loader(cfg, env, spec, "train", train_transform=True)
    return ReseededLoader(augmented, seed=cfg.train.seed + env.rank)


class ReseededLoader:
    """Iterate ``loader`` with the CPU torch and Python random generators started from
    ``seed`` on every pass, in a stream of their own.

    The generators are swapped in only while the loader produces a batch (where the
    transforms, or the DataLoader's choice of worker seeds, draw from them) and swapped
    out again before the batch is handed on: the caller's random state is left untouched,
    and whatever the caller draws between batches does not shift the augmentation.
    """

    def __init__(self, loader: Iterable, seed: int):
        self.loader, self.seed = loader, seed

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        own_torch = torch.Generator().manual_seed(self.seed).get_state()
        own_python = random.Random(self.seed).getstate()
        batches = None
        while True:
            caller_torch, caller_python = torch.get_rng_state(), random.getstate()
            torch.set_rng_state(own_torch)
            random.setstate(own_python)
            try:
                if batches is None:
                    batches = iter(self.loader)
                batch = next(batches, None)
            finally:
                own_torch, own_python = torch.get_rng_state(), random.getstate()
                torch.set_rng_state(caller_torch)
                random.setstate(caller_python)
            if batch is None:
                return
            yield batch


def attach_device_normalization(model: nn.Module, cfg: Config) -> None:
    """With ``data.normalize_on=device`` the loaders yield uint8 images: the model normalises them."""
    if cfg.data.normalize_on == "device":
        attach_input_normalizer(model, cfg.data.dataset)


def loader_normalization(cfg: Config) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """(mean, std) for the loaders to normalise the uint8 images into each batch (one pass, in
    the batch's shared memory), or None when the model normalises on its device."""
    if cfg.data.normalize_on != "loader":
        return None
    info = dataset_info(cfg.data.dataset)
    return info.mean, info.std
