"""The run configuration: typed dataclasses, YAML files, dotted command-line overrides.

    cfg = load_config("configs/demo.yaml", ["optim.lr=0.4", "meta.interval=10"])

Every key is checked before anything runs: an unknown key or a bad value raises
``ConfigError`` (a ``ValueError``) naming the key and what is allowed.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A configuration key or value that is not allowed."""


@dataclass
class ModelConfig:
    name: str = "msdnet_cifar"
    options: dict[str, Any] = field(default_factory=dict)  # keyword overrides for create_model


@dataclass
class DataConfig:
    dataset: Literal["fashion-mnist", "cifar", "imagenet"] = "fashion-mnist"
    spec: str = ""  # JSON sidecar written by tools/make_shards.py; empty: prepare the embedded data
    root: str = "data/fashion-mnist"  # where the embedded data set's shards are prepared
    img_size: int = 32
    holdout: int = 5000  # images held out of training to calibrate budgeted-batch thresholds
    calibration: Literal["holdout", "train_augmented"] = "holdout"  # train_augmented = released code
    num_workers: int = 2
    eval_batch_size: int = 500
    max_bad_fraction: float = 0.01
    # "device": loaders yield uint8 images and the model normalises them on its device (4x fewer
    # bytes per batch through shared memory, pinning and H2D; less loader CPU) — for GPU runs
    normalize_on: Literal["loader", "device"] = "loader"


@dataclass
class OptimConfig:
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.1  # at batch `lr_reference_batch` (scaled linearly with the global batch)
    lr_reference_batch: int = 0  # 0: no scaling, `lr` is used as given
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    min_lr: float = 0.0
    grad_clip: float = 0.0  # max global grad norm; 0 disables
    label_smoothing: float = 0.0


@dataclass
class MetaConfig:
    enabled: bool = True  # False: the plain multi-exit baseline (uniform weights, one step per batch)
    epsilon: float = 0.8
    constraint: Literal["mat", "col", "row"] = "col"
    input: Literal["loss", "conf", "both"] = "loss"
    target_p_index: int = 15
    hypergrad: Literal["jvp", "autograd"] = "jvp"
    sync: Literal["global", "local"] = "global"
    real_weights: Literal["updated", "pre_update"] = "updated"
    interval: int = 1
    hidden: int = 500
    layers: int = 1
    lr: float = 1e-4
    weight_decay: float = 1e-4


@dataclass
class TrainConfig:
    epochs: float = 1.0
    batch_size: int = 64  # global batch (all ranks) per loader step; halves are train / meta
    max_steps: int = 0  # stop after this many iterations (0: run all epochs)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "bf16"] = "fp32"
    channels_last: bool = False
    compile: bool = False  # torch.compile the plain (non-meta) forward: baseline steps and evaluation
    ema_decay: float = 0.0  # 0 disables the EMA of model weights
    log_every: int = 20
    ckpt_every: int = 0  # periodic checkpoint every N iterations (kept as step_N.pt); 0: off
    keep_best: int = 1  # best-k checkpoints by the final exit's held-out top-1 at epoch ends
    threads: int = 0  # torch CPU threads; 0 leaves torch's default


@dataclass
class DistConfig:
    backend: Literal["auto", "none", "ddp", "deepspeed"] = "auto"  # auto: ddp when WORLD_SIZE > 1
    zero_stage: int = 0
    sync_batchnorm: bool = False


@dataclass
class WandbConfig:
    mode: Literal["disabled", "offline", "online"] = "disabled"
    project: str = "l2w_dist"
    entity: str = ""
    name: str = ""
    tags: list[str] = field(default_factory=list)


@dataclass
class EvalConfig:
    enabled: bool = True
    every_epochs: int = 1  # held-out anytime accuracy for best-k checkpoints; 0: only at the end


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


# Checks beyond types: (predicate, description of what is allowed).
_RANGES: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "optim.lr": (lambda v: v > 0, "a positive number"),
    "optim.momentum": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "optim.weight_decay": (lambda v: v >= 0, "a number >= 0"),
    "optim.label_smoothing": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "optim.grad_clip": (lambda v: v >= 0, "a number >= 0"),
    "optim.warmup_steps": (lambda v: v >= 0, "an integer >= 0"),
    "meta.epsilon": (lambda v: v >= 0, "a number >= 0"),
    "meta.target_p_index": (lambda v: 1 <= v <= 39, "an integer in 1..39 (p = index / 20)"),
    "meta.interval": (lambda v: v >= 1, "an integer >= 1"),
    "meta.hidden": (lambda v: v >= 1, "an integer >= 1"),
    "meta.layers": (lambda v: v >= 1, "an integer >= 1"),
    "meta.lr": (lambda v: v > 0, "a positive number"),
    "train.epochs": (lambda v: v > 0, "a positive number"),
    "train.batch_size": (lambda v: v >= 2 and v % 2 == 0, "an even integer >= 2 (the batch is halved)"),
    "train.max_steps": (lambda v: v >= 0, "an integer >= 0"),
    "train.ema_decay": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "train.log_every": (lambda v: v >= 1, "an integer >= 1"),
    "train.keep_best": (lambda v: v >= 0, "an integer >= 0"),
    "dist.zero_stage": (lambda v: v in (0, 1, 2, 3), "one of 0, 1, 2, 3"),
    "data.img_size": (lambda v: v >= 8, "an integer >= 8"),
    "data.holdout": (lambda v: v >= 0, "an integer >= 0"),
    "data.num_workers": (lambda v: v >= 0, "an integer >= 0"),
    "data.max_bad_fraction": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
}


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
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where = prefix.rstrip(".") or "the top level"
        raise ConfigError(f"unknown key(s) {[prefix + k for k in unknown]} in {where}; allowed: {sorted(fields)}")
    values = {}
    for name, value in raw.items():
        key = prefix + name
        typ = hints[name]
        if dataclasses.is_dataclass(typ):
            values[name] = _build(typ, value, key + ".")
        else:
            values[name] = _check_value(key, typ, value)
    obj = cls(**values)
    for name in fields:
        key = prefix + name
        if key in _RANGES:
            ok, allowed = _RANGES[key]
            if not ok(getattr(obj, name)):
                raise ConfigError(f"{key}={getattr(obj, name)!r} is not allowed; expected {allowed}")
    return obj


def _check_value(key: str, typ: Any, value: Any) -> Any:
    origin, args = get_origin(typ), get_args(typ)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}={value!r} is not allowed; choose one of {list(args)}")
        return value
    if origin in (Union, types.UnionType):
        for arg in args:
            try:
                return _check_value(key, arg, value)
            except ConfigError:
                continue
        raise ConfigError(f"{key}={value!r} has the wrong type; expected {typ}")
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be true or false")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}={value!r} must be an integer")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r} must be a number")
    if typ is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}={value!r} must be a string")
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}={value!r} must be a list of {len(args)} values")
        return tuple(_check_value(f"{key}[{i}]", a, v) for i, (a, v) in enumerate(zip(args, value)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} must be a list")
        return [_check_value(f"{key}[{i}]", args[0], v) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r} must be a mapping")
        return dict(value)
    return value


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj
