"""What every model in the zoo is: a module returning K logits, with counted per-exit FLOPs,
that can also run stage by stage for the samples still active (real early exit)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.flop_counter import FlopCounterMode

FLOP_CONVENTIONS = ("macs", "op_counter")


@dataclass
class StageState:
    """What the stages after exit k need from the stages before it, for a batch of samples.

    ``tensors`` is any nesting of lists, tuples and dicts whose leaves are batch-first
    tensors (the same batch size everywhere). :meth:`select` is the one compaction
    mechanism of the stepwise forward: the samples that leave are dropped from every
    carried tensor before the next stage runs.
    """

    tensors: Any

    @property
    def batch_size(self) -> int:
        return tree_leaves(self.tensors)[0].shape[0]

    def select(self, keep: Tensor) -> StageState:
        """The samples where ``keep`` is true (a bool mask ``[B]``) or at ``keep`` (int64 indices)."""
        index = keep.nonzero().squeeze(1) if keep.dtype == torch.bool else keep
        return StageState(tree_map(lambda t: t.index_select(0, index), self.tensors))


class MultiExitModel(nn.Module):
    """Base class for multi-exit networks.

    Subclasses set ``num_exits``, ``num_classes`` and ``input_size`` (C, H, W), implement
    ``forward(x) -> list[Tensor]`` (K tensors ``[B, num_classes]``, in exit order) and
    list their exit heads in ``self.exit_heads`` (an ``nn.ModuleList``, one per exit), so
    that the per-exit FLOPs can be counted: the cumulative cost of everything computed up
    to the moment the head of exit k has produced its logits, for one image.

    ``flop_convention`` says what is counted (see :func:`count_exit_flops`): ``"macs"``
    (multiply-adds of convolutions and matrix products, the default) or ``"op_counter"``
    (additionally the element operations the MSDNet/RANet papers' ``op_counter.py``
    counts, so that the figures are comparable with theirs).
    """

    num_exits: int
    num_classes: int
    input_size: tuple[int, int, int]
    exit_heads: nn.ModuleList
    flop_convention: str = "macs"

    def stages(self) -> int:
        """Number of stages of the stepwise forward (one per exit)."""
        return self.num_exits

    def begin(self, x: Tensor) -> StageState:
        """The state stage 0 starts from. The model's forward pre-hooks (e.g. the uint8
        input normaliser of ``data.normalize_on=device``) run first, as they do for ``forward``."""
        for hook in self._forward_pre_hooks.values():
            result = hook(self, (x,))
            if result is not None:
                x = result[0] if isinstance(result, tuple) else result
        return StageState(self._begin(x))

    def step(self, k: int, state: StageState) -> tuple[Tensor, StageState]:
        """Run stage ``k`` (0-based) on the samples of ``state``: exit k's logits ``[B, C]``
        and the state stage k+1 starts from (empty after the last stage)."""
        if not 0 <= k < self.num_exits:
            raise IndexError(f"stage {k} out of range; {type(self).__name__} has {self.num_exits} stages")
        logits, tensors = self._step(k, state.tensors)
        return logits, StageState(tensors if k < self.num_exits - 1 else [])

    def _begin(self, x: Tensor) -> Any:
        raise NotImplementedError(f"{type(self).__name__} has no stepwise forward (_begin/_step); see docs/models.md")

    def _step(self, k: int, tensors: Any) -> tuple[Tensor, Any]:
        raise NotImplementedError(f"{type(self).__name__} has no stepwise forward (_begin/_step); see docs/models.md")

    def forward(self, x: Tensor) -> list[Tensor]:
        """Every exit's logits: each stage in turn on the whole batch."""
        tensors = self._begin(x)
        logits = []
        for k in range(self.num_exits):
            out, tensors = self._step(k, tensors)
            logits.append(out)
        return logits

    @property
    def exit_flops(self) -> list[float]:
        """Cumulative multiply-adds per exit for one image at ``input_size`` (counted once, cached)."""
        cached = getattr(self, "_exit_flops_cache", None)
        if cached is None:
            cached = count_exit_flops(self, self.input_size)
            self._exit_flops_cache = cached
        return list(cached)


def _op_counter_extra(module: nn.Module, out: torch.Tensor) -> int:
    """Operations the official MSDNet/RANet ``op_counter.py`` adds on top of conv/linear
    multiply-adds: one per ReLU output element, ``k*k`` per pooled output element, one per
    element of an adaptive-average-pool input (added after the forward, from shapes only),
    one per linear bias add. Returns 0 for every other module."""
    if isinstance(module, nn.ReLU):
        return out.numel()
    if isinstance(module, (nn.AvgPool2d, nn.MaxPool2d)):
        k = module.kernel_size
        kh, kw = (k, k) if isinstance(k, int) else k
        return out.numel() * kh * kw
    if isinstance(module, nn.Linear) and module.bias is not None:
        return out.numel()
    return 0


def count_exit_flops(model: MultiExitModel, input_size: tuple[int, ...], convention: str | None = None) -> list[float]:
    """Count cumulative multiply-adds at each exit head with ``torch.utils.flop_counter``.

    FlopCounterMode counts 2 FLOPs per multiply-add of convolutions and matrix products;
    the MSDNet/RANet papers report multiply-adds, hence the halving. A forward hook on
    each exit head reads the running total when that head finishes.

    With the ``"op_counter"`` convention (``convention``, by default
    ``model.flop_convention``) forward hooks on ReLU, pooling and
    linear modules add the extra element operations of the papers' counter (see
    :func:`_op_counter_extra`); adaptive average pooling adds one per input element.
    Convolution biases are not counted, as in that counter.
    """
    if convention is None:
        convention = getattr(model, "flop_convention", "macs")
    if convention not in FLOP_CONVENTIONS:
        raise ValueError(f"unknown flop_convention {convention!r}; allowed values: {list(FLOP_CONVENTIONS)}")
    was_training = model.training
    model.eval()
    totals: list[float | None] = [None] * len(model.exit_heads)
    extra = [0]
    counter = FlopCounterMode(display=False)
    handles = []
    for k, head in enumerate(model.exit_heads):

        def hook(_mod, _inp, _out, k=k):
            totals[k] = counter.get_total_flops() / 2 + extra[0]

        handles.append(head.register_forward_hook(hook))
    if convention == "op_counter":
        for mod in model.modules():
            if isinstance(mod, nn.AdaptiveAvgPool2d):

                def pool_hook(_mod, inp, _out):
                    extra[0] += inp[0].numel()

                handles.append(mod.register_forward_hook(pool_hook))
            elif isinstance(mod, (nn.ReLU, nn.AvgPool2d, nn.MaxPool2d, nn.Linear)):

                def extra_hook(mod, _inp, out):
                    extra[0] += _op_counter_extra(mod, out)

                handles.append(mod.register_forward_hook(extra_hook))
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
