"""Evaluating a model: on two given loaders (``evaluate_model``), or as a run is evaluated
(``evaluate_run``, the one routine behind both the trainer's final evaluation and ``l2w-eval``)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm import tqdm

from ..config import Config
from ..data import calibration_loader, eval_loader
from ..meta import L2WConfig
from .collect import collect_logits
from .metrics import anytime, budgeted
from .plots import plot_curves
from .results import write_eval_json
from .weights import plot_weights, weight_analysis

if TYPE_CHECKING:
    from ..distributed import DistEnv


def evaluate_model(
    model: nn.Module,
    calibration_loader: Iterable,
    test_loader: Iterable,
    device: torch.device | str,
    exit_flops: Sequence[float],
    precision: str = "fp32",
    ps: Sequence[float] | None = None,
    calibration_split: str = "holdout",
    weight_net: nn.Module | None = None,
    l2w_cfg: L2WConfig | None = None,
) -> dict:
    """Anytime on the test split and budgeted batch with thresholds calibrated on
    ``calibration_loader`` (the held-out split, normally; ``calibration_split`` names it);
    with ``weight_net`` (and the run's ``l2w_cfg``) also what it learned on the calibration
    split (:mod:`.weights`).

    Returns ``{"anytime": [...], "budgeted": [...], "calibration": {...}}`` (the eval.json
    record; each budgeted row keeps its thresholds; ``"weights"`` too with a weight net). In a
    distributed job every rank must call it (the logits are all-gathered) and every rank
    gets the same record; write it on rank 0.
    """
    calibration_logits, calibration_labels = collect_logits(model, calibration_loader, device, precision)
    test_logits, test_labels = collect_logits(model, test_loader, device, precision)
    result = {
        "anytime": anytime(test_logits, test_labels, exit_flops),
        "budgeted": budgeted(calibration_logits, calibration_labels, test_logits, test_labels, exit_flops, ps),
        "calibration": {"split": calibration_split, "num_samples": int(calibration_labels.numel())},
    }
    if weight_net is not None:
        result["weights"] = weight_analysis(weight_net, calibration_logits, calibration_labels, l2w_cfg, "calibration")
    return result


def evaluate_run(
    model: nn.Module, cfg: Config, env: DistEnv, data_spec: str, output: Path, weight_net: nn.Module | None = None
) -> dict:
    """The evaluation of a run: :func:`evaluate_model` on the loaders ``cfg`` describes, the
    thresholds calibrated as ``data.calibration`` says; eval.json and curve.png written into
    ``output`` on rank 0. Returns the eval.json record. With ``weight_net`` (an L2W run's,
    ``meta.enabled``) the record and eval.json hold its weights on the calibration split
    against difficulty too, drawn in weights.png.

    ``model`` holds the weights to evaluate (the EMA copy when the run kept one), on
    ``env.device``; it runs under ``train.precision`` autocast, compiled when
    ``train.compile`` is set, as in training. Every rank calls this (the logits are
    all-gathered) and gets the same record.
    """
    exit_flops = model.exit_flops
    forward = torch.compile(model) if cfg.train.compile else model
    result = evaluate_model(
        forward,
        _progress(calibration_loader(cfg, env, data_spec), "calibration", env.rank == 0),
        _progress(eval_loader(cfg, env, data_spec, "test"), "evaluation", env.rank == 0),
        env.device,
        exit_flops,
        precision=cfg.train.precision,
        calibration_split=cfg.data.calibration,
        weight_net=weight_net if cfg.meta.enabled else None,
        l2w_cfg=cfg.meta.l2w(label_smoothing=cfg.optim.label_smoothing),
    )
    if env.rank == 0:
        output = Path(output)
        output.mkdir(parents=True, exist_ok=True)
        write_eval_json(
            output / "eval.json",
            result["anytime"],
            result["budgeted"],
            result["calibration"],
            weights=result.get("weights"),
        )
        plot_curves({output.name: result}, output / "curve.png")
        if "weights" in result:
            plot_weights(result["weights"], output / "weights.png")
    return result


def _progress(loader: Iterable, stage: str, show: bool) -> Iterable:
    """``loader`` with a progress bar naming the stage, with its ETA (rank 0 only)."""
    try:
        total = len(loader)
    except TypeError:  # a streaming loader (or a wrapper of one) has no length: no ETA then
        total = None
    return tqdm(loader, desc=stage, total=total, unit="batch", disable=not show, dynamic_ncols=True)
