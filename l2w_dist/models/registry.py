"""A timm-style model registry: builders register under a name, users create by name."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a builder under its function name (``@register_model def msdnet_cifar(**kw)``)."""
    name = fn.__name__
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is registered twice")
    _REGISTRY[name] = fn
    return fn


def list_models() -> list[str]:
    """Names of every registered model, sorted."""
    return sorted(_REGISTRY)


def model_builder(name: str) -> Callable[..., nn.Module]:
    """The builder registered as ``name`` (its signature lists the model's options)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available models: {', '.join(list_models())}")
    return _REGISTRY[name]


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a registered multi-exit model; keyword overrides replace its preset options.

    Raises ``ValueError`` naming the allowed values for an unknown model or option.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available models: {', '.join(list_models())}")
    builder = _REGISTRY[name]
    params = inspect.signature(builder).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if not takes_any:
        unknown = sorted(set(overrides) - set(params))
        if unknown:
            allowed = ", ".join(p for p in params)
            raise ValueError(f"unknown option(s) {unknown} for model {name!r}; allowed options: {allowed}")
    return builder(**overrides)
