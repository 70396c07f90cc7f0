"""What every model in the zoo is: a module returning K logits, with counted per-exit FLOPs."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


class MultiExitModel(nn.Module):
    """Base class for multi-exit networks.

    Subclasses set ``num_exits``, ``num_classes`` and ``input_size`` (C, H, W), implement
    ``forward(x) -> list[Tensor]`` (K tensors ``[B, num_classes]``, in exit order) and
    list their exit heads in ``self.exit_heads`` (an ``nn.ModuleList``, one per exit), so
    that the per-exit FLOPs can be counted: the cumulative cost of everything computed up
    to the moment the head of exit k has produced its logits, for one image.
    """

    num_exits: int
    num_classes: int
    input_size: tuple[int, int, int]
    exit_heads: nn.ModuleList

    @property
    def exit_flops(self) -> list[float]:
        """Cumulative multiply-adds per exit for one image at ``input_size`` (counted once, cached)."""
        cached = getattr(self, "_exit_flops_cache", None)
        if cached is None:
            cached = count_exit_flops(self, self.input_size)
            self._exit_flops_cache = cached
        return list(cached)


def count_exit_flops(model: MultiExitModel, input_size: tuple[int, ...]) -> list[float]:
    """Count cumulative multiply-adds at each exit head with ``torch.utils.flop_counter``.

    FlopCounterMode counts 2 FLOPs per multiply-add of convolutions and matrix products;
    the MSDNet/RANet papers report multiply-adds, hence the halving. A forward hook on
    each exit head reads the running total when that head finishes.
    """
    was_training = model.training
    model.eval()
    totals: list[float | None] = [None] * len(model.exit_heads)
    counter = FlopCounterMode(display=False)
    handles = []
    for k, head in enumerate(model.exit_heads):

        def hook(_mod, _inp, _out, k=k):
            totals[k] = counter.get_total_flops() / 2

        handles.append(head.register_forward_hook(hook))
    try:
        param = next(model.parameters())
        x = torch.zeros(1, *input_size, dtype=param.dtype, device=param.device)
        with torch.no_grad(), counter:
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if any(t is None for t in totals):
        raise RuntimeError(f"exit heads not all run during the forward of {type(model).__name__}: {totals}")
    return [float(t) for t in totals]
