"""The weight prediction network (WPN) of L2W-DEN and the normalisation of its output.

The WPN maps what we know about a training sample (its K detached per-exit losses and/or
max-softmax confidences) to K raw scores in (-1, 1). The L2W step — not the network —
turns raw scores ``t`` into sample weights ``w = 1 + eps * (t - mean(t))``, so any module
producing K scores in (-1, 1) can serve as a weight net (docs/algorithm.md §2.1).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .collectives import Collectives
from .settings import CONSTRAINTS, WPN_INPUTS


class WeightNet(nn.Module):
    """MLP ``Linear(in,H)+ReLU, (L-1)x[Linear(H,H)+ReLU], Linear(H,K), tanh``.

    ``input`` says what the step feeds it: ``"loss"`` (K losses, the paper's default),
    ``"conf"`` (K confidences) or ``"both"`` (2K features, losses first).
    """

    def __init__(self, num_exits: int, hidden: int = 500, layers: int = 1, input: str = "loss"):
        super().__init__()
        if input not in WPN_INPUTS:
            raise ValueError(f"WeightNet input={input!r} is not one of {WPN_INPUTS}")
        if num_exits < 1 or hidden < 1 or layers < 1:
            raise ValueError(f"WeightNet needs num_exits, hidden, layers >= 1; got {num_exits}, {hidden}, {layers}")
        self.num_exits = num_exits
        self.input = input
        in_features = num_exits * (2 if input == "both" else 1)
        blocks: list[nn.Module] = [nn.Linear(in_features, hidden), nn.ReLU()]
        for _ in range(layers - 1):
            blocks += [nn.Linear(hidden, hidden), nn.ReLU()]
        blocks += [nn.Linear(hidden, num_exits), nn.Tanh()]
        self.mlp = nn.Sequential(*blocks)

    def forward(self, features: Tensor) -> Tensor:
        return self.mlp(features)


def normalize_weights(
    scores: Tensor, epsilon: float, constraint: str, collectives: Collectives | None = None
) -> Tensor:
    """``w = 1 + eps * (t - mean t)``; the mean is over the B x K matrix (``mat``), per sample
    across exits (``col``) or per exit across the batch (``row``).

    With ``collectives`` (global sync), ``mat`` and ``row`` means run over the global batch
    through an autograd-aware all-reduce, so the gradient to the weight net also sees the
    other ranks' samples (equal per-rank batch sizes are assumed). ``col`` is per sample and
    needs no communication.
    """
    if constraint == "col":
        centre = scores.mean(dim=1, keepdim=True)
    elif constraint in ("mat", "row"):
        world = 1 if collectives is None else collectives.world_size
        col_sums = scores.sum(dim=0)
        if collectives is not None and world > 1:
            col_sums = collectives.all_reduce_sum(col_sums)
        per_exit = col_sums / (scores.shape[0] * world)
        centre = per_exit.mean() if constraint == "mat" else per_exit.unsqueeze(0)
    else:
        raise ValueError(f"constraint={constraint!r} is not one of {CONSTRAINTS}")
    return 1.0 + epsilon * (scores - centre)


def wpn_features(losses: Tensor, confidences: Tensor | None, input: str) -> Tensor:
    """The (detached) per-sample WPN input for ``input`` in ``loss`` / ``conf`` / ``both``.

    ``confidences`` may be None for ``input="loss"`` (the step then skips computing them)."""
    if input == "loss":
        return losses.detach()
    if input == "conf":
        return confidences.detach()
    if input == "both":
        return torch.cat([losses.detach(), confidences.detach()], dim=1)
    raise ValueError(f"input={input!r} is not one of {WPN_INPUTS}")
