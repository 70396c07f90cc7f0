"""The few collectives the L2W step needs, passed in as an object (meta/ never imports a
distribution backend; it receives what it needs: docs/architecture.md).

``LocalCollectives`` is a single process. ``TorchCollectives`` uses plain
``torch.distributed`` calls on a process group; its ``all_reduce_sum`` is differentiable
(:func:`all_reduce_sum`: the backward all-reduces the incoming gradient, the JVP the
tangent), which is what the ``autograd`` hypergradient engine needs under global sync.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.distributed as dist
from torch import Tensor


@runtime_checkable
class Collectives(Protocol):
    world_size: int
    rank: int

    def all_reduce_sum_(self, tensor: Tensor) -> Tensor:
        """Sum over ranks in place (no autograd); returns ``tensor``."""
        ...

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """Out-of-place sum over ranks that autograd differentiates (backward: sum of grads)."""
        ...

    def all_gather_cat(self, tensor: Tensor) -> Tensor:
        """Concatenate every rank's ``tensor`` along dim 0 in rank order (equal sizes)."""
        ...


class LocalCollectives:
    """One process: every collective is the identity."""

    world_size = 1
    rank = 0

    def all_reduce_sum_(self, tensor: Tensor) -> Tensor:
        return tensor

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        return tensor

    def all_gather_cat(self, tensor: Tensor) -> Tensor:
        return tensor


class _AllReduceSum(torch.autograd.Function):
    """``all_reduce(SUM)`` that autograd differentiates in reverse and forward mode.

    The map is linear and each rank's loss is its share of the total, so the backward
    all-reduces the incoming gradient (itself differentiably, for double backward) and the
    JVP all-reduces the tangent.
    """

    @staticmethod
    def forward(tensor: Tensor, group) -> Tensor:  # type: ignore[override]
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.group = inputs[1]

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return _AllReduceSum.apply(grad, ctx.group), None

    @staticmethod
    def jvp(ctx, tangent: Tensor, _group_tangent) -> Tensor:  # type: ignore[override]
        out = tangent.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=ctx.group)
        return out


def all_reduce_sum(tensor: Tensor, group=None) -> Tensor:
    """Sum of ``tensor`` over the ranks of ``group``, differentiable in reverse and forward mode.

    The one differentiable all-reduce of the project: :class:`TorchCollectives` and
    ``l2w_dist.distributed.sync_bn.GlobalBatchNorm`` both use it.
    """
    return _AllReduceSum.apply(tensor, group)


class TorchCollectives:
    """Plain ``torch.distributed`` collectives on ``group`` (default: the world)."""

    def __init__(self, group=None):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("TorchCollectives needs an initialised torch.distributed process group")
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def all_reduce_sum_(self, tensor: Tensor) -> Tensor:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        return all_reduce_sum(tensor, self.group)

    def all_gather_cat(self, tensor: Tensor) -> Tensor:
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor, group=self.group)
        return torch.cat(parts, dim=0)


def default_collectives() -> Collectives:
    """TorchCollectives on the world group when one with more than one rank exists, else local."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return TorchCollectives()
    return LocalCollectives()
