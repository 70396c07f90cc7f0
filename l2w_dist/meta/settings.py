"""What the L2W step does, declared once: the run config's ``meta`` section extends it.

The allowed choices live here, each once, as a ``Literal`` and the tuple of its values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from ..utils.settings import Check, Settings, above, at_least, in_range, setting

Constraint = Literal["mat", "col", "row"]
WpnInput = Literal["loss", "conf", "both"]
Hypergrad = Literal["jvp", "autograd", "finite_difference"]
Sync = Literal["global", "local"]
RealWeights = Literal["updated", "pre_update"]

CONSTRAINTS: tuple[str, ...] = get_args(Constraint)
WPN_INPUTS: tuple[str, ...] = get_args(WpnInput)
HYPERGRADS: tuple[str, ...] = get_args(Hypergrad)
SYNCS: tuple[str, ...] = get_args(Sync)
REAL_WEIGHTS: tuple[str, ...] = get_args(RealWeights)


@dataclass
class L2WSettings(Settings):
    """The L2W step's settings that a run config sets in its ``meta`` section.

    The defaults are the paper's CIFAR setting (ε=0.8, ``col``); its ImageNet setting is
    ε=0.3, ``mat`` (configs/imagenet/ say so).
    """

    epsilon: float = setting(0.8, at_least(0))  # w = 1 + ε (t - mean t), docs/algorithm.md §2.1
    constraint: Constraint = setting("col")  # the mean over the B x K matrix, per sample, per exit
    input: WpnInput = setting("loss")  # what the weight net sees: losses, confidences or both
    target_p_index: int = setting(15, Check(lambda v: 1 <= v <= 39, "an integer in 1..39 (p = index / 20)"))
    hypergrad: Hypergrad = setting("jvp")  # the engine for ∂meta/∂φ, docs/algorithm.md §3
    fd_step: float = setting(1e-3, above(0))  # finite_difference: L2 norm of the perturbation of θ
    sync: Sync = setting("global")  # local: the released per-GPU behaviour, docs/algorithm.md §4
    real_weights: RealWeights = setting("updated")  # pre_update: step with the pseudo-step gradient
    # with real_weights=pre_update, re-use the first half step's meta forward as the second half
    # step's train forward (docs/algorithm.md §2.5)
    reuse_meta_forward: bool = setting(True, free=True)

    @property
    def p(self) -> float:
        """The target exit-allocation parameter (docs/algorithm.md §2.3)."""
        return self.target_p_index / 20


@dataclass
class L2WConfig(L2WSettings):
    """Everything one L2W step needs: :class:`L2WSettings` and the train loss's label smoothing
    (a run config's ``optim.label_smoothing``; the run config's ``MetaConfig.l2w`` builds one)."""

    label_smoothing: float = setting(0.0, in_range(0, 1))
