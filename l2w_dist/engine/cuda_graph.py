"""The training iteration replayed as a captured CUDA graph (``train.cuda_graph``).

An L2W iteration of MSDNet launches thousands of small kernels; on a fast GPU the host
cannot queue them as fast as the device runs them. Captured once as a CUDA graph, the
whole iteration is replayed by one call. This needs an iteration that never waits for the
device (the L2W iteration and the plain step are written so: no ``.item()``, no
data-dependent shapes, statistics kept on the device, optimizer lr and step counts as
device tensors, :class:`~l2w_dist.meta.update.DeviceHyperparameters`) and fixed input
shapes. :class:`GraphedIteration` runs a few eager warm-up iterations per kind (meta step
or not) on a side stream, captures each kind once, and afterwards copies every batch into
the captured input buffers and replays. A batch of another shape (a short last batch) runs
eagerly; where capture fails, one line says why and training goes on eagerly.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch
from torch import Tensor

from ..utils.settings import ConfigError

Iteration = Callable[[Tensor, Tensor, Hashable], dict[str, Tensor]]


def check_cuda_graph(device: torch.device, backend: str, compile: bool) -> None:
    """Refuse ``train.cuda_graph=true`` where it cannot work: one line with the reason."""
    if device.type != "cuda" or not torch.cuda.is_available():
        raise ConfigError(
            f"train.cuda_graph=true needs a CUDA device; this run trains on {device.type} (set train.cuda_graph=false)"
        )
    if backend != "none":
        raise ConfigError(
            f"train.cuda_graph=true is not supported with dist.backend={backend}: the gradient and L2W "
            "collectives across ranks are not captured (every rank would have to replay its NCCL calls in "
            "lockstep inside the graph); train on one GPU or set train.cuda_graph=false"
        )
    if compile:
        raise ConfigError(
            "train.cuda_graph=true with train.compile=true: choose one (torch.compile captures its own "
            "graphs with mode='reduce-overhead')"
        )


class GraphedIteration:
    """``fn(x, y, kind)`` eagerly for ``warmup`` calls per ``kind``, then captured once per
    kind and replayed with ``x``, ``y`` copied into the captured input buffers.

    ``fn`` must be capture-safe and return a dict of device tensors. After a replay those are
    the graph's output buffers, overwritten by the next replay: read them before the next
    call. All graphs share one memory pool (only their outputs outlive a replay, and they
    are read at once). ``log`` receives the one-line fallback message.
    """

    def __init__(self, fn: Iteration, warmup: int = 3, log: Callable[[str], None] = print):
        self.fn, self.warmup, self.log = fn, warmup, log
        self.calls: dict[Hashable, int] = {}
        self.graphs: dict[Hashable, tuple[Callable[[], None], Tensor, Tensor, dict[str, Tensor]]] = {}
        self.failed: str | None = None  # why capture failed; eager from then on
        self._pool = None

    def __call__(self, x: Tensor, y: Tensor, kind: Hashable) -> dict[str, Tensor]:
        if self.failed is not None:
            return self.fn(x, y, kind)
        if kind in self.graphs:
            replay, sx, sy, out = self.graphs[kind]
            if not (_fits(sx, x) and _fits(sy, y)):
                return self.fn(x, y, kind)  # another shape than captured: eager
            sx.copy_(x)
            sy.copy_(y)
            replay()
            return out
        self.calls[kind] = self.calls.get(kind, 0) + 1
        if self.calls[kind] <= self.warmup:
            return self._warm_up(x, y, kind)
        sx, sy = x.clone(), y.clone()  # the static inputs (clone keeps the memory format)
        try:
            replay, out = self.record(sx, sy, kind)
        except Exception as err:  # capture is impossible here: say why once, then train eagerly
            first_line = (str(err).strip().splitlines() or [""])[0]
            self.failed = f"{type(err).__name__}: {first_line}"
            self.log(f"train.cuda_graph: capturing the iteration failed ({self.failed}); training continues eagerly")
            return self.fn(x, y, kind)
        self.graphs[kind] = (replay, sx, sy, out)
        replay()  # capture records the iteration without running it: this call's iteration
        return out

    def _warm_up(self, x: Tensor, y: Tensor, kind: Hashable) -> dict[str, Tensor]:
        """Eager, on a side stream on CUDA (as torch asks before a capture: lazy state such as
        optimizer buffers and cuBLAS workspaces is created outside the graph)."""
        if x.device.type != "cuda":
            return self.fn(x, y, kind)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = self.fn(x, y, kind)
        torch.cuda.current_stream().wait_stream(side)
        return out

    def record(self, sx: Tensor, sy: Tensor, kind: Hashable) -> tuple[Callable[[], None], dict[str, Tensor]]:
        """Capture ``fn`` on the static inputs; returns the replay and the output buffers."""
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self.fn(sx, sy, kind)
        return graph.replay, out


def _fits(static: Tensor, batch: Tensor) -> bool:
    return static.shape == batch.shape and static.dtype == batch.dtype and static.stride() == batch.stride()
