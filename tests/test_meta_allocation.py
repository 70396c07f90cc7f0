"""The one count rule: training's meta-batch allocation and the budgeted evaluation use the same counts."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from l2w_dist.evaluate import budgeted_details, exit_assignment
from l2w_dist.meta import allocate_exits, target_counts


def _exact_counts(n: int, num_exits: int, p: float) -> list[int]:
    """``floor(n·q_k)`` in exact rational arithmetic (p = i/20), the rest at the last exit."""
    ratio = Fraction(p).limit_denominator(20)
    raw = [ratio ** (k + 1) for k in range(num_exits)]
    total = sum(raw)
    counts = [math.floor(n * r / total) for r in raw[:-1]]
    return counts + [n - sum(counts)]


def test_counts_are_the_floor_of_n_q_away_from_integer_products():
    """Where n·q_k is not (nearly) an integer, rounding cannot matter: the counts are the
    exact floor, hand-computed in float64 (and checked in rational arithmetic)."""
    checked = 0
    for num_exits in (1, 2, 3, 5, 7):
        for i in (1, 5, 10, 15, 20, 25, 39):
            p = i / 20
            q64 = [p ** (k + 1) / sum(p ** (j + 1) for j in range(num_exits)) for k in range(num_exits)]
            for n in (1, 7, 16, 64, 100, 240, 1000):
                if any(abs(n * q - round(n * q)) < 1e-4 for q in q64[:-1]):
                    continue
                want = [math.floor(n * q) for q in q64[:-1]]
                assert target_counts(n, num_exits, p) == want + [n - sum(want)], (n, num_exits, p)
                assert target_counts(n, num_exits, p) == _exact_counts(n, num_exits, p)
                checked += 1
    assert checked > 150


@pytest.mark.parametrize(
    "n,num_exits,p,want,exact",
    [
        (64, 5, 0.75, [20, 15, 11, 8, 10], [20, 15, 11, 8, 10]),
        # n·q_k an integer: the released float32 rounding, not the exact or float64 floor
        (37, 3, 0.75, [16, 11, 10], [16, 12, 9]),  # float64 gives the exact [16, 12, 9]
        (240, 2, 0.2, [200, 40], [200, 40]),  # float64 gives [199, 41]
        (21, 2, 0.05, [19, 2], [20, 1]),
        (3, 1, 0.75, [3], [3]),
    ],
)
def test_counts_pin_the_released_float32_rounding(n, num_exits, p, want, exact):
    assert _exact_counts(n, num_exits, p) == exact
    assert target_counts(n, num_exits, p) == want


@pytest.mark.parametrize("n,num_exits,p", [(37, 3, 0.75), (240, 2, 0.2), (21, 2, 0.05), (200, 5, 0.75), (97, 4, 1.5)])
def test_training_allocation_equals_budgeted_evaluation(n, num_exits, p):
    """On distinct confidences, the budgeted evaluation calibrated on a split sends every sample
    of that split to the exit the meta step's allocation gives it (same counts, same order)."""
    gen = torch.Generator().manual_seed(n)
    logits = torch.randn(num_exits, n, 10, generator=gen) * 3
    labels = torch.randint(0, 10, (n,), generator=gen)
    conf = torch.softmax(logits, dim=2).amax(dim=2)  # [K, n]
    assert all(conf[k].unique().numel() == n for k in range(num_exits))  # no ties
    details = budgeted_details(logits, labels, logits, labels, list(range(1, num_exits + 1)), [p])
    evaluation = exit_assignment(conf, details.thresholds)[0]
    training = allocate_exits(conf.T, target_counts(n, num_exits, p))
    assert details.holdout_exit_counts[0].tolist() == target_counts(n, num_exits, p)
    assert evaluation.tolist() == training.tolist()
