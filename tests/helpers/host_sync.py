"""A detector of host synchronisation: fails on any read of a tensor's value by the host.

On a GPU each of these waits for the device (``.item()``, ``.tolist()``, ``.cpu()``,
``.numpy()``, ``bool`` / ``float`` / ``int`` / index conversion, printing a tensor) or needs
a result whose shape depends on the data (``nonzero``, ``masked_select``, ``unique``,
``bincount``, boolean-mask indexing, one-argument ``where``). Inside :class:`NoHostSync`
any of them raises :class:`HostSyncError`, so a CPU test proves that a code path would
queue on the device without ever waiting for it (and could be captured as a CUDA graph).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

HOST_READS = {
    "item",
    "tolist",
    "cpu",
    "numpy",
    "__bool__",
    "__float__",
    "__int__",
    "__index__",
    "__complex__",
    "__repr__",
    "__format__",
    "__str__",
}
DATA_DEPENDENT_SHAPE = {"nonzero", "masked_select", "unique", "unique_consecutive", "argwhere", "bincount"}


class HostSyncError(AssertionError):
    """A host read of a tensor value (or a data-dependent shape) inside :class:`NoHostSync`."""


class NoHostSync(TorchFunctionMode):
    """Raise on any host read of a tensor. ``allowed``: tensors that live in host memory by
    design on every device (torch's non-capturable optimizer step counts), whose reads are
    no device sync."""

    def __init__(self, allowed: Iterable[Tensor] = ()):
        super().__init__()
        self.allowed = {id(t) for t in allowed}
        self.seen = 0  # calls inspected: a detector that saw nothing proves nothing

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.seen += 1
        name = getattr(func, "__name__", "")
        first = args[0] if args else None
        exempt = isinstance(first, Tensor) and id(first) in self.allowed
        if name in HOST_READS and not exempt:
            raise HostSyncError(f"host read: Tensor.{name}")
        if name in DATA_DEPENDENT_SHAPE:
            raise HostSyncError(f"data-dependent shape: {name}")
        if name == "repeat_interleave" and kwargs.get("output_size") is None:
            raise HostSyncError("data-dependent shape: repeat_interleave without output_size")
        if name == "where" and len(args) + len(kwargs) == 1:
            raise HostSyncError("data-dependent shape: one-argument where")
        if name in ("__getitem__", "__setitem__") and _has_mask(args[1] if len(args) > 1 else None):
            raise HostSyncError(f"data-dependent shape: boolean-mask {name}")
        return func(*args, **kwargs)


def _has_mask(index) -> bool:
    if isinstance(index, Tensor):
        return index.dtype in (torch.bool, torch.uint8)
    if isinstance(index, (tuple, list)):
        return any(_has_mask(i) for i in index)
    return False


def host_step_counts(*optimizers: torch.optim.Optimizer) -> list[Tensor]:
    """The step counts torch keeps in host memory (non-capturable, non-fused groups)."""
    out = []
    for opt in optimizers:
        for group in opt.param_groups:
            if group.get("capturable") or group.get("fused"):
                continue
            for p in group["params"]:
                step = opt.state.get(p, {}).get("step")
                if isinstance(step, Tensor):
                    out.append(step)
    return out
