"""Anytime and budgeted-batch evaluation of a multi-exit network from its stored logits.

Both work on logits already collected (``[K, N, C]``), so that one forward pass over the
held-out and test splits serves every operating point.

*Anytime*: every sample runs to exit k; top-1/top-5 per exit.

*Budgeted batch* (MSDNet, Huang et al. 2018; the evaluation of L2W-DEN): a sample leaves
at the first exit whose max-softmax confidence reaches that exit's threshold T_k. For a
geometric target ``q_k ∝ p^k`` the thresholds are calibrated on a held-out split so that
the proportions q leave in order, then applied to the test split; the operating point is
(expected FLOPs ``Σ_k frac_k · FLOPs_k``, accuracy). The threshold semantics follow the
released code (kalviny/MSDNet-PyTorch and LeapLabTHU/L2W-DEN ``dynamic_evaluate``):

- confidence = max of the softmax of the exit's logits, prediction = its argmax;
- at exit k (k < K), among the held-out samples that have not left at an earlier exit,
  T_k is the ``floor(n·q_k)``-th largest confidence (ties counted with multiplicity);
  if that count is 0, or fewer samples are left than it asks for, nobody leaves (T_k = +inf);
- a sample leaves at exit k when ``conf_k >= T_k`` (ties at the threshold leave too, so a
  tie can make more than ``floor(n·q_k)`` leave); the last exit takes everyone (T_K = -inf);
- the counts ``floor(n·q_k)`` are :func:`l2w_dist.meta.allocation.target_counts`, the ones
  the training step allocates its meta batch with: q in float32 exactly as the released code
  computes it (``exp(log(float32(p)) · [1..K])``, normalised) and the floor of the float32
  product, so the integer counts match the released code bit for bit.

Deliberate deviations from the released code: the thresholds are +inf / -inf instead of
±1e8 (identical for softmax confidences in [0, 1]); accuracy and expected FLOPs are
computed in float64 from integer counts (the released code accumulates FLOPs in float32).
Everything else is vectorised over samples and over the operating points; it equals a
literal per-sample loop (tests/test_evaluate.py) exactly, ties included.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from einops import rearrange

# the one count rule, shared with training (re-exported by l2w_dist.evaluate)
from l2w_dist.meta.allocation import target_counts
from l2w_dist.meta.allocation import target_proportions as target_proportions

DEFAULT_PS: tuple[float, ...] = tuple(i / 20 for i in range(1, 40))
"""The 39 operating points of the papers: p = 1/20 ... 39/20."""


def _check_logits(logits: torch.Tensor, labels: torch.Tensor, name: str) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"{name} logits must be a tensor [K, N, C]; got {shape}")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.numel() != logits.shape[1]:
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"{name} labels must be a tensor [N] with N={logits.shape[1]}; got {shape}")
    if logits.shape[1] == 0:
        raise ValueError(f"{name} split is empty (N=0)")


def _check_flops(exit_flops: Sequence[float], num_exits: int) -> list[float]:
    flops = [float(f) for f in exit_flops]
    if len(flops) != num_exits:
        raise ValueError(f"exit_flops has {len(flops)} entries but the logits have K={num_exits} exits")
    return flops


def anytime(logits: torch.Tensor, labels: torch.Tensor, exit_flops: Sequence[float]) -> list[dict]:
    """Top-1 / top-5 accuracy (%) of every exit over all samples, with that exit's FLOPs.

    With fewer than 5 classes, top-5 is top-C (100%).
    Returns ``[{"exit": k (1-based), "flops": float, "top1": float, "top5": float}]``.
    """
    _check_logits(logits, labels, "anytime")
    num_exits, n, num_classes = logits.shape
    flops = _check_flops(exit_flops, num_exits)
    labels = labels.to(logits.device).long()
    maxk = min(5, num_classes)
    rows = []
    for k in range(num_exits):
        values, top = logits[k].topk(maxk, dim=1)  # [N, maxk]; a NaN logit sorts first
        if values.isnan().any():
            raise ValueError(f"anytime logits of exit {k + 1} contain NaN")
        hit = top == labels[:, None]
        top1 = hit[:, 0].sum().item() * 100.0 / n
        top5 = hit.any(dim=1).sum().item() * 100.0 / n
        rows.append({"exit": k + 1, "flops": flops[k], "top1": top1, "top5": top5})
    return rows


def confidence_and_prediction(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Max-softmax confidence and its argmax per exit and sample: two tensors ``[K, N]``.

    The softmax is taken per exit over a ``[N, C]`` matrix, as the released code does,
    and ``max`` returns the first index among tied maxima, so the predictions are
    deterministic.
    """
    confs, preds = [], []
    for k in range(logits.shape[0]):
        conf, pred = torch.softmax(logits[k].float(), dim=1).max(dim=1)
        confs.append(conf)
        preds.append(pred)
    return torch.stack(confs), torch.stack(preds)


def find_thresholds(
    conf: torch.Tensor, counts: torch.Tensor, return_exit_counts: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Thresholds ``[P, K]`` from held-out confidences ``conf [K, n]`` and target counts ``[P, K]``.

    For every operating point at once: at exit k, sort the confidences once, walk them in
    descending order counting only the samples still present (a cumulative sum of the
    "not yet left" mask), and take the confidence where that count first reaches
    ``counts[:, k]``. Then every sample with ``conf_k >= T_k`` leaves. The last column of
    ``counts`` is ignored: T_K = -inf. With ``return_exit_counts`` also returns how many
    held-out samples leave at each exit ``[P, K]`` (more than asked where ties sit at T_k).

    The "gone" mask is kept sample-major (``[n, P]``) so that reordering it by the sort
    is a row gather; the cumulative count runs over a transposed int32 copy.
    """
    num_exits, n = conf.shape
    num_points = counts.shape[0]
    dev = conf.device
    counts = counts.to(device=dev, dtype=torch.long)
    thresholds = torch.full((num_points, num_exits), float("inf"), dtype=conf.dtype, device=dev)
    thresholds[:, num_exits - 1] = float("-inf")
    exit_counts = torch.zeros(num_points, num_exits, dtype=torch.long, device=dev)
    gone = torch.zeros(n, num_points, dtype=torch.bool, device=dev)  # sample-major
    values, orders = conf[: num_exits - 1].sort(dim=1, descending=True)
    # written with out=: on CPU the implicit-output path of a dtype-changing cumsum is much
    # slower than writing into a preallocated buffer (docs/benchmarks/evaluate.md)
    seen = torch.empty(num_points, n, dtype=torch.int32, device=dev)
    for k in range(num_exits - 1):
        present = gone.index_select(0, orders[k]).logical_not_().T.contiguous()  # [P, n], sorted order
        torch.cumsum(present, dim=1, dtype=torch.int32, out=seen)  # present samples up to here
        want = counts[:, k]
        # seen only grows at present samples, so the first position with seen >= want is
        # the want-th present sample in descending order.
        pos = torch.searchsorted(seen, want[:, None].to(torch.int32)).squeeze(1)
        valid = (want >= 1) & (seen[:, -1] >= want)
        thresholds[:, k] = torch.where(valid, values[k][pos.clamp(max=n - 1)], thresholds[:, k])
        leaving = conf[k][:, None] >= thresholds[None, :, k]  # [n, P]
        # how many present samples leave: those sorted before the last value >= T_k
        above = torch.searchsorted(-values[k], -thresholds[:, k].contiguous(), right=True)  # [P]
        exit_counts[:, k] = torch.where(
            above > 0, seen.gather(1, (above - 1).clamp(min=0)[:, None]).squeeze(1).long(), 0
        )
        gone |= leaving
    exit_counts[:, num_exits - 1] = n - exit_counts[:, : num_exits - 1].sum(dim=1)
    return (thresholds, exit_counts) if return_exit_counts else thresholds


def exit_assignment(conf: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Exit index (0-based, int64) ``[P, n]`` of every sample: the first k with ``conf_k >= T_k``.

    The first accepting exit is ``K-1 - max_k(accept_k · (K-1-k))`` (the last exit accepts
    everyone); computed with K-1 elementwise uint8 passes over ``[P, n]``, which is far
    faster than an argmax over a ``[P, K, n]`` mask or masked writes.
    """
    num_exits, n = conf.shape
    if num_exits > 255:
        raise ValueError(f"at most 255 exits are supported; got {num_exits}")
    best = torch.zeros(thresholds.shape[0], n, dtype=torch.uint8, device=conf.device)
    for k in range(num_exits - 1):
        accept = (conf[k][None, :] >= thresholds[:, k : k + 1]).to(torch.uint8)
        torch.maximum(best, accept.mul_(num_exits - 1 - k), out=best)
    return (num_exits - 1) - best.long()


def _apply_thresholds(
    conf: torch.Tensor, correct: torch.Tensor, thresholds: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per operating point: how many samples leave at each exit ``[P, K]``, and how many are right ``[P]``.

    One uint8 code per (point, sample) carries both the exit and the correctness: exit k
    contributes ``2·(K-1-k) + correct[k]`` where it accepts, and the running maximum keeps
    the earliest accepting exit (a larger ``K-1-k`` always wins; the low bit rides along).
    The last exit accepts everyone. One bincount then counts (point, exit, correct) triples.
    """
    num_exits, n = conf.shape
    num_points = thresholds.shape[0]
    if num_exits > 127:
        raise ValueError(f"at most 127 exits are supported; got {num_exits}")
    code = correct.to(torch.uint8)  # [K, n]
    best = code[num_exits - 1].expand(num_points, n).clone()  # the last exit: 0·2 + correct
    for k in range(num_exits - 1):
        value = code[k] + 2 * (num_exits - 1 - k)  # [n] uint8
        accept = conf[k][None, :] >= thresholds[:, k : k + 1]  # [P, n]
        torch.maximum(best, accept * value[None, :], out=best)
    # (point, code) -> one bin; int16 where it fits: the uint8 -> int64 promotion was the
    # slowest step of this function on CPU
    num_bins = 2 * num_exits * num_points
    itype = torch.int16 if num_bins <= torch.iinfo(torch.int16).max else torch.long
    offsets = 2 * num_exits * torch.arange(num_points, device=conf.device, dtype=itype)[:, None]
    hist = torch.bincount((best.to(itype) + offsets).view(-1), minlength=num_bins)
    # bin = 2·K·point + 2·(K-1-k) + correct: unflatten, then reverse the exit axis to k order
    hist = rearrange(hist, "(point exit correct) -> point exit correct", exit=num_exits, correct=2).flip(1)
    return hist.sum(dim=2), hist[:, :, 1].sum(dim=1)


def thresholds_to_list(thresholds: torch.Tensor) -> list[float | None]:
    """One operating point's thresholds ``[K]`` as stored in eval.json: the K-1 thresholds of
    exits 1..K-1 (the last exit takes every sample left), ``None`` where nobody leaves
    (T_k = +inf). Finite values are float32 numbers, written exactly (JSON floats are doubles)."""
    return [None if v == float("inf") else float(v) for v in thresholds[:-1].tolist()]


def thresholds_from_list(values: Sequence[float | None], num_exits: int) -> torch.Tensor:
    """The inverse of :func:`thresholds_to_list`: float32 ``[K]``, +inf for ``None``, -inf last."""
    if len(values) != num_exits - 1:
        raise ValueError(
            f"{len(values)} thresholds for a model of {num_exits} exits; give one per exit but the last "
            "(which takes every sample left), null/None where nobody leaves"
        )
    out = [float("inf") if v is None else float(v) for v in values] + [float("-inf")]
    return torch.tensor(out, dtype=torch.float32)


@dataclass
class BudgetedDetails:
    """Everything behind the budgeted curve, for tests, logging and debugging."""

    ps: list[float]
    thresholds: torch.Tensor  # [P, K] float32, from the held-out split
    holdout_exit_counts: torch.Tensor  # [P, K] int64
    test_exit_counts: torch.Tensor  # [P, K] int64
    test_correct: torch.Tensor  # [P] int64, correct predictions at the chosen exits
    num_test: int
    points: list[dict]  # [{"p", "flops", "top1", "thresholds"}]


def budgeted_details(
    holdout_logits: torch.Tensor,
    holdout_labels: torch.Tensor,
    test_logits: torch.Tensor,
    test_labels: torch.Tensor,
    exit_flops: Sequence[float],
    ps: Sequence[float] | None = None,
) -> BudgetedDetails:
    """The budgeted-batch evaluation with its intermediate results (see :func:`budgeted`)."""
    _check_logits(holdout_logits, holdout_labels, "held-out")
    _check_logits(test_logits, test_labels, "test")
    num_exits = holdout_logits.shape[0]
    if test_logits.shape[0] != num_exits or test_logits.shape[2] != holdout_logits.shape[2]:
        raise ValueError(
            f"held-out logits {tuple(holdout_logits.shape)} and test logits {tuple(test_logits.shape)} "
            "disagree on the number of exits or classes"
        )
    _check_flops(exit_flops, num_exits)
    ps = [float(p) for p in (DEFAULT_PS if ps is None else ps)]
    if not ps:
        raise ValueError("ps is empty; give at least one operating point (default: 1/20 ... 39/20)")

    conf_h, _ = confidence_and_prediction(holdout_logits)
    conf_t, pred_t = confidence_and_prediction(test_logits.to(holdout_logits.device))
    # checked after the softmax (cheap, [K, n]): NaN or +inf logits, or rows of all -inf,
    # give NaN confidences; -inf logits alone (masked classes) are fine
    for conf, split in ((conf_h, "held-out"), (conf_t, "test")):
        if conf.isnan().any():
            raise ValueError(f"{split} logits contain NaN or inf; their softmax confidences are undefined")
    return budgeted_from_confidence(conf_h, conf_t, pred_t, test_labels, exit_flops, ps)


def budgeted_from_confidence(
    holdout_conf: torch.Tensor,
    test_conf: torch.Tensor,
    test_pred: torch.Tensor,
    test_labels: torch.Tensor,
    exit_flops: Sequence[float],
    ps: Sequence[float],
) -> BudgetedDetails:
    """The budgeted evaluation after the softmax: confidences and predictions ``[K, n]``.

    Split from :func:`budgeted_details` so that the per-operating-point work can be timed
    (and reused, e.g. for many ``ps``) without recomputing the softmax of the logits.
    """
    num_exits, n_h = holdout_conf.shape
    n_t = test_conf.shape[1]
    flops = _check_flops(exit_flops, num_exits)
    ps = [float(p) for p in ps]
    counts = torch.tensor([target_counts(n_h, num_exits, p) for p in ps], dtype=torch.long)

    thresholds, holdout_exit_counts = find_thresholds(holdout_conf, counts, return_exit_counts=True)
    correct = test_pred == test_labels.to(test_pred.device).long()[None, :]  # [K, n_t]
    test_exit_counts, test_correct = _apply_thresholds(test_conf, correct, thresholds)
    test_exit_counts, test_correct = test_exit_counts.cpu(), test_correct.cpu()

    points = []
    for p, row, right, t in zip(ps, test_exit_counts.tolist(), test_correct.tolist(), thresholds.cpu()):
        exp_flops = 0.0
        for k in range(num_exits):
            exp_flops += row[k] / n_t * flops[k]
        points.append({"p": p, "flops": exp_flops, "top1": right * 100.0 / n_t, "thresholds": thresholds_to_list(t)})
    return BudgetedDetails(
        ps=ps,
        thresholds=thresholds.cpu(),
        holdout_exit_counts=holdout_exit_counts.cpu(),
        test_exit_counts=test_exit_counts,
        test_correct=test_correct,
        num_test=n_t,
        points=points,
    )


def budgeted(
    holdout_logits: torch.Tensor,
    holdout_labels: torch.Tensor,
    test_logits: torch.Tensor,
    test_labels: torch.Tensor,
    exit_flops: Sequence[float],
    ps: Sequence[float] | None = None,
) -> list[dict]:
    """Budgeted-batch curve: ``[{"p", "flops", "top1", "thresholds"}]``, one point per p (default 1/20 ... 39/20).

    Thresholds are calibrated on the held-out logits (a clean split of the training data,
    never the test set) and applied to the test logits; ``flops`` is the expected cost per
    test image ``Σ_k frac_k · exit_flops[k]``, ``top1`` the test accuracy in %,
    ``thresholds`` the point's per-exit thresholds (:func:`thresholds_to_list`).
    """
    return budgeted_details(holdout_logits, holdout_labels, test_logits, test_labels, exit_flops, ps).points
