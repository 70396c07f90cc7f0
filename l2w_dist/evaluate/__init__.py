"""Evaluation of multi-exit networks: anytime and budgeted-batch (accuracy vs FLOPs), eval.json, plots.

logits, labels = collect_logits(model, loader, device)       # [K, N, C], [N]
rows = anytime(logits, labels, model.exit_flops)
curve = budgeted(h_logits, h_labels, logits, labels, model.exit_flops)
write_eval_json(run_dir / "eval.json", rows, curve)
plot_curves({"L2W": load_eval_json(run_dir)}, run_dir / "curve.png")

or, as the trainer and l2w-eval evaluate a run: evaluate_run(model, cfg, env, data_spec, run_dir).
"""

from .collect import collect_logits
from .metrics import (
    DEFAULT_PS,
    BudgetedDetails,
    anytime,
    budgeted,
    budgeted_details,
    budgeted_from_confidence,
    confidence_and_prediction,
    exit_assignment,
    find_thresholds,
    target_counts,
    target_proportions,
    thresholds_from_list,
    thresholds_to_list,
)
from .plots import plot_curves
from .references import REFERENCES, load_reference
from .results import load_eval_json, print_anytime_table, write_eval_json
from .run import evaluate_model, evaluate_run

__all__ = [
    "DEFAULT_PS",
    "REFERENCES",
    "BudgetedDetails",
    "anytime",
    "budgeted",
    "budgeted_details",
    "budgeted_from_confidence",
    "collect_logits",
    "confidence_and_prediction",
    "evaluate_model",
    "evaluate_run",
    "exit_assignment",
    "find_thresholds",
    "load_eval_json",
    "load_reference",
    "plot_curves",
    "print_anytime_table",
    "target_counts",
    "target_proportions",
    "thresholds_from_list",
    "thresholds_to_list",
    "write_eval_json",
]
