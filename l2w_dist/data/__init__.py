"""Data: WebDataset shards (writer + sidecar), streaming train/eval loaders, transforms, the
clean held-out split, the embedded Fashion-MNIST default, and a run's data built from its
Config (from_config.py). See docs/data.md."""

from .fashion_mnist import prepare_fashion_mnist
from .from_config import (
    ReseededLoader,
    attach_device_normalization,
    calibration_loader,
    eval_loader,
    loader_normalization,
    resolve_data_spec,
    train_loader,
)
from .loader import (
    BadDataError,
    BadDataGuard,
    EvalLoader,
    TrainLoader,
    build_eval_loader,
    build_train_loader,
    load_spec,
)
from .shards import holdout_keys, write_shards
from .transforms import (
    DATASET_INFO,
    DatasetInfo,
    attach_input_normalizer,
    build_transforms,
    dataset_info,
    uint8_normalization,
)

__all__ = [
    "DATASET_INFO",
    "BadDataError",
    "BadDataGuard",
    "DatasetInfo",
    "EvalLoader",
    "ReseededLoader",
    "TrainLoader",
    "attach_device_normalization",
    "build_eval_loader",
    "build_train_loader",
    "build_transforms",
    "calibration_loader",
    "eval_loader",
    "attach_input_normalizer",
    "dataset_info",
    "uint8_normalization",
    "holdout_keys",
    "load_spec",
    "loader_normalization",
    "prepare_fashion_mnist",
    "resolve_data_spec",
    "train_loader",
    "write_shards",
]
