"""The L2W-DEN algorithm (docs/algorithm.md §2), free of distribution backends, logging and I/O.

Entry points: ``L2WConfig``, ``WeightNet``, ``l2w_half_step``, ``l2w_iteration``.
"""

from .allocation import allocate_exits, meta_loss_from_allocation, target_counts, target_proportions
from .collectives import Collectives, LocalCollectives, TorchCollectives, all_reduce_sum, default_collectives
from .l2w import (
    L2WConfig,
    l2w_half_step,
    l2w_iteration,
    max_confidence,
    per_sample_ce,
    weight_net_input,
    weighted_loss,
)
from .update import (
    ParamOptState,
    RealUpdate,
    TorchOptimizerUpdate,
    UnsupportedOptimizerError,
    optimizer_kind,
    param_state,
)
from .virtual_step import step_derivative, virtual_step
from .weight_net import WeightNet, normalize_weights, wpn_features

__all__ = [
    "L2WConfig",
    "WeightNet",
    "l2w_half_step",
    "l2w_iteration",
    "target_proportions",
    "target_counts",
    "allocate_exits",
    "meta_loss_from_allocation",
    "normalize_weights",
    "wpn_features",
    "per_sample_ce",
    "max_confidence",
    "weighted_loss",
    "weight_net_input",
    "virtual_step",
    "step_derivative",
    "ParamOptState",
    "RealUpdate",
    "TorchOptimizerUpdate",
    "UnsupportedOptimizerError",
    "optimizer_kind",
    "param_state",
    "Collectives",
    "LocalCollectives",
    "TorchCollectives",
    "all_reduce_sum",
    "default_collectives",
]
