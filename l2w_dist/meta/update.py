"""The seam between the algorithm and whoever applies the real update.

The L2W step needs four things from "the optimizer": the state a *virtual* step reads
(hyper-parameters, momentum / Adam moments, step count, per parameter), a way to apply
the *real* update (backward, step), the plain module behind the model it is given (for
``torch.func.functional_call``) and a ``no_sync()`` context for a forward whose backward
is not a training backward. A plain ``torch.optim`` optimizer provides the first two
through :class:`TorchOptimizerUpdate`, which the distributed backends build with the
wrapper's module and ``no_sync``; DeepSpeed ZeRO, whose optimizer state is sharded,
provides its own object with the same members.

Which torch optimizers the virtual step mimics is decided in one place,
:func:`optimizer_kind`, and their state is read by one translation, :func:`param_state`
(also used on the state DeepSpeed gathers from its shards): ``torch.optim.SGD``,
``torch.optim.AdamW``, and ``torch.optim.Adam`` when its update *is* AdamW's, i.e.
without L2 weight decay (``weight_decay=0``, or ``decoupled_weight_decay=True``). Adam
with L2 weight decay adds ``wd·θ`` to the gradient before the moments, a step the virtual
step does not implement, so it is refused, as are ``maximize`` and ``amsgrad``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import torch
from torch import Tensor, nn


@dataclass
class ParamOptState:
    """What one parameter's optimizer would use in its next step (full, unsharded tensors).

    ``step`` is the number of steps already taken (the next step is ``step + 1``; 0 for
    SGD, which keeps no count and does not need one). Buffers are ``None`` before they
    exist (SGD before its first step).

    ``lr`` and ``step`` are either host numbers or the optimizer's own 0-dim device tensors
    (:func:`device_hyperparameters`): the virtual step then reads the very tensors the real
    step reads, without copying them to the host (a capture-safe iteration).
    """

    kind: Literal["sgd", "adamw"]
    lr: float | Tensor
    weight_decay: float = 0.0
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    step: int | Tensor = 0
    momentum_buffer: Tensor | None = None
    exp_avg: Tensor | None = None
    exp_avg_sq: Tensor | None = None


class UnsupportedOptimizerError(TypeError, ValueError):
    """The virtual step cannot mimic this optimizer (its class or one of its settings).

    Both a TypeError (the wrong kind of optimizer) and a ValueError (a setting the step
    cannot use), so callers may catch either.
    """


def optimizer_kind(optimizer: torch.optim.Optimizer) -> Literal["sgd", "adamw"]:
    """ "sgd" or "adamw": the update the virtual step mimics for ``optimizer``; others are refused."""
    name = type(optimizer).__name__
    for group in optimizer.param_groups:
        for flag in ("maximize", "amsgrad"):
            if group.get(flag, False):
                raise UnsupportedOptimizerError(f"{name}({flag}=True) is not supported by the L2W virtual step")
    if isinstance(optimizer, torch.optim.SGD):
        return "sgd"
    if isinstance(optimizer, torch.optim.AdamW):
        return "adamw"
    if type(optimizer) is torch.optim.Adam:
        if all(g["weight_decay"] == 0 or g.get("decoupled_weight_decay", False) for g in optimizer.param_groups):
            return "adamw"  # the same update as AdamW's
        raise UnsupportedOptimizerError(
            "Adam with L2 weight decay (weight_decay > 0, decoupled_weight_decay=False) is not supported by "
            "the L2W virtual step; use torch.optim.AdamW, or Adam with weight_decay=0"
        )
    raise UnsupportedOptimizerError(
        f"optimizer {name} is not supported by the L2W virtual step; use torch.optim.SGD, torch.optim.AdamW "
        "(or Adam without L2 weight decay), or pass a custom RealUpdate"
    )


def param_state(kind: Literal["sgd", "adamw"], group: dict, state: dict) -> ParamOptState:
    """A :class:`ParamOptState` from a torch param group and one parameter's torch state.

    ``kind`` is :func:`optimizer_kind` of the optimizer; ``state`` holds the parameter's
    buffers (``momentum_buffer``, or ``exp_avg`` / ``exp_avg_sq`` / ``step``), possibly none yet.
    """
    lr = group["lr"] if isinstance(group["lr"], Tensor) else float(group["lr"])
    if kind == "sgd":
        return ParamOptState(
            kind="sgd",
            lr=lr,
            weight_decay=float(group.get("weight_decay", 0.0)),
            momentum=float(group.get("momentum", 0.0)),
            dampening=float(group.get("dampening", 0.0)),
            nesterov=bool(group.get("nesterov", False)),
            momentum_buffer=state.get("momentum_buffer"),
        )
    step = state.get("step")
    if isinstance(step, Tensor) and not (group.get("capturable") or group.get("fused")):
        # torch keeps a non-capturable step count in host memory by design: reading it is no
        # device sync, and a host number gives the bias corrections torch itself computes
        step = int(step.item())
    return ParamOptState(
        kind="adamw",
        lr=lr,
        weight_decay=float(group.get("weight_decay", 0.0)),
        betas=(float(group["betas"][0]), float(group["betas"][1])),
        eps=float(group["eps"]),
        step=0 if step is None else step if isinstance(step, Tensor) else int(step),
        exp_avg=state.get("exp_avg"),
        exp_avg_sq=state.get("exp_avg_sq"),
    )


class DeviceHyperparameters:
    """Make a torch optimizer step from device tensors only, as a captured CUDA graph needs.

    Each param group's lr becomes a 0-dim tensor on its parameters' device, which every
    step (and the virtual step, through :func:`param_state`) reads in place; SGD runs
    fused (torch's only SGD that reads a tensor lr without copying it to the host); Adam and
    AdamW run fused and capturable, with their step counts on the device, so the bias
    corrections are computed there. A schedule that writes plain numbers into the groups
    (timm's) is followed by :meth:`refresh`, which copies them into the tensors without a
    host sync. :meth:`apply` again after ``load_state_dict`` (it restores the saved groups).
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        if type(optimizer) not in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW):
            raise UnsupportedOptimizerError(
                f"{type(optimizer).__name__} cannot step from device tensors here; use torch.optim.SGD, Adam or AdamW"
            )
        self.optimizer = optimizer
        self.lrs: list[Tensor] = []
        self.apply()

    def apply(self) -> None:
        """(Re)install the flags, the lr tensors and device-resident step counts."""
        adam = not isinstance(self.optimizer, torch.optim.SGD)
        self.lrs = []
        for group in self.optimizer.param_groups:
            first = group["params"][0]
            dtype = torch.promote_types(first.dtype, torch.float32)
            lr = torch.tensor(float(group["lr"]), dtype=dtype, device=first.device)
            group.update(lr=lr, fused=True, foreach=False, differentiable=False)
            if adam:
                group["capturable"] = True
                for p in group["params"]:
                    state = self.optimizer.state.get(p, {})
                    if isinstance(state.get("step"), Tensor):
                        state["step"] = state["step"].to(device=p.device, dtype=torch.float32)
            self.lrs.append(lr)

    def refresh(self) -> None:
        """Copy numbers a scheduler wrote into the groups into the lr tensors (no host sync)."""
        for group, lr in zip(self.optimizer.param_groups, self.lrs):
            if group["lr"] is not lr:
                lr.fill_(group["lr"])
                group["lr"] = lr


@runtime_checkable
class RealUpdate(Protocol):
    """Applies the real update and exposes what the virtual step and the step's forwards need.

    ``module``: the plain ``nn.Module`` behind the model the L2W step calls forward on (for
    ``functional_call``), or ``None`` when that model is the plain module itself.
    ``no_sync()``: a context in which a forward through that model sets up no gradient
    synchronisation (DDP's ``no_sync``; a null context where there is nothing to suppress).
    Optional: ``step_with_grads(grads, params)`` (needed by ``real_weights="pre_update"``).
    """

    module: nn.Module | None

    def no_sync(self) -> contextlib.AbstractContextManager: ...

    def virtual_state(self, params: dict[str, Tensor]) -> dict[str, ParamOptState]:
        """Optimizer state for each named parameter (names as in ``module.named_parameters()``)."""
        ...

    def zero_grad(self) -> None: ...

    def backward(self, loss: Tensor) -> None: ...

    def step(self) -> None: ...


class TorchOptimizerUpdate:
    """:class:`RealUpdate` over a ``torch.optim`` optimizer (see :func:`optimizer_kind`), optionally clipping grads.

    ``module`` and ``no_sync``: those of the wrapper the model is called through (DDP:
    ``ddp.module`` and ``ddp.no_sync``); the defaults suit a plain model.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        grad_clip_norm: float | None = None,
        *,
        module: nn.Module | None = None,
        no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
    ):
        self.optimizer = optimizer
        self.grad_clip_norm = grad_clip_norm
        self.module = module
        self._no_sync = no_sync

    def no_sync(self) -> contextlib.AbstractContextManager:
        return self._no_sync() if self._no_sync is not None else contextlib.nullcontext()

    def virtual_state(self, params: dict[str, Tensor]) -> dict[str, ParamOptState]:
        """Read lr, hyper-parameters and buffers of every named parameter.

        Parameters are matched to param groups by identity, so the names may be those of
        ``ddp.module`` while the optimizer was built on the wrapper's parameters.
        """
        kind = optimizer_kind(self.optimizer)
        group_of = {id(p): g for g in self.optimizer.param_groups for p in g["params"]}
        out: dict[str, ParamOptState] = {}
        for name, p in params.items():
            group = group_of.get(id(p))
            if group is None:
                raise ValueError(f"parameter {name!r} requires grad but is not in the optimizer")
            out[name] = param_state(kind, group, self.optimizer.state.get(p, {}))
        return out

    def step_with_grads(self, grads: dict[str, Tensor], params: dict[str, Tensor]) -> None:
        """Real step from given gradients (``real_weights="pre_update"``: no second backward)."""
        for name, p in params.items():
            p.grad = grads[name].detach()
        self.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        if self.grad_clip_norm:
            params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip_norm)
        self.optimizer.step()
