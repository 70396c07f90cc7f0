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


class TorchOptimizerUpdate:
    """:class:`RealUpdate` over a ``torch.optim.SGD`` / ``AdamW`` (optionally clipping grads)."""

    def __init__(self, optimizer: torch.optim.Optimizer, grad_clip_norm: float | None = None):
        self.optimizer = optimizer
        self.grad_clip_norm = grad_clip_norm

    def virtual_state(self, params: dict[str, Tensor]) -> dict[str, ParamOptState]:
        raise NotImplementedError  # implemented with the meta-step (issue 8)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        if self.grad_clip_norm:
            params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip_norm)
        self.optimizer.step()
