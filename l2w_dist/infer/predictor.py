"""``DynamicPredictor``: a trained multi-exit network that really stops at the first exit whose
confidence reaches its threshold.

The exit rule is the budgeted evaluation's (``l2w_dist.evaluate.metrics``): confidence =
max softmax of the exit's logits (float32), prediction = its argmax (first index among tied
maxima), a sample leaves at exit k when ``conf_k >= T_k`` (ties at the threshold leave),
the last exit takes everyone. Samples that leave are dropped from the batch
(``StageState.select``) before the next stage runs, so their later stages cost nothing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..evaluate import confidence_and_prediction, load_eval_json, thresholds_from_list
from ..models import MultiExitModel
from ..utils import autocast

__all__ = ["DynamicPredictor", "OperatingPoint", "Predictions", "PredictorError", "choose_point"]


class PredictorError(ValueError):
    """A predictor cannot be built as asked (no thresholds, point out of range, budget unreachable)."""


@dataclass
class OperatingPoint:
    """The thresholds a predictor applies and where they come from."""

    thresholds: list[float | None]  # T_1 .. T_{K-1}; None: nobody leaves there
    p: float | None = None  # the budget point of eval.json, when chosen from it
    flops_expected: float | None = None  # eval.json's expected FLOPs per image at that point
    top1_expected: float | None = None  # eval.json's budgeted top-1 (%) at that point


@dataclass
class Predictions:
    """Per sample of a batch: the class, the exit taken (0-based) and its confidence."""

    classes: Tensor  # [B] int64
    exits: Tensor  # [B] int64, 0-based
    confidence: Tensor  # [B] float32, max softmax at the exit taken
    stage_samples: list[int]  # how many samples ran each stage (for the FLOPs actually spent)


def choose_point(record: dict, point: float | None = None, mflops: float | None = None) -> OperatingPoint:
    """The operating point of eval.json ``record``: budget point ``p == point``, or for
    ``mflops`` the most expensive point whose expected cost is at most ``mflops`` MFLOPs
    (the budget). Raises :class:`PredictorError` with a one-line reason."""
    if (point is None) == (mflops is None):
        raise PredictorError("give exactly one of point (a p of eval.json) or mflops (a budget)")
    rows = record.get("budgeted") or []
    if not rows or any("thresholds" not in r for r in rows):
        raise PredictorError(
            "the evaluation record keeps no thresholds (eval.json written before thresholds were stored); "
            "run l2w-eval --checkpoint CKPT again to write them"
        )
    if point is not None:
        found = [r for r in rows if math.isclose(r["p"], float(point), rel_tol=0, abs_tol=1e-9)]
        if not found:
            ps = [r["p"] for r in rows]
            raise PredictorError(
                f"point={point} is not a budget point of eval.json; allowed: {min(ps):g} ... {max(ps):g} "
                f"({len(ps)} points, e.g. {', '.join(f'{p:g}' for p in ps[:3])})"
            )
        row = found[0]
    else:
        budget = float(mflops) * 1e6
        within = [r for r in rows if r["flops"] <= budget]
        if not within:
            cheapest = min(r["flops"] for r in rows) / 1e6
            raise PredictorError(
                f"mflops={mflops} is unreachable: the cheapest budget point costs {cheapest:.3f} MFLOPs per image"
            )
        row = max(within, key=lambda r: (r["flops"], -r["p"]))
    return OperatingPoint(list(row["thresholds"]), row["p"], row["flops"], row["top1"])


class _Clock:
    """Adds the seconds since the last lap to ``timings[name]``; does nothing without ``timings``."""

    def __init__(self, timings: dict[str, float] | None, device: torch.device) -> None:
        self.timings, self.cuda = timings, device.type == "cuda"
        self.last = time.perf_counter() if timings is not None else 0.0

    def lap(self, name: str) -> None:
        if self.timings is None:
            return
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.timings[name] = self.timings.get(name, 0.0) + now - self.last
        self.last = now


class DynamicPredictor:
    """Early-exit inference for a :class:`MultiExitModel` at one operating point.

    ``thresholds``: T_1 .. T_{K-1} (``None`` = nobody leaves there), a float32 tensor
    ``[K]`` as the evaluation holds them, or an :class:`OperatingPoint`. The model is put
    in eval mode on ``device``; inference runs without autograd, optionally under bf16
    autocast (``precision="bf16"``) and in ``channels_last`` memory format.
    """

    def __init__(
        self,
        model: MultiExitModel,
        thresholds: OperatingPoint | Sequence[float | None] | Tensor,
        device: torch.device | str = "cpu",
        precision: str = "fp32",
        channels_last: bool = False,
    ) -> None:
        self.point = thresholds if isinstance(thresholds, OperatingPoint) else None
        values = self.point.thresholds if self.point is not None else thresholds
        num_exits = model.num_exits
        if isinstance(values, Tensor):
            if values.shape != (num_exits,):
                raise PredictorError(f"thresholds tensor must be [K={num_exits}]; got {tuple(values.shape)}")
            self.thresholds = values.detach().float().cpu()
        else:
            try:
                self.thresholds = thresholds_from_list(list(values), num_exits)
            except ValueError as err:
                raise PredictorError(str(err)) from None
        self.device = torch.device(device)
        self.precision = precision
        self.channels_last = channels_last
        model = model.eval().to(self.device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        for param in model.parameters():
            param.requires_grad_(False)
        self.model = model
        self._limits = self.thresholds.tolist()

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | Path,
        point: float | None = None,
        mflops: float | None = None,
        thresholds: Sequence[float | None] | None = None,
        eval_json: str | Path | None = None,
        weights: str = "auto",
        device: torch.device | str = "cpu",
        precision: str = "fp32",
        channels_last: bool = False,
        overrides: Sequence[str] = (),
    ) -> DynamicPredictor:
        """Build from an ``l2w-train`` checkpoint and an operating point: ``point`` (a ``p``
        of eval.json, e.g. 0.75), ``mflops`` (a budget, see :func:`choose_point`) or
        explicit ``thresholds``. eval.json is read from ``eval_json`` or the run folder
        (``RUN/eval.json`` for ``RUN/checkpoints/*.pt``). ``weights`` as ``l2w-eval``'s."""
        from ..config import apply_overrides
        from ..engine.checkpoint import load_checkpoint
        from ..validate import build_evaluated_model, checkpoint_weights

        checkpoint = Path(checkpoint)
        if thresholds is not None:
            if point is not None or mflops is not None:
                raise PredictorError("give one of point, mflops or thresholds")
            chosen = OperatingPoint(list(thresholds))
        else:
            path = Path(eval_json) if eval_json is not None else checkpoint.parent.parent / "eval.json"
            try:
                record = load_eval_json(path)
            except FileNotFoundError:
                raise PredictorError(
                    f"no eval.json at {path} to take the thresholds from; run l2w-eval --checkpoint {checkpoint} "
                    "or pass eval_json / explicit thresholds"
                ) from None
            chosen = choose_point(record, point=point, mflops=mflops)
        state = load_checkpoint(checkpoint)
        cfg = apply_overrides(state["config"], overrides)
        model = build_evaluated_model(cfg, checkpoint_weights(state, weights, checkpoint), "cpu")
        predictor = cls(model, chosen, device=device, precision=precision, channels_last=channels_last)
        predictor.config = cfg
        return predictor

    @property
    def exit_flops(self) -> list[float]:
        """Cumulative multiply-adds per exit for one image (counted once, on first use)."""
        return self.model.exit_flops

    @classmethod
    def from_exported(
        cls,
        folder: str | Path,
        device: torch.device | str = "cpu",
        precision: str = "fp32",
        channels_last: bool = False,
        overrides: Sequence[str] = (),
    ) -> DynamicPredictor:
        """Build from a folder written by ``l2w-infer --export`` (one torch.export program per
        stage and the operating point; no model code needed)."""
        from ..config import apply_overrides
        from .export import ExportedModel

        model = ExportedModel(folder)
        meta = model.meta
        chosen = OperatingPoint(list(meta["thresholds"]), meta.get("point"), None, meta.get("top1_expected"))
        if meta.get("mflops_expected") is not None:
            chosen.flops_expected = meta["mflops_expected"] * 1e6
        predictor = cls(model, chosen, device=device, precision=precision, channels_last=channels_last)
        predictor.config = apply_overrides(meta["config"], overrides)
        return predictor

    def _prepare(self, x: Tensor) -> Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    @torch.inference_mode()
    def predict(self, x: Tensor, timings: dict[str, float] | None = None) -> Predictions:
        """Classify the batch ``x``: stage k runs only for the samples no exit has taken yet.

        ``timings`` (for benchmarks): seconds are added under ``stage_k`` (the stage's
        forward), ``exit_rule`` (softmax, threshold, writing the results) and ``compaction``
        (dropping the samples that left); on CUDA every part is synchronised, which costs
        a little overlap."""
        model, n = self.model, x.shape[0]
        clock = _Clock(timings, self.device)
        classes = torch.empty(n, dtype=torch.long, device=self.device)
        exits = torch.empty(n, dtype=torch.long, device=self.device)
        confidence = torch.empty(n, dtype=torch.float32, device=self.device)
        active = torch.arange(n, device=self.device)  # batch positions of the samples still running
        stage_samples = []
        with autocast(self.device, self.precision):
            state = model.begin(self._prepare(x))
            last = model.num_exits - 1
            for k in range(model.num_exits):
                stage_samples.append(active.numel())
                logits, state = model.step(k, state)
                clock.lap(f"stage_{k}")
                conf, pred = confidence_and_prediction(logits[None])  # the evaluation's rule, [1, b]
                conf, pred = conf[0], pred[0]
                if k == last:
                    leave = torch.ones_like(conf, dtype=torch.bool)
                else:
                    leave = conf >= self._limits[k]
                gone = active[leave]
                classes[gone], exits[gone], confidence[gone] = pred[leave], k, conf[leave]
                done = k == last or bool(leave.all())
                clock.lap("exit_rule")
                if done:
                    break
                if bool(leave.any()):
                    stay = leave.logical_not_()
                    active, state = active[stay], state.select(stay)
                    clock.lap("compaction")
        return Predictions(classes.cpu(), exits.cpu(), confidence.cpu(), stage_samples)

    @torch.inference_mode()
    def full(self, x: Tensor) -> list[Tensor]:
        """The full network on ``x`` (every exit, every sample), with the same settings: the baseline."""
        with autocast(self.device, self.precision):
            return self.model(self._prepare(x))

    def timed(self, x: Tensor) -> tuple[Predictions, float, float]:
        """:meth:`predict` and then :meth:`full` on the same batch, each timed to its end on the
        device: ``(predictions, seconds, seconds_full)`` (what l2w-infer and bench/dynamic.py report)."""
        self._sync()
        t0 = time.perf_counter()
        out = self.predict(x)
        self._sync()
        t1 = time.perf_counter()
        self.full(x)
        self._sync()
        return out, t1 - t0, time.perf_counter() - t1

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def counted_flops(self, stage_samples: Sequence[int]) -> float:
        """Multiply-adds actually spent on a batch: each stage's own cost times the samples that ran it."""
        total, before = 0.0, 0.0
        for k, ran in enumerate(stage_samples):
            total += ran * (self.exit_flops[k] - before)
            before = self.exit_flops[k]
        return total

    def describe(self) -> dict[str, Any]:
        """The operating point as written to OUT.json."""
        point = self.point
        return {
            "point": point.p if point else None,
            "thresholds": [None if math.isinf(t) else t for t in self._limits[:-1]],
            "mflops_expected": point.flops_expected / 1e6 if point and point.flops_expected is not None else None,
            "top1_expected": point.top1_expected if point else None,
        }
