"""``l2w-eval``: anytime + budgeted-batch evaluation of a saved run.

    l2w-eval --checkpoint RUN/checkpoints/last.pt [--output FOLDER] [key=value ...]

The checkpoint carries its resolved config, so only the checkpoint is needed; data keys
can be overridden (``data.spec=...``) to evaluate on another copy of the data. The
evaluation is the trainer's own (:func:`l2w_dist.evaluate.evaluate_run`): the same
checkpoint and config give the same eval.json. Writes eval.json and curve.png into the
run folder (or into ``--output``). Under torchrun or Slurm every rank runs this.

SIGINT or SIGTERM ends it at once with 130 / 143 (eval.json is written whole at the end, or
not at all); a truncated or corrupt checkpoint is refused in one line (exit 2).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

WEIGHTS = ("auto", "model", "ema")


def checkpoint_weights(state: dict[str, Any], weights: str, checkpoint: str | Path) -> dict[str, Any]:
    """The state dict ``weights`` picks from a loaded checkpoint (``auto``: the EMA copy when
    the run kept one, as the trainer's final evaluation does)."""
    from .config import ConfigError

    if weights not in WEIGHTS:
        raise ConfigError(f"weights={weights!r}; expected one of {WEIGHTS}")
    use_ema = weights == "ema" or (weights == "auto" and state.get("ema") is not None)
    if use_ema and state.get("ema") is None:
        raise ConfigError(f"--weights ema: {checkpoint} holds no EMA weights (train.ema_decay was 0)")
    return state["ema"] if use_ema else state["model"]


def build_evaluated_model(cfg: Any, weights_state: dict[str, Any], device: Any) -> Any:
    """The model as the trainer builds it for evaluation (device normalisation of uint8
    inputs, channels_last as configured), so that its forward is the one eval.json came from."""
    import torch

    from .data import attach_device_normalization
    from .models import create_model

    model = create_model(cfg.model.name, **cfg.model.options).to(device)
    attach_device_normalization(model, cfg)  # the loaders yield uint8 images then
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.load_state_dict(weights_state)
    return model


def evaluate_checkpoint(
    checkpoint: str | Path, output: str | Path, overrides: Sequence[str] = (), weights: str = "auto"
) -> dict[str, Any]:
    """Evaluate the weights of ``checkpoint`` (``auto``: the EMA copy when the run kept one)
    with its config and ``overrides``; eval.json and curve.png go into ``output`` and rank 0
    prints the anytime table. Returns the eval.json record."""
    from .config import apply_overrides, check_run
    from .data import resolve_data_spec
    from .distributed import cleanup, init_distributed
    from .engine.checkpoint import load_checkpoint
    from .evaluate import evaluate_run, print_anytime_table
    from .meta import WeightNet

    state = load_checkpoint(checkpoint, keys=("config", "model"))
    cfg = apply_overrides(state["config"], overrides)
    check_run(cfg, evaluating=True)  # before the data or the model is touched
    weights_state = checkpoint_weights(state, weights, checkpoint)
    env = init_distributed()
    try:
        model = build_evaluated_model(cfg, weights_state, env.device)
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
    from .config import ConfigError, one_line
    from .engine.checkpoint import CheckpointReadError
    from .utils import SignalAbort, StopSignals

    result = output / "eval.json"
    before = result.stat().st_mtime_ns if result.exists() else None
    try:
        with StopSignals(interrupt=True):  # an evaluation keeps nothing worth saving: stop at once
            evaluate_checkpoint(checkpoint, output, args.overrides, weights=args.weights)
    except ConfigError as err:  # raised before any work: a bad override, data spec or --weights
        parser.exit(2, f"l2w-eval: config error: {one_line(err)}\n")
    except CheckpointReadError as err:
        parser.exit(2, f"l2w-eval: {err}\n")
    except SignalAbort as err:
        written = result.exists() and result.stat().st_mtime_ns != before  # a signal while plotting
        what = f"{result} was written (curve.png may not be)" if written else f"no new {result} was written"
        message = f"stopped by {err.signal.name} before the evaluation finished; {what}"
        parser.exit(err.exit_code, f"l2w-eval: {message}\n" if os.environ.get("RANK", "0") == "0" else None)


if __name__ == "__main__":
    main()
