"""The multi-exit model zoo: ``create_model(name, **overrides)`` and ``list_models()``.

Every model returns a list of K logit tensors and has ``exit_flops`` (cumulative
multiply-adds per exit for one image). Importing this package registers the builders.
"""

from . import cnn_exits, msdnet, ranet, vit_exits  # noqa: F401  (registers the builders)
from .base import MultiExitModel, count_exit_flops
from .registry import create_model, list_models, register_model

__all__ = ["MultiExitModel", "count_exit_flops", "create_model", "list_models", "register_model"]
