"""Full, per-parameter optimizer state out of DeepSpeed's ZeRO-1/2 partitions (and back).

How ZeRO stages 1 and 2 lay the state out (DeepSpeed 0.19, ``DeepSpeedZeroOptimizer``):
for each param group ``i`` the model parameters (``round_robin_bit16_groups[i]``) are
flattened, in that order and at ``round_robin_bit16_offsets[i]``, into one buffer whose
length is padded to a multiple of the data-parallel size; rank r owns the equal-size
slice ``[r·P, (r+1)·P)`` of it. The fp32 master copy of that slice is
``single_partition_of_fp32_groups[i]``, and the *base* (torch) optimizer holds one flat
parameter per group — that slice — so its ``state`` (``momentum_buffer`` for SGD,
``exp_avg`` / ``exp_avg_sq`` / ``step`` for AdamW) is the rank's shard of every
per-parameter buffer, elementwise identical to what the torch optimizer would hold for
the same parameters (SGD and AdamW are elementwise).

So one ``all_gather_into_tensor`` per group and buffer rebuilds the full flat buffer on
every rank, and each parameter's buffer is a view at its offset. This costs |θ| floats
per buffer (SGD: one, AdamW: two) — the size of one gradient all-reduce — once per meta
step, and the gathered copy lives only for that step.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from l2w_dist.distributed.utils import parameter_names
from l2w_dist.meta.update import ParamOptState, param_state

_BUFFERS = {"sgd": ("momentum_buffer",), "adamw": ("exp_avg", "exp_avg_sq")}


class ZeroStateView:
    """Reads and writes the full per-parameter state of a ``DeepSpeedZeroOptimizer`` (stages 1, 2).

    ``module`` gives the parameter names; ``kind`` is
    :func:`~l2w_dist.meta.update.optimizer_kind` of the base optimizer.
    """

    def __init__(self, zero_optimizer, module: nn.Module, kind: str):
        for attr in (
            "single_partition_of_fp32_groups",
            "round_robin_bit16_groups",
            "round_robin_bit16_offsets",
            "partition_size",
            "real_dp_process_group",
        ):
            if not hasattr(zero_optimizer, attr):
                raise TypeError(
                    f"{type(zero_optimizer).__name__} lacks {attr}: not a DeepSpeed ZeRO-1/2 optimizer "
                    "(this DeepSpeed version's layout is not the one this code was written for)"
                )
        self.zero = zero_optimizer
        self.kind = kind
        self.name_of = parameter_names(module)

    @property
    def base(self) -> torch.optim.Optimizer:
        return self.zero.optimizer

    def _layout(self, i: int) -> Iterator[tuple[str, int, int, torch.Size]]:
        for p, off in zip(self.zero.round_robin_bit16_groups[i], self.zero.round_robin_bit16_offsets[i]):
            if id(p) not in self.name_of:
                raise KeyError("a parameter optimised by DeepSpeed is not a parameter of the module")
            yield self.name_of[id(p)], off, p.numel(), p.shape

    def _gather(self, i: int, shard: Tensor) -> Tensor:
        group = self.zero.real_dp_process_group[i]
        world = dist.get_world_size(group=group)
        full = shard.new_empty(world * shard.numel())
        dist.all_gather_into_tensor(full, shard.contiguous(), group=group)
        return full

    def full_state(self, names: set[str] | None = None) -> dict[str, ParamOptState]:
        """Every parameter's full state (one all-gather per group and buffer; collective: call on all ranks).

        Translated by :func:`~l2w_dist.meta.update.param_state`, as a torch optimizer's own
        state is: AdamW's step count is the shard's, SGD keeps none.
        """
        out: dict[str, ParamOptState] = {}
        for i, flat in enumerate(self.zero.single_partition_of_fp32_groups):
            group = self.base.param_groups[i]
            st = self.base.state.get(flat, {})
            fulls = {b: self._gather(i, st[b]) if st.get(b) is not None else None for b in _BUFFERS[self.kind]}
            for name, off, numel, shape in self._layout(i):
                if names is not None and name not in names:
                    continue
                bufs = {b: None if f is None else f[off : off + numel].view(shape) for b, f in fulls.items()}
                out[name] = param_state(self.kind, group, {**bufs, "step": st.get("step")})
        return out

    def load_full_state(self, per_param: dict[str, dict[str, Tensor]], step: int) -> None:
        """Set this rank's shards from full per-parameter buffers (each rank keeps its own slice)."""
        for i, flat in enumerate(self.zero.single_partition_of_fp32_groups):
            group = self.zero.real_dp_process_group[i]
            rank, size = dist.get_rank(group=group), self.zero.partition_size[i]
            for b in _BUFFERS[self.kind]:
                have = [n for n, *_ in self._layout(i) if b in per_param.get(n, {})]
                if not have:
                    continue
                full = torch.zeros(size * dist.get_world_size(group=group), dtype=flat.dtype, device=flat.device)
                for name, off, numel, _shape in self._layout(i):
                    if b in per_param.get(name, {}):
                        full[off : off + numel] = per_param[name][b].reshape(-1).to(full)
                st = self.base.state.setdefault(flat, {})
                st[b] = full[rank * size : (rank + 1) * size].clone()
            if self.kind == "adamw" and step:
                self.base.state.setdefault(flat, {})["step"] = torch.tensor(float(step))
