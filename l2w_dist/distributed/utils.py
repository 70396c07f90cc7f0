"""Small distributed helpers used across the training code: process-group queries, one-flag
collectives, parameter names.

Every function works without a process group (a single process): the queries answer as for
one rank and the collectives return their input.
"""

from __future__ import annotations

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
    if world_size() == 1:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


def parameter_names(module: nn.Module) -> dict[int, str]:
    """``id(parameter) -> name`` over ``module.named_parameters()`` (to name an optimizer's parameters)."""
    return {id(p): n for n, p in module.named_parameters()}
