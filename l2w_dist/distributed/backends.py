"""Training backends: how the real update is applied across ranks, behind one small interface.

The trainer and the L2W step need four things from "the backend": a module to call
forward on (``model``: DDP / DeepSpeed engine / the plain module, so that gradient
reduction is set up), the unwrapped module (``module``: state dicts and
``torch.func.functional_call``), a :class:`~l2w_dist.meta.update.RealUpdate`
(``update``: the optimizer state the virtual step mimics, backward / step, and the
wrapper's plain module and ``no_sync``, so the algorithm never inspects wrappers), and
learning-rate and checkpoint access. Everything DeepSpeed-specific is in
:mod:`l2w_dist.distributed.deepspeed`; the algorithm never imports it.

Kinds: ``none`` (one process, or DDP-free debugging), ``ddp`` (torch
DistributedDataParallel: gloo on CPU, NCCL on GPU) and ``deepspeed`` (ZeRO stage 0, 1
or 2; stage 3 is refused, see :data:`ZERO3_REFUSAL`).

Checkpoints are portable: every backend's ``optimizer_state_dict()`` has the format of
``torch.optim.Optimizer.state_dict()`` over the module's parameters in the original
param-group order — DeepSpeed's sharded state is gathered into it — so a run can
resume under another backend or another number of ranks.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from l2w_dist.distributed.env import DistEnv
from l2w_dist.distributed.sync_bn import convert_sync_batchnorm
from l2w_dist.distributed.utils import process_group_ready
from l2w_dist.meta.update import RealUpdate, TorchOptimizerUpdate, optimizer_kind
from l2w_dist.utils import autocast

KINDS = ("none", "ddp", "deepspeed")
PRECISIONS = ("fp32", "bf16")


class TrainBackend:
    """What the trainer and the L2W step use; see the module docstring.

    Attributes: ``model`` (call forward on it), ``module`` (the unwrapped model),
    ``update`` (a :class:`RealUpdate`), ``env``, ``kind``, ``precision``.
    """

    kind: str = "none"

    def __init__(self, model: nn.Module, module: nn.Module, update: RealUpdate, env: DistEnv, precision: str = "fp32"):
        self.model = model
        self.module = module
        self.update = update
        self.env = env
        self.precision = precision

    # -- learning rate ---------------------------------------------------------------
    def _param_groups(self) -> list[dict[str, Any]]:
        return self.update.optimizer.param_groups  # type: ignore[attr-defined]

    def set_lr(self, lr: float) -> None:
        """Set the learning rate of every param group (the trainer's schedule calls this each step)."""
        for g in self._param_groups():
            g["lr"] = lr

    def get_lr(self) -> float:
        return float(self._param_groups()[0]["lr"])

    # -- checkpoints -------------------------------------------------------------------
    def optimizer_state_dict(self) -> dict:
        """``torch.optim``-format state dict (full, unsharded; identical on every rank)."""
        return self.update.optimizer.state_dict()  # type: ignore[attr-defined]

    def load_optimizer_state_dict(self, sd: dict) -> None:
        self.update.optimizer.load_state_dict(sd)  # type: ignore[attr-defined]

    # -- numerics ------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast context for forwards outside ``model`` (functional calls of the L2W step)."""
        return autocast(self.env.device, self.precision)


class PlainBackend(TrainBackend):
    kind = "none"


class DDPBackend(TrainBackend):
    kind = "ddp"


def build_backend(
    kind: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    env: DistEnv,
    zero_stage: int = 0,
    grad_clip: float | None = None,
    precision: str = "fp32",
    sync_batchnorm: bool = False,
    micro_batch_size: int = 1,
    deepspeed_overrides: dict | None = None,
) -> TrainBackend:
    """Wrap ``model`` and ``optimizer`` (built over ``model.parameters()``) for training.

    ``kind``: "none" | "ddp" | "deepspeed". ``zero_stage`` (deepspeed only): 0, 1 or 2.
    ``sync_batchnorm`` replaces BatchNorm layers by :class:`~l2w_dist.distributed.sync_bn.GlobalBatchNorm`
    (statistics over all ranks, in every forward of the L2W step, on CPU and GPU).
    The model is moved to ``env.device``.
    """
    if kind not in KINDS:
        raise ValueError(f"backend kind={kind!r}; expected one of {KINDS}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; expected one of {PRECISIONS}")
    if kind == "deepspeed":
        from l2w_dist.distributed.deepspeed import ZERO3_REFUSAL, ZERO_STAGES

        if zero_stage == 3:
            raise ValueError(ZERO3_REFUSAL)
        if zero_stage not in ZERO_STAGES:
            raise ValueError(f"zero_stage={zero_stage!r}; expected one of {ZERO_STAGES} (3 is refused with L2W)")
    elif zero_stage != 0:
        raise ValueError(f"zero_stage={zero_stage} is a DeepSpeed setting; kind={kind!r} takes zero_stage=0")
    optimizer_kind(optimizer)  # refuses optimizers the virtual step cannot mimic
    if sync_batchnorm:
        model = convert_sync_batchnorm(model)
    model.to(env.device)
    if kind == "none":
        return PlainBackend(model, model, TorchOptimizerUpdate(optimizer, grad_clip), env, precision)

    if not process_group_ready():
        raise RuntimeError(
            f"backend kind={kind!r} needs an initialised process group (launch with torchrun or srun "
            "and call l2w_dist.distributed.init_distributed()); for a single process use kind='none'"
        )
    if kind == "ddp":
        device_ids = [env.device.index] if env.device.type == "cuda" else None
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        update = TorchOptimizerUpdate(optimizer, grad_clip, module=model, no_sync=ddp.no_sync)
        return DDPBackend(ddp, model, update, env, precision)

    from l2w_dist.distributed.deepspeed import build_deepspeed_backend

    return build_deepspeed_backend(
        model,
        optimizer,
        env=env,
        zero_stage=zero_stage,
        grad_clip=grad_clip,
        precision=precision,
        micro_batch_size=micro_batch_size,
        overrides=deepspeed_overrides,
    )


__all__ = ["KINDS", "DDPBackend", "PlainBackend", "TrainBackend", "build_backend"]
