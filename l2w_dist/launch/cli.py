"""The launcher's command line: ``launch/imagenet.py`` and ``launch/cifar.py`` pick a
:class:`Preset` (default config and resources) and call :func:`main`.

:func:`launch` runs every check in :mod:`l2w_dist.launch.preflight`, then submits one
:class:`~l2w_dist.launch.task.TrainingRun` per run folder through a submitit executor
(``--cluster slurm``: sbatch; ``local``: processes on this machine; ``debug``: in this
process), records the launch in OUTPUT/launch.json and prints where everything is.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit

from l2w_dist.launch import submitit_internals
from l2w_dist.launch.preflight import (
    CLUSTERS,
    REPO_ROOT,
    LaunchError,
    check_overrides,
    check_resources,
    check_slurm,
    check_submitit,
    expand_array,
    resolve_config,
    validate_configs,
)
from l2w_dist.launch.task import DEFAULT_TRAINER, REQUEUE_LOG, RequeueLog, TrainingRun, path_safe, resolve_trainer
from l2w_dist.utils import atomic_write_json


@dataclass(frozen=True)
class Preset:
    """Defaults of one launcher script (a recipe's config and the resources it usually needs)."""

    name: str
    config: str
    gpus_per_node: int = 1
    cpus_per_task: int = 8
    time: str = "24:00:00"
    mem: str | None = None


IMAGENET = Preset("imagenet", "configs/imagenet/msdnet_step4.yaml", gpus_per_node=8, cpus_per_task=8, time="24:00:00")
CIFAR = Preset("cifar", "configs/cifar100/msdnet.yaml", gpus_per_node=1, cpus_per_task=4, time="12:00:00")


def build_parser(preset: Preset) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"launch/{preset.name}.py",
        description=f"Submit an l2w_dist training run ({preset.name} defaults) through submitit.",
        epilog="Trailing KEY=VALUE arguments override the config (e.g. optim.lr=0.4 train.max_steps=20).",
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    p.add_argument(
        "--cluster",
        required=True,
        choices=CLUSTERS,
        help="slurm: sbatch; local: processes on this machine; debug: in this process",
    )
    p.add_argument("--config", default=preset.config, help=f"config file (default {preset.config})")
    p.add_argument(
        "--output",
        default=None,
        help="run folder shared by all ranks (same folder = resume); default runs/<config>-<time>",
    )
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument(
        "--gpus-per-node",
        type=int,
        default=preset.gpus_per_node,
        help=f"GPUs per node; one task per GPU (default {preset.gpus_per_node})",
    )
    p.add_argument(
        "--tasks-per-node",
        type=int,
        default=None,
        help="tasks (ranks) per node; default: --gpus-per-node, or 1 without GPUs. "
        "With --gpus-per-node 0 this asks for CPU ranks (gloo)",
    )
    p.add_argument("--cpus-per-task", type=int, default=preset.cpus_per_task)
    p.add_argument("--partition", default=None, help="Slurm partition (default: the cluster's default)")
    p.add_argument("--account", default=None)
    p.add_argument("--qos", default=None)
    p.add_argument("--constraint", default=None)
    p.add_argument(
        "--time",
        default=preset.time,
        help=f"time limit per attempt, Slurm format (default {preset.time}); the job requeues itself",
    )
    p.add_argument("--mem", default=preset.mem, help="memory per node, Slurm format (e.g. 64G)")
    p.add_argument(
        "--array",
        action="append",
        default=[],
        metavar="AXIS",
        help="one job per value: KEY=V1,V2,... or 'SET1;SET2' (space-separated overrides); "
        "repeat for a grid. Each task gets OUTPUT/<index>_<overrides>",
    )
    p.add_argument("--seeds", default=None, help="shorthand for --array train.seed=S1,S2,...")
    p.add_argument(
        "--signal-delay",
        type=int,
        default=120,
        metavar="SECONDS",
        help="USR2 this long before the time limit: the grace period to reach an iteration "
        "boundary, checkpoint and requeue (default 120)",
    )
    p.add_argument(
        "--max-requeues",
        type=int,
        default=20,
        help="times the job may requeue itself after time limits/preemption warnings (default 20)",
    )
    p.add_argument("--name", default=None, help=f"job name (default l2w-{preset.name})")
    p.add_argument(
        "--wait",
        action="store_true",
        help="slurm: wait for the job(s) and print the results (local and debug always wait)",
    )
    p.add_argument(
        "--check-timeout",
        type=float,
        default=15.0,
        metavar="SECONDS",
        help="how long `scontrol ping`/`sinfo` may take before the controller counts as unreachable",
    )
    p.add_argument("--trainer", default=DEFAULT_TRAINER, help=argparse.SUPPRESS)  # tests, custom trainers
    return p


@dataclass
class Submitted:
    """What :func:`launch` submitted: one submitit job per run folder."""

    jobs: list[Any]
    run_dirs: list[Path]
    folder: Path
    cluster: str


def launch(args: argparse.Namespace, preset: Preset) -> Submitted:
    """Check everything, then submit. Raises LaunchError before submitting anything on bad input."""
    cluster = args.cluster
    tasks, timeout_min = check_resources(args)
    config = resolve_config(args.config)
    check_overrides(args.overrides)
    axes = list(args.array) + ([f"train.seed={args.seeds}"] if args.seeds else [])
    array_sets = expand_array(axes)
    override_sets = [list(args.overrides) + extra for extra in array_sets]
    configs = validate_configs(str(config), override_sets, world_size=tasks * args.nodes)
    resolve_trainer(args.trainer)  # the jobs import it too; fail here rather than on every rank
    check_submitit()

    partition = check_slurm(args.partition, args.check_timeout) if cluster == "slurm" else None

    output = Path(args.output or f"runs/{config.stem}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    if axes:
        run_dirs = [output / f"{i}_{path_safe('_'.join(extra))}" for i, extra in enumerate(array_sets)]
    else:
        run_dirs = [output]
    folder = output / "submitit"
    _make_importable_in_jobs()

    executor = make_executor(
        args, preset, cluster, folder, partition=partition, tasks_per_node=tasks, timeout_min=timeout_min
    )

    jobs_to_submit = []
    for run_dir, overrides, cfg in zip(run_dirs, override_sets, configs):
        wandb_id = _new_wandb_id() if cfg.wandb.mode != "disabled" else None
        jobs_to_submit.append(
            TrainingRun(
                str(config),
                str(run_dir),
                overrides,
                max_requeues=args.max_requeues,
                trainer=args.trainer,
                wandb_run_id=wandb_id,
            )
        )
    if len(jobs_to_submit) == 1:
        jobs = [executor.submit(jobs_to_submit[0])]
    else:
        with executor.batch():
            jobs = [executor.submit(job) for job in jobs_to_submit]
    for run_dir in run_dirs:
        run_dir.mkdir(parents=True, exist_ok=True)
    history = output / "launch.json"  # every launch into this folder (a relaunch resumes the run)
    launches = json.loads(history.read_text())["launches"] if history.exists() else []
    launches.append(
        {
            "command": [sys.argv[0], *sys.argv[1:]],
            "cluster": cluster,
            "preset": preset.name,
            "config": str(config),
            "job_ids": [str(j.job_id) for j in jobs],
            "run_dirs": [str(d) for d in run_dirs],
            "overrides": override_sets,
            "partition": partition,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
    )
    atomic_write_json(history, {"launches": launches})
    _print_submission(jobs, run_dirs, jobs_to_submit, configs, cluster)
    return Submitted(jobs=jobs, run_dirs=run_dirs, folder=folder, cluster=cluster)


def make_executor(
    args: argparse.Namespace,
    preset: Preset,
    cluster: str,
    folder: Path,
    *,
    partition: str | None,
    tasks_per_node: int,
    timeout_min: int,
) -> submitit.AutoExecutor:
    """The submitit executor for ``cluster`` with the job's resources (no Slurm contact here)."""
    # cluster= explicitly: with sbatch on PATH, AutoExecutor would otherwise pick slurm itself.
    extra = {"slurm_max_num_timeout": args.max_requeues} if cluster == "slurm" else {}
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster, **extra)
    params: dict[str, Any] = dict(
        name=args.name or f"l2w-{preset.name}",
        timeout_min=timeout_min,
        nodes=args.nodes,
        tasks_per_node=tasks_per_node,
        cpus_per_task=args.cpus_per_task,
    )
    if args.gpus_per_node > 0:
        params["gpus_per_node"] = args.gpus_per_node
    if cluster == "slurm":
        params.update(
            slurm_partition=partition,
            slurm_account=args.account,
            slurm_qos=args.qos,
            slurm_constraint=args.constraint,
            slurm_mem=args.mem,
            slurm_signal_delay_s=args.signal_delay,
            slurm_additional_parameters={"requeue": True},
        )  # preemption may requeue it too
    executor.update_parameters(**params)
    if cluster == "local":  # submitit's LocalExecutor has the option but AutoExecutor does not pass it
        submitit_internals.set_local_signal_delay(executor, args.signal_delay)
    return executor


def _make_importable_in_jobs() -> None:
    """Jobs unpickle TrainingRun, so they must import l2w_dist: put a source checkout on PYTHONPATH.

    sbatch and the local executor pass this process's environment on to the job.
    """
    if (REPO_ROOT / "l2w_dist").is_dir() and (REPO_ROOT / "setup.py").is_file():
        entries = [e for e in os.environ.get("PYTHONPATH", "").split(os.pathsep) if e]
        if str(REPO_ROOT) not in entries:
            os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *entries])


def _new_wandb_id() -> str:
    import secrets

    return secrets.token_hex(4)


def _print_submission(
    jobs: list[Any], run_dirs: list[Path], specs: list[TrainingRun], configs: list[Any], cluster: str
) -> None:
    for job, run_dir, spec, cfg in zip(jobs, run_dirs, specs, configs):
        print(f"submitted {cluster} job {job.job_id}")
        print(f"  run folder: {run_dir}")
        if spec.overrides:
            print(f"  overrides:  {' '.join(spec.overrides)}")
        if cluster != "debug":
            stdout = str(job.paths.stdout)
            print(f"  logs:       {stdout} (rank 0); {stdout.replace('_0_log.out', '_*_log.*')} (all ranks)")
        print(f"  requeues:   {run_dir / REQUEUE_LOG}")
        if spec.wandb_run_id:
            entity = cfg.wandb.entity or "<your-entity>"
            where = f"https://wandb.ai/{entity}/{cfg.wandb.project}/runs/{spec.wandb_run_id}"
            if cfg.wandb.mode == "offline":
                where += " (offline: `wandb sync` the run's wandb folder to see it there)"
            print(f"  W&B:        {where}")
    sys.stdout.flush()


def wait_and_report(submitted: Submitted) -> list[dict]:
    """Block until every job ends; print each run's status and final per-exit accuracy."""
    results = []
    for job, run_dir in zip(submitted.jobs, submitted.run_dirs):
        try:
            result = job.results()[0]  # rank 0's; all ranks return
        except Exception as err:  # submitit's FailedJobError / UncompletedJobError carry the job's traceback
            print(f"job {job.job_id}: failed; logs in {job.paths.stdout.parent}\n{err}", file=sys.stderr, flush=True)
            results.append({"status": "failed"})
            continue
        results.append(result)
        line = f"job {job.job_id}: {result.get('status')} at step {result.get('step')}"
        anytime = (result.get("eval") or {}).get("anytime") or []
        if anytime:
            line += "; top-1 per exit: " + " ".join(f"{row.get('top1', float('nan')):.2f}" for row in anytime)
        requeues = RequeueLog(run_dir).read()["requeues"]
        print(f"{line}; requeues: {requeues}; results in {run_dir}", flush=True)
    return results


def main(argv: Sequence[str] | None = None, preset: Preset = IMAGENET) -> int:
    parser = build_parser(preset)
    args = parser.parse_intermixed_args(argv)  # overrides may come before, between or after options
    try:
        submitted = launch(args, preset)
    except (LaunchError, submitit_internals.SubmititInternalsError) as err:
        print(f"error: {err}; nothing was submitted", file=sys.stderr)
        return 2
    if submitted.cluster in ("local", "debug") or args.wait:
        results = wait_and_report(submitted)
        return 0 if all(r.get("status") == "finished" for r in results) else 1
    return 0
