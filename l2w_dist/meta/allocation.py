"""Target exit proportions and counts, the test-time-like exit allocation of the meta batch, meta loss.

The allocation mimics budgeted-batch inference (docs/algorithm.md §2.3): in exit order
k = 1..K-1, the ``floor(N q_k)`` not-yet-allocated samples with the highest confidence at
exit k leave there; the last exit takes the rest. Ties are broken by the lower sample
index (a stable sort), which is what a greedy loop over samples in stably sorted order does.
The loop runs over exits only (K is small); there is no loop over samples and no host sync.

The counts ``floor(N q_k)`` are :func:`target_counts`, the one count rule of the project:
the budgeted evaluation (``l2w_dist.evaluate``) calibrates its thresholds with the same
counts, so training allocates the meta batch as evaluation allocates the held-out split.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor


def target_proportions(num_exits: int, p: float) -> list[float]:
    """``q_k ∝ p^k`` for k = 1..K, normalised, in float64 (paper: K=5, p=0.75 -> [.328,.246,.184,.138,.104]).

    The exact proportions, for display and analysis; counts come from :func:`target_counts`.
    """
    _check_target(num_exits, p)
    raw = [p ** (k + 1) for k in range(num_exits)]
    total = sum(raw)
    return [r / total for r in raw]


def target_counts(num_samples: int, num_exits: int, p: float) -> list[int]:
    """How many of ``num_samples`` leave at each exit: ``floor(N q_k)`` for k < K, the rest at the last.

    Rounded as the released L2W-DEN and MSDNet code round it, in training and in evaluation
    alike: q in float32 (``exp(log(float32 p) · k)``, normalised) and the floor of the
    float32 product ``N · q_k``. Where ``N q_k`` is an integer in exact arithmetic, float32
    may land just below it (N=37, K=3, p=0.75: [16, 11, 10], exactly [16, 12, 9]); float64
    does too, at other N (N=240, K=2, p=0.2: float64 199, float32 and exactly 200). Keeping
    the released rounding lets the budgeted evaluation reproduce the released numbers bit
    for bit, and training allocate as the released training did.
    """
    _check_target(num_exits, p)
    if num_samples < 0:
        raise ValueError(f"num_samples={num_samples} must be >= 0")
    return list(_counts(num_samples, num_exits, p))


@functools.lru_cache(maxsize=256)
def _counts(num_samples: int, num_exits: int, p: float) -> tuple[int, ...]:
    """:func:`target_counts`, computed once per (N, K, p): every meta step asks again, and a
    fresh computation would read a tensor back to the host inside the iteration."""
    base = torch.tensor([p], dtype=torch.float32)
    q = torch.exp(torch.log(base) * torch.arange(1, num_exits + 1, dtype=torch.float32))
    q = q / q.sum()
    counts = torch.floor(num_samples * q[:-1]).long().tolist()  # one exactly rounded float32 product each
    return (*counts, num_samples - sum(counts))


def _check_target(num_exits: int, p: float) -> None:
    if num_exits < 1:
        raise ValueError(f"num_exits={num_exits} must be >= 1")
    if not p > 0:
        raise ValueError(f"p must be > 0 (the geometric ratio of the exit proportions); got {p!r}")


def allocate_exits(confidences: Tensor, counts: list[int]) -> Tensor:
    """Exit index (0-based) per sample of a ``[N, K]`` confidence matrix (no gradient).

    ``counts``: samples per exit (:func:`target_counts` of N); the last exit takes the rest.
    """
    n, k_exits = confidences.shape
    if len(counts) != k_exits:
        raise ValueError(f"{len(counts)} counts for {k_exits} exits")
    if sum(counts) != n:
        raise ValueError(f"counts {counts} do not add up to the {n} samples")
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
    inv = constant(tuple(1.0 / c if c > 0 else 0.0 for c in counts), ce)
    return (sums * inv).sum()


def constant(values: tuple[float, ...], like: Tensor) -> Tensor:
    """A small host tuple as a tensor on ``like``'s device and dtype, built once and kept.

    ``torch.tensor(values, device="cuda")`` is a blocking copy, which synchronises the
    stream (the CPU waits for all queued GPU work) in the middle of the meta step, and no
    host-to-device copy may run inside a captured CUDA graph; a kept tensor is built by the
    first (eager) iteration and only read afterwards. Never write to it.
    """
    return _constant(values, like.dtype, like.device)


@functools.lru_cache(maxsize=1024)
def _constant(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)
