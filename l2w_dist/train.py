"""``l2w-train``: train a multi-exit network with L2W-DEN (or the plain baseline) and evaluate it.

    l2w-train --config configs/demo.yaml --output runs/demo [key=value ...]

The run folder holds the resolved config, metrics, checkpoints (resumed automatically)
and, at the end, eval.json + curve.png. Under torchrun or Slurm every rank runs this.

SIGINT (Ctrl-C) or SIGTERM stops every rank at the next iteration boundary, writes
checkpoints/last.pt and exits 130 / 143 with the command that resumes; a second Ctrl-C
aborts at once (the previous checkpoint is kept). See docs/reliability.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .config import Config, ConfigError, apply_overrides, check_run, load_config, one_line, save_config
from .utils import SignalAbort, StopSignals


def run_training(
    config: str | Path | dict | Config,
    output: str | Path,
    overrides: Sequence[str] = (),
    stop_requested: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Train (resuming from OUTPUT/checkpoints/last.pt if present), then evaluate.

    Returns ``{"status": "finished", "step", "eval"}`` or, when ``stop_requested()`` turned
    True on any rank, ``{"status": "preempted", "step", "stop_step", "epochs", "checkpoint"}``
    after a checkpoint on all ranks. A :class:`~l2w_dist.utils.StopSignals` as
    ``stop_requested`` also interrupts the final evaluation (the final checkpoint is written
    by then: the resumed run only evaluates).
    """
    if isinstance(config, (Config, dict)):
        cfg = apply_overrides(config, overrides)
    else:
        cfg = load_config(config, overrides)

    from .distributed import cleanup, init_distributed
    from .distributed.utils import any_rank
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
            if status == "finished" and cfg.eval.enabled and stop_requested is not None:
                if any_rank(stop_requested(), job.device):  # a stop during the final checkpoint
                    status = "preempted"
            result: dict[str, Any] = {"status": status, "step": job.step, "run_dir": str(run_dir)}
            if status == "finished" and cfg.eval.enabled:
                interrupting = (
                    stop_requested.interrupting()
                    if isinstance(stop_requested, StopSignals)
                    else contextlib.nullcontext()
                )
                try:
                    with interrupting:
                        result["eval"] = job.evaluate()
                    if env.rank == 0:
                        print_anytime_table(result["eval"])
                except SignalAbort:
                    result["status"] = status = "preempted"
            if status == "preempted":
                result.update(
                    stop_step=job.stop_step, epochs=job.step / job.steps_per_epoch, checkpoint=str(job.ckpt.last)
                )
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
    from .engine.checkpoint import CheckpointError, CheckpointWriteError

    resume = _resume_command(args.config, args.output, args.overrides)
    main_rank = os.environ.get("RANK", "0") == "0"
    stop = StopSignals()  # SIGINT, SIGTERM: stop at the next iteration boundary; a 2nd SIGINT aborts
    try:
        with stop:
            result = run_training(args.config, args.output, args.overrides, stop_requested=stop)
    except SignalAbort as err:
        kept = Path(args.output) / "checkpoints"
        message = f"aborted by a second {err.signal.name}; the newest checkpoint in {kept} is kept. To resume: {resume}"
        parser.exit(err.exit_code, f"l2w-train: {message}\n" if main_rank else None)
    except CheckpointError as err:  # one line: which file, what is wrong, what was kept
        parser.exit(1 if isinstance(err, CheckpointWriteError) else 2, f"l2w-train: {err}\n")
    if result["status"] != "finished":
        if main_rank:
            print(
                f"l2w-train: stopped by {stop.first.name if stop.first else 'request'} after step {result['step']} "
                f"of {result['stop_step']} (epoch {result['epochs']:.2f}); checkpoint written: {result['checkpoint']}. "
                f"To resume: {resume}",
                file=sys.stderr,
                flush=True,
            )
        sys.exit(stop.exit_code or 3)


def _resume_command(config: str, output: str, overrides: Sequence[str]) -> str:
    """The command line that continues this run: the same one (under torchrun, with its layout)."""
    args = shlex.join(["--config", config, "--output", output, *overrides])
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return f"l2w-train {args}"
    nodes, per_node = os.environ.get("GROUP_WORLD_SIZE", "1"), os.environ.get("LOCAL_WORLD_SIZE", "1")
    rendezvous = " <the same rendezvous options, on every node>" if nodes != "1" else ""
    return f"torchrun --nnodes={nodes} --nproc-per-node={per_node}{rendezvous} -m l2w_dist.train {args}"


if __name__ == "__main__":
    main()
