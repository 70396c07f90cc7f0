"""Checks before anything is submitted: options, time limits, arrays, configs, Slurm, submitit.

Everything here runs in the launching process. Each check raises :class:`LaunchError` with a
one-line message, so a bad option, config or cluster stops the launch with nothing queued
(rather than failing on every rank once the job starts).
"""

from __future__ import annotations

import argparse
import itertools
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from l2w_dist.launch import submitit_internals

CLUSTERS = ("slurm", "local", "debug")
REPO_ROOT = Path(__file__).resolve().parents[2]


class LaunchError(RuntimeError):
    """A problem found before anything was submitted (bad option, Slurm not usable, bad config)."""


def check_resources(args: argparse.Namespace) -> tuple[int, int]:
    """Check the cluster and resource options; returns (tasks per node, time limit in minutes)."""
    cluster = args.cluster
    if cluster not in CLUSTERS:
        raise LaunchError(f"--cluster {cluster!r} is not one of {list(CLUSTERS)}")
    for name in ("nodes", "cpus_per_task", "max_requeues", "signal_delay"):
        value = getattr(args, name)
        if value is None or value < (0 if name in ("max_requeues", "signal_delay") else 1):
            raise LaunchError(
                f"--{name.replace('_', '-')} {value!r} must be "
                f"{'>= 0' if name in ('max_requeues', 'signal_delay') else '>= 1'}"
            )
    if args.gpus_per_node < 0:
        raise LaunchError(f"--gpus-per-node {args.gpus_per_node} must be >= 0")
    if cluster == "debug":  # one rank in this process, whatever the GPU count
        if args.tasks_per_node not in (None, 1):
            raise LaunchError(
                f"--cluster debug runs one task in this process; got --tasks-per-node "
                f"{args.tasks_per_node} (use --cluster local for several ranks without Slurm)"
            )
        tasks = 1
    else:
        tasks = args.tasks_per_node if args.tasks_per_node is not None else max(args.gpus_per_node, 1)
        if tasks < 1:
            raise LaunchError(f"--tasks-per-node {tasks} must be >= 1")
        if args.gpus_per_node > 0 and tasks != args.gpus_per_node:
            raise LaunchError(
                f"--tasks-per-node {tasks} with --gpus-per-node {args.gpus_per_node}: the "
                "launcher runs one task per GPU (use --gpus-per-node 0 for CPU ranks)"
            )
    if cluster != "slurm" and args.nodes != 1:
        raise LaunchError(f"--nodes {args.nodes}: --cluster {cluster} runs on this machine only (1 node)")
    timeout_min = parse_time(args.time)
    if args.signal_delay >= timeout_min * 60:
        raise LaunchError(f"--signal-delay {args.signal_delay}s must be shorter than --time {args.time}")
    return tasks, timeout_min


def parse_time(text: str) -> int:
    """Slurm time formats -> whole minutes (rounded up): M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    value = text.strip()
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", value)
    if not match:
        raise LaunchError(f"--time {text!r} is not a Slurm time; use e.g. 90, 12:00:00 or 2-00:00:00")
    days, a, b, c = match.groups()
    parts = [int(x) for x in (a, b, c) if x is not None]
    if days is not None:  # D-H, D-H:M, D-H:M:S
        hours, minutes, seconds = (parts + [0, 0])[:3]
        total = int(days) * 86400 + hours * 3600 + minutes * 60 + seconds
    elif len(parts) == 1:
        total = parts[0] * 60
    elif len(parts) == 2:
        total = parts[0] * 60 + parts[1]
    else:
        total = parts[0] * 3600 + parts[1] * 60 + parts[2]
    if total <= 0:
        raise LaunchError(f"--time {text!r} must be positive")
    return -(-total // 60)


def expand_array(axes: Sequence[str]) -> list[list[str]]:
    """``--array`` values -> the override set of every array task (the product of all axes).

    An axis is either ``KEY=V1,V2,...`` (one task per value) or override sets separated by
    ``;`` (``"optim.lr=0.4 meta.interval=10;optim.lr=0.8"``: one task per set).
    """
    if not axes:
        return [[]]
    choices: list[list[list[str]]] = []
    for axis in axes:
        if ";" in axis:
            sets = [shlex.split(part) for part in axis.split(";") if part.strip()]
        else:
            tokens = shlex.split(axis)
            if len(tokens) != 1 or "=" not in tokens[0]:
                raise LaunchError(f"--array {axis!r}: expected KEY=V1,V2,... or override sets separated by ';'")
            key, _, values = tokens[0].partition("=")
            sets = [[f"{key}={v}"] for v in values.split(",") if v != ""]
        bad = [tok for s in sets for tok in s if "=" not in tok]
        if not sets or bad:
            raise LaunchError(f"--array {axis!r}: every item must be key=value (bad: {bad or 'empty'})")
        choices.append(sets)
    return [sum(combo, []) for combo in itertools.product(*choices)]


def _run_quick(cmd: list[str], timeout_s: float) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as err:
        raise LaunchError(
            f"Slurm controller unreachable: `{' '.join(cmd)}` did not answer within "
            f"{timeout_s:g} s (is slurmctld running and SLURM_CONF right?)"
        ) from err


def check_slurm(partition: str | None, timeout_s: float = 15.0) -> str:
    """Fail fast, before submitting, when Slurm cannot take the job. Returns the partition."""
    if shutil.which("sbatch") is None:
        raise LaunchError(
            "--cluster slurm: sbatch is not on PATH (no Slurm client here); use --cluster local to run on this machine"
        )
    ping = _run_quick(["scontrol", "ping"], timeout_s)
    answer = (ping.stdout + ping.stderr).strip()
    if ping.returncode != 0 or "is UP" not in answer:
        raise LaunchError(f"Slurm controller unreachable: `scontrol ping` said: {answer or ping.returncode}")
    listing = _run_quick(["sinfo", "-h", "-o", "%P %a"], timeout_s)
    if listing.returncode != 0:
        raise LaunchError(f"Slurm controller unreachable: `sinfo` failed: {listing.stderr.strip()}")
    states: dict[str, str] = {}
    default = None
    for line in listing.stdout.split("\n"):
        if not line.strip():
            continue
        name, _, avail = line.strip().partition(" ")
        if name.endswith("*"):
            name = name[:-1]
            default = name
        states[name] = avail.strip()
    if partition is None:
        if default is None:
            raise LaunchError(
                f"no --partition given and the cluster has no default partition; choose one of {sorted(states)}"
            )
        partition = default
    for name in partition.split(","):  # sbatch takes a list: the first that can run the job
        if name in states:
            if states[name] != "up":
                print(f"warning: partition {name!r} is {states[name]!r}: the job waits until it is up", file=sys.stderr)
            continue
        # Not listed: hidden partitions are only shown to `scontrol show partition NAME`.
        shown = _run_quick(["scontrol", "show", "partition", name], timeout_s)
        if shown.returncode != 0 or f"PartitionName={name}" not in shown.stdout:
            raise LaunchError(f"--partition {name!r} does not exist on this cluster; available: {sorted(states)}")
    return partition


def validate_configs(config: str, override_sets: Sequence[Sequence[str]], world_size: int = 1) -> list[Any]:
    """Load and check every run's config as ``l2w-train`` does (:func:`l2w_dist.config.check_run`
    for ``world_size`` ranks), so a bad key or value fails here, not on the cluster."""
    from l2w_dist.config import ConfigError, check_run, load_config, one_line

    configs = []
    for overrides in override_sets:
        try:
            cfg = load_config(config, list(overrides))
            check_run(cfg, world_size=world_size)
        except ConfigError as err:
            where = f" (with overrides {' '.join(overrides)})" if overrides else ""
            raise LaunchError(f"config error in {config}{where}: {one_line(err)}") from err
        configs.append(cfg)
    return configs


def resolve_config(path: str) -> Path:
    """A config path as given, or relative to the repository (so presets work from any cwd)."""
    candidate = Path(path)
    if not candidate.is_file() and not candidate.is_absolute() and (REPO_ROOT / candidate).is_file():
        candidate = REPO_ROOT / candidate
    if not candidate.is_file():
        raise LaunchError(f"config error: config file not found: {path}")
    return candidate.resolve()


def check_overrides(tokens: Sequence[str]) -> None:
    """Every trailing argument must be a KEY=VALUE config override."""
    for tok in tokens:
        if "=" not in tok:
            raise LaunchError(f"unexpected argument {tok!r}: overrides are KEY=VALUE (e.g. optim.lr=0.4)")


def check_submitit() -> None:
    """The jobs read private submitit attributes after a preemption warning: check they exist now."""
    try:
        submitit_internals.check_job_internals()
    except submitit_internals.SubmititInternalsError as err:
        raise LaunchError(str(err)) from err
    if not submitit_internals.is_tested_version():
        print(
            f"warning: submitit {submitit_internals.installed_version_text()} is outside the range this "
            f"launcher was tested with (submitit{submitit_internals.tested_range_text()})",
            file=sys.stderr,
        )
