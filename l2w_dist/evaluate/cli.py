"""``l2w-eval --checkpoint PATH``: anytime + budgeted-batch evaluation of a saved run.

The checkpoint carries its resolved config, so only the checkpoint is needed; data keys
can be overridden (``data.spec=...``) to evaluate on another copy of the data. Writes
eval.json and curve.png next to the run (or into ``--output``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path


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
        choices=["auto", "model", "ema"],
        default="auto",
        help="which weights to evaluate (auto: the EMA when the run kept one)",
    )
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. data.spec=/data/in1k.json")
    args = parser.parse_args(argv)
    ckpt = Path(args.checkpoint)
    if not ckpt.is_file():
        parser.exit(2, f"l2w-eval: no checkpoint at {ckpt}\n")
    result = evaluate_checkpoint(
        ckpt, Path(args.output) if args.output else ckpt.parent.parent, args.overrides, weights=args.weights
    )
    from ..train import print_anytime_table

    print_anytime_table(result)


def evaluate_checkpoint(checkpoint: Path, output: Path, overrides: Sequence[str] = (), weights: str = "auto") -> dict:

    from ..config import apply_overrides
    from ..distributed import cleanup, init_distributed
    from ..engine.checkpoint import load_checkpoint
    from ..engine.trainer import attach_device_normalization, eval_loader, resolve_data_spec
    from ..models import create_model
    from ..utils import autocast
    from . import anytime, budgeted, collect_logits, plot_curves, write_eval_json

    state = load_checkpoint(checkpoint)
    cfg = apply_overrides(state["config"], overrides)
    env = init_distributed()
    try:
        model = create_model(cfg.model.name, **cfg.model.options)
        attach_device_normalization(model, cfg)  # eval_loader yields uint8 images then
        use_ema = weights == "ema" or (weights == "auto" and state.get("ema") is not None)
        if use_ema and state.get("ema") is None:
            raise ValueError(f"{checkpoint} holds no EMA weights (train.ema_decay was 0)")
        model.load_state_dict(state["ema"] if use_ema else state["model"])
        model.to(env.device)
        spec = resolve_data_spec(cfg, env)
        with autocast(env.device, cfg.train.precision):
            cal = collect_logits(model, eval_loader(cfg, env, spec, "holdout"), env.device)
            test = collect_logits(model, eval_loader(cfg, env, spec, "test"), env.device)
        result = {"anytime": anytime(*test, model.exit_flops), "budgeted": budgeted(*cal, *test, model.exit_flops)}
        if env.rank == 0:
            output.mkdir(parents=True, exist_ok=True)
            write_eval_json(output / "eval.json", result["anytime"], result["budgeted"])
            plot_curves({output.name: result}, output / "curve.png")
        return result
    finally:
        cleanup()


if __name__ == "__main__":
    main()
