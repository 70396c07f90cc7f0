"""The run configuration: typed dataclasses, YAML files, dotted command-line overrides.

    cfg = load_config("configs/demo.yaml", ["optim.lr=0.4", "meta.interval=10"])

Every key is checked before anything runs: an unknown key or a bad value raises
``ConfigError`` (a ``ValueError``) naming the key and what is allowed. Each field declares its
own check beside its default (l2w_dist/utils/settings.py); the ``meta`` section's L2W settings
are declared once, by the L2W step (l2w_dist/meta/settings.py).
"""

from __future__ import annotations

import collections.abc
import copy
import dataclasses
import importlib.util
import types
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
    # capture the iteration as CUDA graphs and replay them (one CUDA GPU, no DDP / DeepSpeed, no compile:
    # refused otherwise; l2w_dist/engine/cuda_graph.py)
    cuda_graph: bool = setting(False, free=True)
    ema_decay: float = setting(0.0, in_range(0, 1))  # 0 disables the EMA of model weights
    log_every: int = setting(20, at_least(1))
    ckpt_every: int = setting(0, at_least(0))  # periodic checkpoint every N iterations (kept as step_N.pt); 0: off
    # last.pt also every this many minutes of training (crash safety); 0: only at epoch ends and stops
    ckpt_minutes: float = setting(15.0, at_least(0))
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
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {one_line(err)}") from None
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
        try:
            parsed = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({one_line(err)})") from None
        _set_dotted(raw, key.strip(), parsed)
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


# Checks across keys and against the world outside the config -------------------------------
FASHION_MNIST_TRAIN = 60_000  # training images of the embedded data set (before the held-out split)


def check_run(cfg: Config, *, world_size: int | None = None, evaluating: bool = False) -> None:
    """What the per-field checks cannot see, checked before any work: the model name and its
    options (against the builder's signature and, by a dry build on PyTorch's meta device that
    allocates nothing and loads no weights, every check the builder makes), the data spec
    (present, readable, holding the splits and samples the run needs), the device, the
    distributed settings for ``world_size`` ranks (default: the launcher's variables, else 1)
    and the packages the W&B and DeepSpeed settings need. ``evaluating``: for ``l2w-eval``
    (no training data needed). Raises ``ConfigError`` naming the key, the value and what is allowed.
    """
    if world_size is None:
        world_size = _launch_world_size()
    model = _check_model(cfg.model)
    _check_input_size(cfg, model)
    _check_data(cfg, world_size, evaluating)
    _check_runtime(cfg, world_size, evaluating)


def one_line(err: Exception) -> str:
    """An error's message on one line (a command's config error is one line of stderr)."""
    return " ".join(str(err).split())


def _launch_world_size() -> int:
    from .distributed.env import DistEnvError, read_launch_env

    try:
        return read_launch_env().world_size
    except DistEnvError:
        return 1  # init_distributed reports a broken launch environment itself


def _check_model(model: ModelConfig) -> Any:
    """The model's name and options; returns the model built on the meta device (None when
    a builder needs an op the meta device lacks)."""
    import inspect

    import torch

    from .models import create_model, list_models
    from .models.registry import model_builder

    if model.name not in list_models():
        raise ConfigError(f"model.name={model.name!r} is not a registered model; choose one of {list_models()}")
    builder = model_builder(model.name)
    params = inspect.signature(builder).parameters
    hints = typing.get_type_hints(builder)
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for key, value in model.options.items():
        if key not in params:
            if takes_any:
                continue  # passed on (to timm): the dry build below checks it
            raise ConfigError(
                f"model.options.{key}={value!r} is not an option of {model.name}; allowed: {', '.join(params)}"
            )
        hint = hints.get(key, Any)
        if not _fits(value, hint):
            raise ConfigError(
                f"model.options.{key}={value!r} has the wrong type; {model.name} takes {key}: {_type_name(hint)}"
            )
    options = dict(model.options)
    if options.get("pretrained"):
        options["pretrained"] = False  # the real build loads the weights; the dry build checks the rest
    try:
        with torch.device("meta"):
            return create_model(model.name, **options)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"model.options={model.options!r} refused by {model.name}: {one_line(err)}") from None
    except Exception:  # noqa: BLE001 - not a bad option but an op the meta device lacks: the real build tells
        return None


def _check_input_size(cfg: Config, model: Any) -> None:
    """One forward of the meta-device model on an image of the run's size (shapes only, no
    arithmetic): a model that cannot take ``data.img_size`` fails here, not at the first step."""
    import torch

    from .data.transforms import dataset_info

    if model is None:
        return
    size = cfg.data.img_size
    try:
        with torch.device("meta"), torch.no_grad():  # eval mode: BatchNorm needs no batch statistics
            model.eval()(torch.empty(2, dataset_info(cfg.data.dataset).in_chans, size, size))
    except (RuntimeError, AssertionError, ValueError) as err:
        raise ConfigError(
            f"data.img_size={size} does not fit model {cfg.model.name} (options {cfg.model.options!r}): {one_line(err)}"
        ) from None
    except Exception:  # noqa: BLE001 - an op the meta device lacks: the first real step tells
        pass


def _fits(value: Any, hint: Any) -> bool:
    """Whether a YAML value can be given for a parameter annotated ``hint`` (loosely: an
    annotation this does not know passes, the builder checks it)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin is Literal:
        return value in args
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args))
        return not args or all(_fits(v, args[0]) for v in value)
    if origin in (dict, collections.abc.Mapping):
        return isinstance(value, dict)
    return True


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) if typing.get_origin(hint) is None else str(hint).replace("typing.", "")


def _check_data(cfg: Config, world_size: int, evaluating: bool) -> None:
    from .data.loader import load_spec, split_count

    data, train, ev = cfg.data, cfg.train, cfg.eval
    # the evaluation calibrates on the held-out split (and epoch-end evaluations score it)
    needs_holdout = data.calibration == "holdout" and (evaluating or ev.enabled)
    if not data.spec:
        if data.dataset != "fashion-mnist":
            raise ConfigError(
                f"data.spec='' with data.dataset={data.dataset!r}: set data.spec to the JSON sidecar written by "
                "tools/make_shards.py (only fashion-mnist is prepared automatically)"
            )
        if not 0 <= data.holdout < FASHION_MNIST_TRAIN:
            raise ConfigError(
                f"data.holdout={data.holdout} is not allowed for the embedded fashion-mnist; "
                f"expected an integer in 0..{FASHION_MNIST_TRAIN - 1}"
            )
        if needs_holdout and data.holdout == 0:
            raise ConfigError(
                "data.holdout=0 leaves no held-out images for data.calibration='holdout' (the evaluation "
                "calibrates on them); set data.holdout >= 1 or data.calibration=train_augmented"
            )
        _check_writable("data.root", data.root)
        counts = {"train": FASHION_MNIST_TRAIN - data.holdout, "holdout": data.holdout}
        num_classes = 10
    else:
        path = Path(data.spec)
        if not path.is_file():
            raise ConfigError(
                f"data.spec={data.spec!r} is not a file; expected the JSON sidecar written by tools/make_shards.py"
            )
        try:
            side = load_spec(path)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ConfigError(
                f"data.spec={data.spec!r} is not a readable dataset sidecar (the JSON written by "
                f"tools/make_shards.py): {one_line(err)}"
            ) from None
        wanted = ["test"] if evaluating or ev.enabled else []
        if not evaluating or data.calibration == "train_augmented":  # which calibrates on training images
            wanted.append("train")
        if needs_holdout or (not evaluating and data.calibration == "train_augmented"):  # trained on too
            wanted.append("holdout")
        counts = {}
        for split in wanted:
            try:
                counts[split] = split_count(side, split)
            except (OSError, ValueError) as err:
                raise ConfigError(f"data.spec={data.spec!r}: {err}") from None
        num_classes = side.get("num_classes")
    if not evaluating and counts.get("train") is not None:
        available = counts["train"] + (counts.get("holdout") or 0) * (data.calibration == "train_augmented")
        if available < train.batch_size:
            raise ConfigError(
                f"train.batch_size={train.batch_size} is more than the {available} training samples of the data"
            )
    declared = cfg.model.options.get("num_classes", _builder_default(cfg.model.name, "num_classes"))
    if isinstance(num_classes, int) and isinstance(declared, int) and declared < num_classes:
        raise ConfigError(
            f"model.options.num_classes={declared} is fewer than the {num_classes} classes of the data "
            f"(data.spec={data.spec!r}); expected an integer >= {num_classes}"
        )


def _builder_default(name: str, option: str) -> Any:
    import inspect

    from .models.registry import model_builder

    param = inspect.signature(model_builder(name)).parameters.get(option)
    return None if param is None or param.default is inspect.Parameter.empty else param.default


def _check_writable(key: str, folder: str) -> None:
    """``folder`` exists as a writable folder, or can be made in its nearest existing parent."""
    import os

    path = Path(folder).absolute()
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        where = "is not a writable folder" if probe == path else f"cannot be created ({probe} is not a writable folder)"
        raise ConfigError(f"{key}={folder!r} {where}; expected a folder this process can write")


def _check_runtime(cfg: Config, world_size: int, evaluating: bool) -> None:
    import importlib.util

    import torch

    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device='cuda' but no CUDA device is visible; expected auto or cpu here")
    if evaluating:
        return
    dist = cfg.dist
    per_rank = cfg.train.batch_size // world_size
    if per_rank * world_size != cfg.train.batch_size or per_rank % 2:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} does not split into an even per-rank batch over "
            f"{world_size} ranks; expected a multiple of {2 * world_size}"
        )
    if dist.zero_stage and dist.backend != "deepspeed":
        raise ConfigError(
            f"dist.zero_stage={dist.zero_stage} is a DeepSpeed setting; expected dist.backend=deepspeed "
            f"(got {dist.backend!r}) or dist.zero_stage=0"
        )
    if dist.backend == "deepspeed":
        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError("dist.backend='deepspeed' but DeepSpeed is not installed; pip install deepspeed")
        from .distributed.deepspeed import ZERO3_REFUSAL, ZERO_STAGES

        if dist.zero_stage not in ZERO_STAGES:
            raise ConfigError(f"dist.zero_stage={dist.zero_stage} is refused: {' '.join(ZERO3_REFUSAL.split())}")
    if dist.backend in ("ddp", "deepspeed") and world_size == 1:
        raise ConfigError(
            f"dist.backend={dist.backend!r} needs several ranks (a process group); launch with torchrun or "
            "srun, or use dist.backend=auto (none for one process)"
        )
    if cfg.wandb.mode != "disabled" and importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"wandb.mode={cfg.wandb.mode!r} but wandb is not installed; expected disabled")
