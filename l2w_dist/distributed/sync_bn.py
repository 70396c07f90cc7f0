"""BatchNorm whose batch statistics span all ranks — on CPU, under autograd and under forward-mode AD.

Why not ``torch.nn.SyncBatchNorm``: it refuses CPU tensors (so gloo runs cannot use
it), and its autograd Function has no forward-mode rule, so the ``jvp`` hypergradient
engine (a ``torch.func.jvp`` through the train-half forward) fails on it. This module
computes the same thing from plain tensor ops plus one differentiable all-reduce whose
backward and JVP are all-reduces too (:func:`l2w_dist.meta.collectives.all_reduce_sum`).
With it, every forward of the L2W step — the real one, the pseudo step, the meta forward
at θ′ and the JVP — sees the statistics of the *global* batch, so N ranks compute what
one process computes on the concatenated batch.

Semantics of the gradients ("total loss" convention, as torch's SyncBatchNorm): the
backward of the all-reduce all-reduces the incoming gradient, so after each rank
back-propagates its own loss and DDP averages the parameter gradients, the result is the
gradient of the mean of the rank losses through the shared statistics.

Without a process group (or with world size 1) it is exactly ``BatchNorm``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from l2w_dist.distributed.utils import world_size
from l2w_dist.meta.collectives import all_reduce_sum


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the batch of all ranks in ``process_group`` (any input rank ≥ 2).

    Statistics are two-pass (mean, then mean squared deviation) with two all-reduces of
    C+1 and C numbers per layer; ranks may hold different batch sizes. Running statistics
    are updated in place on the module's buffers, so ``functional_call`` with scratch
    buffers keeps them untouched, as for ``nn.BatchNorm``.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group=None,
        device=None,
        dtype=None,
    ):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"GlobalBatchNorm expects at least 2D input (N, C, ...), got {input.dim()}D")

    def _synced(self) -> bool:
        return world_size(self.process_group) > 1

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        use_batch_stats = self.training or not self.track_running_stats
        if not use_batch_stats or not self._synced():
            return super().forward(input)

        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)

        # statistics in fp32 at least: under bf16/fp16 autocast the sums would lose precision
        x = input.float() if input.dtype in (torch.float16, torch.bfloat16) else input
        dims = [0] + list(range(2, x.dim()))
        count_local = x.numel() // x.shape[1]
        head = torch.cat([x.sum(dims), x.new_full((1,), float(count_local))])
        head = all_reduce_sum(head, self.process_group)
        count = head[-1].detach()
        mean = head[:-1] / count
        shape = [1, -1] + [1] * (x.dim() - 2)
        centred = x - mean.view(shape)
        var = all_reduce_sum((centred * centred).sum(dims), self.process_group) / count
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        out = out.to(input.dtype)

        if self.training and self.track_running_stats:
            with torch.no_grad():
                n = float(count)
                unbiased = var.detach() * (n / max(n - 1.0, 1.0))
                self.running_mean.mul_(1 - momentum).add_(mean.detach().to(self.running_mean), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased.to(self.running_var), alpha=momentum)
        return out


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Replace every ``BatchNorm{1,2,3}d`` (and ``SyncBatchNorm``) in ``module`` by :class:`GlobalBatchNorm`.

    Parameters and buffers are *moved*, not copied: the new layers hold the same
    ``Parameter`` objects, so an optimizer built before the conversion stays valid.
    """
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        new = GlobalBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            process_group,
        )
        if module.affine:
            new.weight = module.weight
            new.bias = module.bias
        new.running_mean = module.running_mean
        new.running_var = module.running_var
        new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        new_child = convert_sync_batchnorm(child, process_group)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


__all__ = ["GlobalBatchNorm", "convert_sync_batchnorm"]
