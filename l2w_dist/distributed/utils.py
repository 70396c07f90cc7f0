"""Small distributed helpers used across the training code: process-group queries, one-flag
collectives, parameter names.

Every function works without a process group (a single process): the queries answer as for
one rank and the collectives return their input.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn


def process_group_ready() -> bool:
    """Is there an initialised ``torch.distributed`` process group?"""
    return dist.is_available() and dist.is_initialized()


def world_size(group=None) -> int:
    """Ranks in ``group`` (default: the world); 1 without a process group."""
    return dist.get_world_size(group) if process_group_ready() else 1


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank if ``flag`` is True on any rank (collective: call on all ranks).

    ``device``: where the one-number all-reduce runs (NCCL needs a CUDA tensor).
    """
    return any_rank_each([flag], device)[0]


def any_rank_each(flags: Sequence[bool], device: torch.device | str = "cpu") -> list[bool]:
    """:func:`any_rank` for several flags in one all-reduce (collective: call on all ranks)."""
    if world_size() == 1:
        return [bool(f) for f in flags]
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
    dist.all_reduce(t)
    return [bool(v > 0) for v in t.tolist()]


def parameter_names(module: nn.Module) -> dict[int, str]:
    """``id(parameter) -> name`` over ``module.named_parameters()`` (to name an optimizer's parameters)."""
    return {id(p): n for n, p in module.named_parameters()}
