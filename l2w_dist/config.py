"""The run configuration: typed dataclasses, YAML files, dotted command-line overrides.

    cfg = load_config("configs/demo.yaml", ["optim.lr=0.4", "meta.interval=10"])

Every key is checked before anything runs: an unknown key or a bad value raises
``ConfigError`` (a ``ValueError``) naming the key and what is allowed. Each field declares its
own check beside its default (l2w_dist/utils/settings.py); the ``meta`` section's L2W settings
are declared once, by the L2W step (l2w_dist/meta/settings.py).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .meta.settings import L2WConfig, L2WSettings
from .utils.precision import Precision
from .utils.settings import (
    NON_EMPTY,
    Check,
    ConfigError,
    SettingError,
    Settings,
    above,
    at_least,
    each,
    in_range,
    one_of,
    setting,
)


@dataclass
class ModelConfig(Settings):
    name: str = setting("msdnet_cifar", NON_EMPTY)  # a name in l2w_dist.models.list_models()
    options: dict[str, Any] = setting(default_factory=dict, free=True)  # keyword overrides for create_model


def _dali_installed() -> bool:
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except ImportError:  # no "nvidia" namespace package at all
        return False


DALI_INSTALLED = Check(
    lambda v: v != "dali" or _dali_installed(), 'torch, or dali once installed (pip install -e ".[dali]")'
)


@dataclass
class DataConfig(Settings):
    dataset: Literal["fashion-mnist", "cifar", "imagenet"] = setting("fashion-mnist")
    # JSON sidecar written by tools/make_shards.py; empty: prepare the embedded data
    spec: str = setting("", free=True)
    root: str = setting("data/fashion-mnist", NON_EMPTY)  # where the embedded data set's shards are prepared
    img_size: int = setting(32, at_least(8))
    holdout: int = setting(5000, at_least(0))  # images held out of training to calibrate budgeted-batch thresholds
    calibration: Literal["holdout", "train_augmented"] = setting("holdout")  # train_augmented = released code
    num_workers: int = setting(2, at_least(0))
    eval_batch_size: int = setting(500, at_least(1))
    max_bad_fraction: float = setting(0.01, in_range(0, 1, include_high=True))
    # "device": loaders yield uint8 images and the model normalises them on its device (4x fewer
    # bytes per batch through shared memory, pinning and H2D; less loader CPU) — for GPU runs
    normalize_on: Literal["loader", "device"] = setting("loader")
    # "dali": NVIDIA DALI decodes and augments (C++ threads, or the GPU on CUDA runs); docs/data.md
    backend: Literal["torch", "dali"] = setting("torch", DALI_INSTALLED)


@dataclass
class OptimConfig(Settings):
    name: Literal["sgd", "adamw"] = setting("sgd")
    lr: float = setting(0.1, above(0))  # at batch `lr_reference_batch` (scaled linearly with the global batch)
    lr_reference_batch: int = setting(0, at_least(0))  # 0: no scaling, `lr` is used as given
    momentum: float = setting(0.9, in_range(0, 1))
    nesterov: bool = setting(False, free=True)
    weight_decay: float = setting(1e-4, at_least(0))
    betas: tuple[float, float] = setting((0.9, 0.999), each(in_range(0, 1)))
    eps: float = setting(1e-8, above(0))
    warmup_steps: int = setting(0, at_least(0))
    min_lr: float = setting(0.0, at_least(0))
    grad_clip: float = setting(0.0, at_least(0))  # max global grad norm; 0 disables
    label_smoothing: float = setting(0.0, in_range(0, 1))  # the train loss's; the L2W step receives it


@dataclass
class MetaConfig(L2WSettings):
    """The L2W step's settings (declared once, in :class:`L2WSettings`) and how the trainer
    runs the weight net around them."""

    # False: the plain multi-exit baseline (uniform weights, one step per batch)
    enabled: bool = setting(True, free=True)
    interval: int = setting(1, at_least(1))  # a meta step every `interval` iterations
    hidden: int = setting(500, at_least(1))  # weight net width
    layers: int = setting(1, at_least(1))  # weight net hidden layers
    lr: float = setting(1e-4, above(0))  # the weight net's Adam
    weight_decay: float = setting(1e-4, at_least(0))

    def l2w(self, label_smoothing: float) -> L2WConfig:
        """The L2W step's config: this section's L2W settings and the train loss's label smoothing."""
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(L2WSettings)}
        return L2WConfig(**shared, label_smoothing=label_smoothing)


@dataclass
class TrainConfig(Settings):
    epochs: float = setting(1.0, above(0))
    # global batch (all ranks) per loader step; halves are train / meta
    batch_size: int = setting(64, Check(lambda v: v >= 2 and v % 2 == 0, "an even integer >= 2 (the batch is halved)"))
    max_steps: int = setting(0, at_least(0))  # stop after this many iterations (0: run all epochs)
    seed: int = setting(0, Check(lambda v: 0 <= v < 2**32, "an integer in 0..2**32-1"))
    device: Literal["auto", "cpu", "cuda"] = setting("auto")
    precision: Precision = setting("fp32")
    channels_last: bool = setting(False, free=True)
    # torch.compile the plain (non-meta) forward: baseline steps and evaluation
    compile: bool = setting(False, free=True)
    ema_decay: float = setting(0.0, in_range(0, 1))  # 0 disables the EMA of model weights
    log_every: int = setting(20, at_least(1))
    ckpt_every: int = setting(0, at_least(0))  # periodic checkpoint every N iterations (kept as step_N.pt); 0: off
    keep_best: int = setting(1, at_least(0))  # best-k checkpoints by the final exit's held-out top-1 at epoch ends
    threads: int = setting(0, at_least(0))  # torch CPU threads; 0 leaves torch's default


@dataclass
class DistConfig(Settings):
    backend: Literal["auto", "none", "ddp", "deepspeed"] = setting("auto")  # auto: ddp when WORLD_SIZE > 1
    zero_stage: int = setting(0, one_of(0, 1, 2, 3))
    sync_batchnorm: bool = setting(False, free=True)


@dataclass
class WandbConfig(Settings):
    mode: Literal["disabled", "offline", "online"] = setting("disabled")
    project: str = setting("l2w_dist", NON_EMPTY)
    entity: str = setting("", free=True)  # empty: the account's default entity
    name: str = setting("", free=True)  # empty: a name wandb makes up
    # wandb refuses tags outside 1..64 characters
    tags: list[str] = setting(
        default_factory=list, check=each(Check(lambda t: 1 <= len(t) <= 64, "a string of 1..64 characters"))
    )


@dataclass
class EvalConfig(Settings):
    enabled: bool = setting(True, free=True)
    # held-out anytime accuracy for best-k checkpoints; 0: only at the end
    every_epochs: int = setting(1, at_least(0))


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file at ``path``, then ``key=value`` overrides (values parsed as YAML)."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    return apply_overrides(raw, overrides)


def apply_overrides(base: Config | dict[str, Any], overrides: typing.Sequence[str] = ()) -> Config:
    """``base`` (a Config, or nested plain data such as a checkpoint's ``config``) with
    ``key=value`` overrides applied (values parsed as YAML), validated."""
    raw = copy.deepcopy(base.to_dict() if isinstance(base, Config) else base)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.lr=0.4)")
        _set_dotted(raw, key.strip(), yaml.safe_load(value) if value.strip() else "")
    return config_from_dict(raw)


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a :class:`Config` from nested plain data."""
    return _build(Config, raw, prefix="")


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    """``cls`` from the mapping ``raw``: sections built recursively, values converted and
    checked by the section's own settings (errors re-keyed with the dotted ``prefix``)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        where = prefix.rstrip(".") or "the top level"
        raise ConfigError(f"unknown key(s) {[prefix + k for k in unknown]} in {where}; allowed: {sorted(names)}")
    values = {}
    for name, value in raw.items():
        if dataclasses.is_dataclass(hints[name]):
            values[name] = _build(hints[name], value, prefix + name + ".")
        else:
            values[name] = value
    try:
        return cls(**values)
    except SettingError as err:
        raise err.under(prefix) from None


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj
