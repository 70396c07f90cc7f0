"""``l2w-train``: train a multi-exit network with L2W-DEN (or the plain baseline) and evaluate it.

    l2w-train --config configs/demo.yaml --output runs/demo [key=value ...]

The run folder holds the resolved config, metrics, checkpoints (resumed automatically)
and, at the end, eval.json + curve.png. Under torchrun or Slurm every rank runs this.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .config import Config, ConfigError, apply_overrides, check_run, load_config, one_line, save_config


def run_training(
    config: str | Path | dict | Config,
    output: str | Path,
    overrides: Sequence[str] = (),
    stop_requested: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Train (resuming from OUTPUT/checkpoints/last.pt if present), then evaluate.

    Returns ``{"status": "finished", "step", "eval"}`` or, when ``stop_requested()`` turned
    True on any rank, ``{"status": "preempted", "step"}`` after a checkpoint on all ranks.
    """
    if isinstance(config, (Config, dict)):
        cfg = apply_overrides(config, overrides)
    else:
        cfg = load_config(config, overrides)

    from .distributed import cleanup, init_distributed
    from .engine.trainer import TrainingJob
    from .evaluate import print_anytime_table

    run_dir = Path(output)
    env = init_distributed()
    try:
        if env.rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, run_dir / "config.yaml")
        if env.world_size > 1:
            import torch.distributed as dist

            dist.barrier()
        job = TrainingJob(cfg, run_dir, env)
        try:
            status = job.fit(stop_requested)
            result: dict[str, Any] = {"status": status, "step": job.step, "run_dir": str(run_dir)}
            if status == "finished" and cfg.eval.enabled:
                result["eval"] = job.evaluate()
                if env.rank == 0:
                    print_anytime_table(result["eval"])
        finally:
            job.close()
    finally:
        cleanup()
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="l2w-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument("--output", required=True, help="run folder (resumed if it holds a checkpoint)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=0.4")
    args = parser.parse_args(argv)
    try:  # every value, before any data preparation or model construction
        check_run(load_config(args.config, args.overrides))
    except ConfigError as err:
        parser.exit(2, f"l2w-train: config error: {one_line(err)}\n")
    result = run_training(args.config, args.output, args.overrides)
    if result["status"] != "finished":
        sys.exit(3)


if __name__ == "__main__":
    main()
