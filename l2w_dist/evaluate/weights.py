"""What the weight net learned: the weight it gives each held-out sample at each exit, against
the sample's difficulty (the ``weights`` section of eval.json and ``RUN/weights.png``).

Difficulty is the sample's cross-entropy at the last exit of the evaluated network (no label
smoothing): low = easy. The weights are computed as an L2W step computes them
(:func:`l2w_dist.meta.weight_net_input`, the weight net, :func:`l2w_dist.meta.normalize_weights`
with the run's ε and constraint), from the evaluated network's eval-mode logits; the
``mat``/``row`` means run over the whole split. The paper's claim, read in these numbers:
easy samples weigh more at the early exits (negative rank correlation with difficulty there),
hard samples more at the late exits (positive correlation).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

from ..meta import L2WConfig, normalize_weights, per_sample_ce, weight_net_input

QUANTILES = 5  # difficulty quintiles: "easiest 20 %" is the first, "hardest 20 %" the last
DIFFICULTY = "cross-entropy at the last exit (no label smoothing)"


@torch.no_grad()
def held_out_weights(weight_net: nn.Module, logits: Tensor, labels: Tensor, cfg: L2WConfig) -> Tensor:
    """``[N, K]`` weights the weight net gives samples with eval logits ``[K, N, C]`` and ``labels``."""
    _, features = weight_net_input(list(logits), labels, cfg)
    param = next(weight_net.parameters())
    was_training = weight_net.training
    weight_net.eval()
    try:
        scores = weight_net(features.to(param.device, param.dtype)).float().cpu()
    finally:
        weight_net.train(was_training)
    return normalize_weights(scores, cfg.epsilon, cfg.constraint)


def difficulty(logits: Tensor, labels: Tensor) -> Tensor:
    """``[N]`` difficulty of each sample: its cross-entropy at the last exit."""
    return per_sample_ce([logits[-1]], labels)[:, 0]


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation of two 1-D tensors; tied values share their mean rank
    (a saturated tanh gives many equal weights)."""

    def ranks(v: Tensor) -> Tensor:
        v = v.double().contiguous()  # one copy (a column of the weights is strided)
        ordered = torch.sort(v).values
        below = torch.searchsorted(ordered, v, right=False)
        through = torch.searchsorted(ordered, v, right=True)
        return (below + through - 1).double() / 2

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.norm() * rb.norm()).item()
    return float((ra @ rb).item() / denom) if denom > 0 else 0.0


def weight_analysis(weight_net: nn.Module, logits: Tensor, labels: Tensor, cfg: L2WConfig, split: str) -> dict:
    """The eval.json ``weights`` record: per exit the Spearman correlation of weight with
    difficulty, the mean weight of the easiest and hardest 20 % and of every difficulty quintile."""
    weights = held_out_weights(weight_net, logits, labels, cfg).double()
    hardness = difficulty(logits, labels)
    order = torch.argsort(hardness, stable=True)
    groups = torch.tensor_split(order, QUANTILES)
    exits = []
    for k in range(weights.shape[1]):
        means = [float(weights[g, k].mean()) for g in groups]
        exits.append(
            {
                "exit": k + 1,
                "spearman": spearman(weights[:, k], hardness),
                "easy_mean": means[0],
                "hard_mean": means[-1],
                "quintile_means": means,
            }
        )
    return {"split": split, "samples": int(labels.numel()), "difficulty": DIFFICULTY, "exits": exits}


def plot_weights(record: dict, out_path: str | os.PathLike, title: str | None = None) -> Path:
    """``weights.png``: mean weight at each exit per difficulty quintile (easiest to hardest)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for row in record["exits"]:
        means = row["quintile_means"]
        ax.plot(
            range(1, len(means) + 1),
            means,
            "o-",
            color=f"C{(row['exit'] - 1) % 10}",
            label=f"exit {row['exit']} (Spearman {row['spearman']:+.2f})",
        )
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    count = len(record["exits"][0]["quintile_means"]) if record["exits"] else QUANTILES
    ax.set_xticks(range(1, count + 1))
    ax.set_xticklabels(["easiest"] + [str(i) for i in range(2, count)] + ["hardest"])
    ax.set_xlabel(f"difficulty quintile: {record['difficulty']}")
    ax.set_ylabel("mean sample weight")
    ax.set_title(title or f"What the weight net learned ({record['samples']} {record['split']} samples)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, format="png")
    return out_path
