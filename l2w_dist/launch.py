"""Launch a training run through submitit: on Slurm, as local processes, or in-process.

    python launch/imagenet.py --cluster slurm --nodes 4 --gpus-per-node 8 --partition gpu \\
        --output runs/msdnet4 optim.lr=0.8
    python launch/cifar.py --cluster local --gpus-per-node 0 --tasks-per-node 2 \\
        --config configs/demo.yaml --output runs/demo train.max_steps=20

``launch/imagenet.py`` and ``launch/cifar.py`` only pick a :class:`Preset` (default config
and resources) and call :func:`main`.

What runs on the cluster is :class:`TrainingRun`, one process per task (one task per
GPU): it exports the torch.distributed rank environment from submitit's job environment,
calls the trainer (``l2w_dist.train.run_training``) on the shared run folder, and handles
preemption and time limits as follows.

Preemption, time limits and requeue (see docs/slurm.md). submitit's own handler for the
warning signal (USR2, sent ``--signal-delay`` seconds before the time limit) calls
``checkpoint()``, requeues the job and exits *from inside the signal handler*, i.e. in the
middle of whatever the process was doing — a forward pass, an all-reduce, or a checkpoint
write — and only on rank 0. Saving the training state there would not be consistent, so
TrainingRun replaces that handler, for USR2 and SIGTERM, with one that only records the
signal. The trainer polls the record at iteration boundaries (``stop_requested``); when
any rank has seen a signal all ranks agree, rank 0 writes a checkpoint, and the trainer
returns ``{"status": "preempted"}``. Only then does rank 0 do what submitit's handler
would have done: store ``checkpoint()``'s DelayedSubmission as the job's pickle and
requeue the job (USR2), or just exit (SIGTERM: Slurm itself is requeueing, preempting or
cancelling the job). The requeued job runs the same callable, which resumes from
``RUN_DIR/checkpoints/last.pt``. Every start and stop is recorded in RUN_DIR/requeues.json.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit

from l2w_dist.utils import atomic_write_json

CLUSTERS = ("slurm", "local", "debug")
DEFAULT_TRAINER = "l2w_dist.train:run_training"
REPO_ROOT = Path(__file__).resolve().parents[1]
REQUEUE_LOG = "requeues.json"


class LaunchError(RuntimeError):
    """A problem found before anything was submitted (bad option, Slurm not usable, bad config)."""


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


# --------------------------------------------------------------------------------------------
# The job: what runs on every task
# --------------------------------------------------------------------------------------------


class StopSignals:
    """Records preemption/time-limit signals; the trainer polls it at iteration boundaries.

    USR2 (submitit's warning signal, ``--signal=USR2@delay``) means "checkpoint and requeue
    yourself". SIGTERM means Slurm is ending the job now (``scontrol requeue``, preemption,
    ``scancel``): checkpoint within KillWait / GraceTime and exit; Slurm requeues (or not).
    The handler does nothing else: no I/O, no collectives, so it is safe at any point.
    """

    def __init__(self) -> None:
        self.received: list[str] = []
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (_usr_signal(), signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        self.received.append(signal.Signals(signum).name)

    def __call__(self) -> bool:
        return bool(self.received)

    @property
    def requeue_requested(self) -> bool:
        return _usr_signal().name in self.received


def _usr_signal() -> signal.Signals:
    return submitit.JobEnvironment._usr_sig()


def resolve_trainer(path: str) -> Callable[..., dict]:
    """``"package.module:function"`` -> the function (imported in the job, not at submission)."""
    module, sep, attr = path.partition(":")
    if not sep or not module or not attr:
        raise LaunchError(f"trainer {path!r} must look like 'package.module:function'")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise LaunchError(f"trainer {path!r} cannot be loaded: {err}") from err


class TrainingRun(submitit.helpers.Checkpointable):
    """One training run; submitit pickles it and calls it once per task (rank).

    It holds no training state: everything lives in ``output`` (the trainer's checkpoints),
    so the same object can be requeued any number of times and resume where it stopped.
    """

    def __init__(
        self,
        config: str,
        output: str,
        overrides: Sequence[str] = (),
        *,
        max_requeues: int = 20,
        trainer: str = DEFAULT_TRAINER,
        rank_wait_s: float = 120.0,
        wandb_run_id: str | None = None,
    ) -> None:
        self.config = str(config)
        self.output = str(output)
        self.overrides = list(overrides)
        self.max_requeues = int(max_requeues)
        self.trainer = trainer
        self.rank_wait_s = float(rank_wait_s)
        self.wandb_run_id = wandb_run_id
        self._finished = False

    def __call__(self) -> dict:
        env = submitit.JobEnvironment()
        cluster = env.name()
        dist_env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        rank = dist_env.rank
        out = Path(self.output)
        if self.wandb_run_id:  # the id the launcher printed a link for; the trainer's logger uses it
            os.environ["WANDB_RUN_ID"] = self.wandb_run_id  # read by wandb.init(id=None); a resume keeps its id
        log = RequeueLog(out)
        job_id = _job_key(env)
        if rank == 0:
            log.record_start(job_id=job_id, world_size=dist_env.world_size)
            for stale in (out / ".launch").glob("decision-*.json"):  # previous attempts' decisions
                stale.unlink(missing_ok=True)
        print(
            f"[l2w launch] {cluster} job {env.job_id} rank {rank}/{dist_env.world_size} on "
            f"{socket.gethostname()}; master {dist_env.master_addr}:{dist_env.master_port}; "
            f"run folder {out}",
            flush=True,
        )

        stop = StopSignals()
        stop.install()
        try:
            run_training = resolve_trainer(self.trainer)
            result = run_training(self.config, out, self.overrides, stop_requested=stop)
        except Exception as err:
            if rank == 0:
                log.record("failed", job_id=job_id, error=f"{type(err).__name__}: {err}"[:1000])
            raise
        finally:
            # In-process (debug) runs give the launching process its handlers back. Cluster
            # tasks keep ours: a late signal must not make submitit requeue a finished run.
            if cluster == "debug":
                stop.restore()
        status = result.get("status")
        if status == "finished":
            self._finished = True
            if cluster != "debug":
                # Done: a time-limit warning or SIGTERM arriving now must not kill the process
                # while submitit writes the result. SIG_IGN (unlike a Python handler, which the
                # interpreter resets to the default when it shuts down) lasts until the exit.
                signal.signal(_usr_signal(), signal.SIG_IGN)
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
            if rank == 0:
                log.record("finished", job_id=job_id, step=result.get("step"))
            return result
        if status != "preempted":
            raise RuntimeError(f"trainer {self.trainer} returned status {status!r}; expected 'finished' or 'preempted'")
        return self._after_preemption(env, rank, stop, result, log)

    def _after_preemption(
        self, env: submitit.JobEnvironment, rank: int, stop: StopSignals, result: dict, log: RequeueLog
    ) -> dict:
        """All ranks stopped at the same iteration and the checkpoint is written: requeue or exit."""
        step = result.get("step")
        job_id = _job_key(env)
        marker = Path(self.output) / ".launch" / f"decision-{_safe(job_id)}-step{step}.json"
        if rank != 0:
            decision = _wait_for_json(marker, self.rank_wait_s)
            if decision and decision.get("action") == "gave-up":
                raise RuntimeError(decision["message"])
            sys.exit(-1)  # no result pickle: the job is not over; Slurm kills/requeues the step

        signals = sorted(set(stop.received))
        if not stop.requeue_requested:
            # SIGTERM: Slurm is requeueing / preempting / cancelling this job and will kill it
            # after KillWait; the checkpoint is on disk, nothing more to do.
            log.record(
                "stopped",
                job_id=job_id,
                step=step,
                signals=signals,
                note="Slurm ends the job (requeue, preemption or scancel); not requeued by us",
            )
            _write_json(marker, {"action": "exit"})
            sys.exit(-1)

        done = log.self_requeues(job_id)
        if done >= self.max_requeues:
            message = (
                f"preempted/timed out at step {step} after {done} requeues: reached --max-requeues "
                f"{self.max_requeues}. The checkpoint in {self.output}/checkpoints is complete; "
                "launch again with the same --output to continue."
            )
            log.record("gave-up", job_id=job_id, step=step, signals=signals)
            _write_json(marker, {"action": "gave-up", "message": message})
            raise RuntimeError(message)

        log.record("requeued", job_id=job_id, step=step, signals=signals, requeues=done + 1)
        if env.name() == "debug":  # no scheduler, no pickle: run again here
            print(f"[l2w launch] debug: re-running in process (requeue {done + 1})", flush=True)
            return self()
        # What submitit's signal handler would have done, now at an iteration boundary: store
        # the checkpointed callable as the job's pickle, then requeue.
        paths = env.paths
        submitted = submitit.core.utils.DelayedSubmission.load(paths.submitted_pickle)
        countdown = submitted._timeout_countdown
        delayed = self.checkpoint()
        delayed.set_timeout(submitted._timeout_min, countdown)
        with submitit.core.utils.temporary_save_path(paths.submitted_pickle) as tmp:
            delayed.dump(tmp)
        _write_json(marker, {"action": "requeue"})
        print(
            f"[l2w launch] requeueing job {job_id} at step {step} (requeue {done + 1} of at most {self.max_requeues})",
            flush=True,
        )
        try:
            env._requeue(countdown)  # slurm: scontrol requeue; local: exits with submitit's requeue code
        except Exception as err:
            log.record("requeue-failed", job_id=job_id, step=step, error=str(err)[:1000])
            raise RuntimeError(
                f"could not requeue job {job_id} ({err}); the checkpoint at step {step} is "
                f"complete: launch again with --output {self.output} to continue"
            ) from err
        sys.exit(-1)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission | None:
        """The callable to requeue: this same job (its state is on disk); None once finished.

        Also what submitit's own handler calls if a signal arrives before our handlers are in
        place: the requeued job then resumes from the last checkpoint the trainer completed
        (checkpoints are written atomically), so its state is consistent too.
        """
        if self._finished:
            return None
        return submitit.helpers.DelayedSubmission(
            type(self)(
                self.config,
                self.output,
                self.overrides,
                max_requeues=self.max_requeues,
                trainer=self.trainer,
                rank_wait_s=self.rank_wait_s,
                wandb_run_id=self.wandb_run_id,
            )
        )


class RequeueLog:
    """RUN_DIR/requeues.json: every start and stop of the run, and how many were requeues.

    A start counts as a requeue when the same job id has started before (Slurm keeps the
    id across requeues, whether the job requeued itself or was requeued from outside).
    Written by rank 0 only, atomically.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / REQUEUE_LOG

    def read(self) -> dict:
        if self.path.exists():
            return json.loads(self.path.read_text())
        return {"requeues": 0, "events": []}

    def record(self, event: str, **fields: Any) -> dict:
        data = self.read()
        data["events"].append({"event": event, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **fields})
        started = [e["job_id"] for e in data["events"] if e["event"] == "start"]
        data["requeues"] = len(started) - len(set(started))
        _write_json(self.path, data)
        return data

    def record_start(self, job_id: str, world_size: int) -> None:
        data = self.record(
            "start",
            job_id=job_id,
            world_size=world_size,
            host=socket.gethostname(),
            slurm_restart_count=int(os.environ.get("SLURM_RESTART_COUNT", "0")),
        )
        if data["requeues"]:
            print(f"[l2w launch] job {job_id} restarted: requeue {data['requeues']} of this run", flush=True)

    def self_requeues(self, job_id: str) -> int:
        """How often this job requeued itself (a new launch starts a new budget)."""
        return sum(e["event"] == "requeued" and e["job_id"] == job_id for e in self.read()["events"])


def _job_key(env: submitit.JobEnvironment) -> str:
    """The job's identity across requeues: Slurm's job id (kept by requeues), the local
    controller's pid; debug ids come from id() in the launcher, so they get its pid too."""
    if env.name() == "debug":
        return f"{env.job_id}-pid{os.getpid()}"
    return str(env.job_id)


def _write_json(path: Path, data: dict) -> None:
    atomic_write_json(path, data)


def _wait_for_json(path: Path, timeout_s: float) -> dict | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists():
            try:
                return json.loads(path.read_text())
            except json.JSONDecodeError:
                pass
        time.sleep(0.2)
    return None


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "-", text).strip("-") or "x"


# --------------------------------------------------------------------------------------------
# Before submitting: options, Slurm reachability, partitions, configs
# --------------------------------------------------------------------------------------------


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


def validate_configs(config: str, override_sets: Sequence[Sequence[str]]) -> list[Any]:
    """Load every run's config with the trainer's loader, so a bad key fails here, not on the cluster."""
    from l2w_dist.config import load_config

    configs = []
    for overrides in override_sets:
        try:
            configs.append(load_config(config, list(overrides)))
        except ValueError as err:
            where = f" (with overrides {' '.join(overrides)})" if overrides else ""
            raise LaunchError(f"config error in {config}{where}: {err}") from err
    return configs


# --------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------


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
    jobs: list[Any]
    run_dirs: list[Path]
    folder: Path
    cluster: str


def launch(args: argparse.Namespace, preset: Preset) -> Submitted:
    """Check everything, then submit. Raises LaunchError before submitting anything on bad input."""
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

    config = _resolve_config(args.config)
    for tok in args.overrides:
        if "=" not in tok:
            raise LaunchError(f"unexpected argument {tok!r}: overrides are KEY=VALUE (e.g. optim.lr=0.4)")
    axes = list(args.array) + ([f"train.seed={args.seeds}"] if args.seeds else [])
    array_sets = expand_array(axes)
    override_sets = [list(args.overrides) + extra for extra in array_sets]
    configs = validate_configs(str(config), override_sets)
    resolve_trainer(args.trainer)  # the jobs import it too; fail here rather than on every rank

    partition = check_slurm(args.partition, args.check_timeout) if cluster == "slurm" else None

    output = Path(args.output or f"runs/{config.stem}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    if axes:
        run_dirs = [output / f"{i}_{_safe('_'.join(extra))}" for i, extra in enumerate(array_sets)]
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
    _write_json(history, {"launches": launches})
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
        executor._executor.parameters["signal_delay_s"] = args.signal_delay
    return executor


def _resolve_config(path: str) -> Path:
    """A config path as given, or relative to the repository (so presets work from any cwd)."""
    candidate = Path(path)
    if not candidate.is_file() and not candidate.is_absolute() and (REPO_ROOT / candidate).is_file():
        candidate = REPO_ROOT / candidate
    if not candidate.is_file():
        raise LaunchError(f"config error: config file not found: {path}")
    return candidate.resolve()


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
    except LaunchError as err:
        print(f"error: {err}", file=sys.stderr)
        print("nothing was submitted", file=sys.stderr)
        return 2
    if submitted.cluster in ("local", "debug") or args.wait:
        results = wait_and_report(submitted)
        return 0 if all(r.get("status") == "finished" for r in results) else 1
    return 0


__all__ = [
    "CIFAR",
    "CLUSTERS",
    "IMAGENET",
    "LaunchError",
    "Preset",
    "RequeueLog",
    "StopSignals",
    "Submitted",
    "TrainingRun",
    "build_parser",
    "check_slurm",
    "expand_array",
    "launch",
    "main",
    "make_executor",
    "parse_time",
    "validate_configs",
    "wait_and_report",
]
