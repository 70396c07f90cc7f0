"""Run logging: a JSON-lines metrics file always, Weights & Biases when asked (rank 0 only).

W&B is off unless ``wandb.mode`` is ``offline`` or ``online``. Offline runs write under
``RUN_DIR/wandb`` and can be uploaded later with ``wandb sync RUN_DIR/wandb/offline-run-*``.
The run id is kept in the checkpoint, so a resumed job continues the same W&B run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


class RunLogger:
    """Writes ``RUN_DIR/metrics.jsonl`` and mirrors to W&B; a no-op on ranks other than 0."""

    def __init__(
        self,
        run_dir: str | Path,
        *,
        rank: int,
        wandb_cfg: Any,
        config: dict[str, Any],
        resume_id: str | None = None,
    ):
        self.enabled = rank == 0
        self.run_dir = Path(run_dir)
        self.wandb = None
        self.run_id: str | None = resume_id
        if not self.enabled:
            return
        self._metrics = open(self.run_dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115
        if wandb_cfg.mode != "disabled":
            import wandb

            self.wandb = wandb.init(
                project=wandb_cfg.project,
                entity=wandb_cfg.entity or None,
                name=wandb_cfg.name or self.run_dir.name,
                tags=list(wandb_cfg.tags) or None,
                config=config,
                dir=str(self.run_dir),
                mode=wandb_cfg.mode,
                id=resume_id,
                resume="allow",
            )
            self.run_id = self.wandb.id

    @property
    def url(self) -> str | None:
        return getattr(self.wandb, "url", None) if self.wandb is not None else None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        plain = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}
        self._metrics.write(json.dumps({"step": step, **plain}) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def log_weight_histograms(self, weights: torch.Tensor, step: int) -> None:
        """Histogram of this batch's sample weights at each exit (``weights``: [B, K])."""
        if self.wandb is None:
            return
        import wandb

        data = weights.detach().float().cpu()
        self.wandb.log(
            {f"weights/hist_exit{k + 1}": wandb.Histogram(data[:, k].numpy()) for k in range(data.shape[1])},
            step=step,
        )

    def log_eval(self, result: dict[str, Any], step: int, weights_png: Path | None = None) -> None:
        """Anytime accuracies as scalars; the budgeted curve as a W&B table and line plot; an
        L2W run's weights against difficulty (eval.json ``weights``) as scalars and its figure."""
        if not self.enabled:
            return
        scalars = {}
        for row in result["anytime"]:
            scalars[f"eval/top1_exit{row['exit']}"] = row["top1"]
            scalars[f"eval/top5_exit{row['exit']}"] = row["top5"]
        for row in result.get("weights", {}).get("exits", []):
            for key in ("spearman", "easy_mean", "hard_mean"):
                scalars[f"weights/{key}_exit{row['exit']}"] = row[key]
        self.log(scalars, step)
        if self.wandb is not None and weights_png is not None and Path(weights_png).is_file():
            import wandb

            self.wandb.log({"weights/vs_difficulty": wandb.Image(str(weights_png))}, step=step)
        if self.wandb is not None and result.get("budgeted"):
            import wandb

            table = wandb.Table(columns=["p", "mflops", "top1"])
            for row in result["budgeted"]:
                table.add_data(row["p"], row["flops"] / 1e6, row["top1"])
            self.wandb.log(
                {
                    "eval/budgeted": table,
                    "eval/budgeted_curve": wandb.plot.line(
                        table, "mflops", "top1", title="Budgeted batch: top-1 vs MFLOPs"
                    ),
                },
                step=step,
            )
            self.wandb.summary["eval/budgeted_best_top1"] = max(r["top1"] for r in result["budgeted"])

    def close(self) -> None:
        if not self.enabled:
            return
        self._metrics.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def to_host(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with every tensor as a Python float, by one copy to the host.

    The trainer keeps an iteration's statistics on the device and calls this only when it
    logs, so that iterations are queued without waiting for the device."""
    names = [k for k, v in values.items() if isinstance(v, torch.Tensor)]
    if not names:
        return dict(values)
    flat = torch.stack([values[k].detach().reshape(()).to(torch.float64) for k in names]).tolist()
    return {**values, **dict(zip(names, flat))}
