"""The one autocast helper: bf16 autocast on the given device, or nothing for fp32."""

from __future__ import annotations

import contextlib
from typing import Literal, get_args

import torch

Precision = Literal["fp32", "bf16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)


def autocast(device: torch.device | str, precision: str, cache: bool = True) -> contextlib.AbstractContextManager:
    """``torch.autocast(device.type, bfloat16)`` for ``precision="bf16"``, a no-op for ``"fp32"``.

    ``cache=False``: no cast-weight cache (a captured CUDA graph must not keep casts of an
    earlier capture; torch requires it off for graphed callables)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; expected one of {PRECISIONS}")
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    if precision == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16, cache_enabled=cache)
    return contextlib.nullcontext()
