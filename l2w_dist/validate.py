"""``l2w-eval``: anytime + budgeted-batch evaluation of a saved run.

    l2w-eval --checkpoint RUN/checkpoints/last.pt [--output FOLDER] [key=value ...]

The checkpoint carries its resolved config, so only the checkpoint is needed; data keys
can be overridden (``data.spec=...``) to evaluate on another copy of the data. The
evaluation is the trainer's own (:func:`l2w_dist.evaluate.evaluate_run`): the same
checkpoint and config give the same eval.json. Writes eval.json and curve.png into the
run folder (or into ``--output``). Under torchrun or Slurm every rank runs this.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

WEIGHTS = ("auto", "model", "ema")


def evaluate_checkpoint(
    checkpoint: str | Path, output: str | Path, overrides: Sequence[str] = (), weights: str = "auto"
) -> dict[str, Any]:
    """Evaluate the weights of ``checkpoint`` (``auto``: the EMA copy when the run kept one)
    with its config and ``overrides``; eval.json and curve.png go into ``output`` and rank 0
    prints the anytime table. Returns the eval.json record."""
    import torch

    from .config import apply_overrides
    from .data import attach_device_normalization, resolve_data_spec
    from .distributed import cleanup, init_distributed
    from .engine.checkpoint import load_checkpoint
    from .evaluate import evaluate_run, print_anytime_table
    from .meta import WeightNet
    from .models import create_model

    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r}; expected one of {WEIGHTS}")
    state = load_checkpoint(checkpoint)
    cfg = apply_overrides(state["config"], overrides)
    use_ema = weights == "ema" or (weights == "auto" and state.get("ema") is not None)
    if use_ema and state.get("ema") is None:
        raise ValueError(f"{checkpoint} holds no EMA weights (train.ema_decay was 0)")
    env = init_distributed()
    try:
        # Built as the trainer builds it, so the forward is the one its evaluation ran.
        model = create_model(cfg.model.name, **cfg.model.options).to(env.device)
        attach_device_normalization(model, cfg)  # the loaders yield uint8 images then
        if cfg.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        model.load_state_dict(state["ema"] if use_ema else state["model"])
        weight_net = None
        if cfg.meta.enabled:  # what it learned goes into eval.json and weights.png
            meta = cfg.meta
            weight_net = WeightNet(model.num_exits, hidden=meta.hidden, layers=meta.layers, input=meta.input)
            weight_net.load_state_dict(state["weight_net"])
        result = evaluate_run(model, cfg, env, resolve_data_spec(cfg, env), Path(output), weight_net)
        if env.rank == 0:
            print_anytime_table(result)
        return result
    finally:
        cleanup()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="l2w-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint", required=True, help="a checkpoint written by l2w-train (e.g. RUN/checkpoints/last.pt)"
    )
    parser.add_argument("--output", default=None, help="folder for eval.json and curve.png (default: the run folder)")
    parser.add_argument(
        "--weights",
        choices=WEIGHTS,
        default="auto",
        help="which weights to evaluate (auto: the EMA when the run kept one)",
    )
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. data.spec=/data/in1k.json")
    args = parser.parse_args(argv)
    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_file():
        parser.exit(2, f"l2w-eval: no checkpoint at {checkpoint}\n")
    output = Path(args.output) if args.output else checkpoint.parent.parent
    evaluate_checkpoint(checkpoint, output, args.overrides, weights=args.weights)


if __name__ == "__main__":
    main()
