"""Target exit proportions, the test-time-like exit allocation of the meta batch, meta loss.

The allocation mimics budgeted-batch inference (docs/algorithm.md §2.3): in exit order
k = 1..K-1, the ``floor(N q_k)`` not-yet-allocated samples with the highest confidence at
exit k leave there; the last exit takes the rest. Ties are broken by the lower sample
index (a stable sort), which is what a greedy loop over samples in stably sorted order does.
The loop runs over exits only (K is small); there is no loop over samples and no host sync.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def target_proportions(num_exits: int, p: float) -> list[float]:
    """``q_k ∝ p^k`` for k = 1..K, normalised (paper: K=5, p=0.75 -> [.328,.246,.184,.138,.104])."""
    if num_exits < 1:
        raise ValueError(f"num_exits={num_exits} must be >= 1")
    if not p > 0:
        raise ValueError(f"p={p} must be > 0")
    raw = [p ** (k + 1) for k in range(num_exits)]
    total = sum(raw)
    return [r / total for r in raw]


def exit_counts(num_samples: int, proportions: list[float]) -> list[int]:
    """How many of ``num_samples`` each exit receives: ``floor(N q_k)`` for k < K, the rest last."""
    counts = [int(math.floor(num_samples * q)) for q in proportions[:-1]]
    counts.append(num_samples - sum(counts))
    return counts


def allocate_exits(confidences: Tensor, proportions: list[float]) -> Tensor:
    """Exit index (0-based) per sample of a ``[N, K]`` confidence matrix (no gradient)."""
    n, k_exits = confidences.shape
    if len(proportions) != k_exits:
        raise ValueError(f"{len(proportions)} proportions for {k_exits} exits")
    counts = exit_counts(n, proportions)
    conf = confidences.detach()
    exit_of = torch.full((n,), k_exits - 1, dtype=torch.long, device=conf.device)
    taken = torch.zeros(n, dtype=torch.bool, device=conf.device)
    for k in range(k_exits - 1):
        if counts[k] == 0:
            continue
        scores = conf[:, k].masked_fill(taken, float("-inf"))
        chosen = torch.sort(scores, descending=True, stable=True).indices[: counts[k]]
        exit_of[chosen] = k
        taken[chosen] = True
    return exit_of


def meta_loss_from_allocation(ce: Tensor, exit_of: Tensor, counts: list[int]) -> Tensor:
    """``sum_k sum(CE of this process's samples allocated to k) / counts[k]`` (empty exits skipped).

    ``counts`` are the (global) allocation counts, so summing this value over ranks gives the
    meta loss of the concatenated meta batch.
    """
    picked = ce.gather(1, exit_of.unsqueeze(1)).squeeze(1)
    sums = torch.zeros(ce.shape[1], dtype=ce.dtype, device=ce.device).index_add(0, exit_of, picked)
    inv = _to_device([1.0 / c if c > 0 else 0.0 for c in counts], ce)
    return (sums * inv).sum()


def _to_device(values: list[float], like: Tensor) -> Tensor:
    """A small host list as a tensor on ``like``'s device without a host sync.

    ``torch.tensor(values, device="cuda")`` is a blocking copy, which synchronises the
    stream (the CPU waits for all queued GPU work) in the middle of the meta step;
    ``non_blocking`` from pageable memory stages the bytes and returns at once.
    """
    return torch.tensor(values, dtype=like.dtype).to(like.device, non_blocking=True)
