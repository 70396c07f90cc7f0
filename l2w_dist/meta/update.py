"""The seam between the algorithm and whoever applies the real update.

The L2W step needs two things from "the optimizer": the state a *virtual* step reads
(hyper-parameters, momentum / Adam moments, step count, per parameter) and a way to
apply the *real* update (backward, step). A plain ``torch.optim`` optimizer provides
both through :class:`TorchOptimizerUpdate`; distributed backends (DeepSpeed ZeRO,
whose optimizer state is sharded) provide their own object with the same methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import torch
from torch import Tensor


@dataclass
class ParamOptState:
    """What one parameter's optimizer would use in its next step (full, unsharded tensors).

    ``step`` is the number of steps already taken (the next step is ``step + 1``).
    Buffers are ``None`` before they exist (SGD before its first step).
    """

    kind: Literal["sgd", "adamw"]
    lr: float
    weight_decay: float = 0.0
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    step: int = 0
    momentum_buffer: Tensor | None = None
    exp_avg: Tensor | None = None
    exp_avg_sq: Tensor | None = None


@runtime_checkable
class RealUpdate(Protocol):
    """Applies the real update and exposes the state the virtual step mimics."""

    def virtual_state(self, params: dict[str, Tensor]) -> dict[str, ParamOptState]:
        """Optimizer state for each named parameter (names as in ``module.named_parameters()``)."""
        ...

    def zero_grad(self) -> None: ...

    def backward(self, loss: Tensor) -> None: ...

    def step(self) -> None: ...


def _float(value) -> float:
    return float(value.item()) if isinstance(value, Tensor) else float(value)


def _param_state(optimizer: torch.optim.Optimizer, group: dict, state: dict, name: str) -> ParamOptState:
    if group.get("maximize", False):
        raise ValueError(f"maximize=True (parameter {name!r}) is not supported by the virtual step")
    if isinstance(optimizer, torch.optim.SGD):
        return ParamOptState(
            kind="sgd",
            lr=_float(group["lr"]),
            weight_decay=float(group["weight_decay"]),
            momentum=float(group["momentum"]),
            dampening=float(group["dampening"]),
            nesterov=bool(group["nesterov"]),
            momentum_buffer=state.get("momentum_buffer"),
        )
    is_adamw = isinstance(optimizer, torch.optim.AdamW)
    is_adam = type(optimizer) is torch.optim.Adam
    if is_adam and (group["weight_decay"] == 0 or group.get("decoupled_weight_decay", False)):
        is_adamw = True
    if is_adamw:
        if group.get("amsgrad", False):
            raise ValueError(f"amsgrad=True (parameter {name!r}) is not supported by the virtual step")
        step = state.get("step", 0)
        return ParamOptState(
            kind="adamw",
            lr=_float(group["lr"]),
            weight_decay=float(group["weight_decay"]),
            betas=(float(group["betas"][0]), float(group["betas"][1])),
            eps=float(group["eps"]),
            step=int(step.item()) if isinstance(step, Tensor) else int(step),
            exp_avg=state.get("exp_avg"),
            exp_avg_sq=state.get("exp_avg_sq"),
        )
    raise ValueError(
        f"optimizer {type(optimizer).__name__} is not supported by the virtual step; allowed: "
        "torch.optim.SGD, torch.optim.AdamW (and Adam without L2 weight decay), or a custom RealUpdate"
    )


class TorchOptimizerUpdate:
    """:class:`RealUpdate` over a ``torch.optim.SGD`` / ``AdamW`` (optionally clipping grads)."""

    def __init__(self, optimizer: torch.optim.Optimizer, grad_clip_norm: float | None = None):
        self.optimizer = optimizer
        self.grad_clip_norm = grad_clip_norm

    def virtual_state(self, params: dict[str, Tensor]) -> dict[str, ParamOptState]:
        """Read lr, hyper-parameters and buffers of SGD / AdamW (``Adam`` without L2 decay too).

        Parameters are matched to param groups by identity, so the names may be those of
        ``ddp.module`` while the optimizer was built on the wrapper's parameters.
        """
        group_of = {id(p): g for g in self.optimizer.param_groups for p in g["params"]}
        out: dict[str, ParamOptState] = {}
        for name, p in params.items():
            group = group_of.get(id(p))
            if group is None:
                raise ValueError(f"parameter {name!r} requires grad but is not in the optimizer")
            out[name] = _param_state(self.optimizer, group, self.optimizer.state.get(p, {}), name)
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
