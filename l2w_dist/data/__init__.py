"""Data: WebDataset shards (writer + sidecar), streaming train/eval loaders, transforms, the
clean held-out split, and the embedded Fashion-MNIST default. See docs/data.md."""

from .fashion_mnist import prepare_fashion_mnist
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
    "TrainLoader",
    "build_eval_loader",
    "build_train_loader",
    "build_transforms",
    "attach_input_normalizer",
    "dataset_info",
    "uint8_normalization",
    "holdout_keys",
    "load_spec",
    "prepare_fashion_mnist",
    "write_shards",
]
