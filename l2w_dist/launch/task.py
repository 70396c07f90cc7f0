"""What runs on every Slurm task: :class:`TrainingRun`, one process per task (one task per GPU).

It exports the torch.distributed rank environment from submitit's job environment, calls
the trainer (``l2w_dist.train.run_training``) on the shared run folder, and handles
preemption and time limits as follows (see docs/slurm.md).

submitit's own handler for the warning signal (USR2, sent ``--signal-delay`` seconds before
the time limit) calls ``checkpoint()``, requeues the job and exits *from inside the signal
handler*, i.e. in the middle of whatever the process was doing — a forward pass, an
all-reduce, or a checkpoint write — and only on rank 0. Saving the training state there
would not be consistent, so TrainingRun replaces that handler, for USR2 and SIGTERM, with
one that only records the signal (:class:`SlurmStopSignals`, on l2w-train's mechanism). The trainer polls the record at
iteration boundaries (``stop_requested``); when any rank has seen a signal all ranks agree,
rank 0 writes a checkpoint, and the trainer returns ``{"status": "preempted"}``. Only then
does rank 0 do what submitit's handler would have done: store ``checkpoint()``'s
DelayedSubmission as the job's pickle and requeue the job (USR2), or just exit (SIGTERM:
Slurm itself is requeueing, preempting or cancelling the job). The requeued job runs the
same callable, which resumes from ``RUN_DIR/checkpoints/last.pt``. Every start and stop is
recorded in RUN_DIR/requeues.json (:class:`RequeueLog`).
"""

from __future__ import annotations

import importlib
import json
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import submitit

from l2w_dist.launch import submitit_internals
from l2w_dist.launch.preflight import LaunchError
from l2w_dist.utils import StopSignals, atomic_write_json

DEFAULT_TRAINER = "l2w_dist.train:run_training"
REQUEUE_LOG = "requeues.json"


class SlurmStopSignals(StopSignals):
    """The Slurm task's stop signals, on the same mechanism as l2w-train's (:class:`StopSignals`).

    USR2 (submitit's warning signal, ``--signal=USR2@delay``) means "checkpoint and requeue
    yourself". SIGTERM means Slurm is ending the job now (``scontrol requeue``, preemption,
    ``scancel``): checkpoint within KillWait / GraceTime and exit; Slurm requeues (or not).
    The handler only records the signal (no I/O, no collectives), so it is safe at any point;
    a repeated signal never aborts (Slurm may send SIGTERM more than once).
    """

    def __init__(self) -> None:
        super().__init__((submitit_internals.usr_signal(), signal.SIGTERM), abort_on_repeat=())

    @property
    def requeue_requested(self) -> bool:
        return submitit_internals.usr_signal().name in self.received


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
        job_id = job_key(env)
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

        stop = SlurmStopSignals()
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
                signal.signal(submitit_internals.usr_signal(), signal.SIG_IGN)
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
            if rank == 0:
                log.record("finished", job_id=job_id, step=result.get("step"))
            return result
        if status != "preempted":
            raise RuntimeError(f"trainer {self.trainer} returned status {status!r}; expected 'finished' or 'preempted'")
        return self._after_preemption(env, rank, stop, result, log)

    def _after_preemption(
        self, env: submitit.JobEnvironment, rank: int, stop: SlurmStopSignals, result: dict, log: RequeueLog
    ) -> dict:
        """All ranks stopped at the same iteration and the checkpoint is written: requeue or exit."""
        step = result.get("step")
        job_id = job_key(env)
        marker = Path(self.output) / ".launch" / f"decision-{path_safe(job_id)}-step{step}.json"
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
            atomic_write_json(marker, {"action": "exit"})
            sys.exit(-1)

        done = log.self_requeues(job_id)
        if done >= self.max_requeues:
            message = (
                f"preempted/timed out at step {step} after {done} requeues: reached --max-requeues "
                f"{self.max_requeues}. The checkpoint in {self.output}/checkpoints is complete; "
                "launch again with the same --output to continue."
            )
            log.record("gave-up", job_id=job_id, step=step, signals=signals)
            atomic_write_json(marker, {"action": "gave-up", "message": message})
            raise RuntimeError(message)

        log.record("requeued", job_id=job_id, step=step, signals=signals, requeues=done + 1)
        if env.name() == "debug":  # no scheduler, no pickle: run again here
            print(f"[l2w launch] debug: re-running in process (requeue {done + 1})", flush=True)
            return self()
        # What submitit's signal handler would have done, now at an iteration boundary: store
        # the checkpointed callable as the job's pickle, then requeue.
        paths = env.paths
        submitted = submitit.core.utils.DelayedSubmission.load(paths.submitted_pickle)
        timeout_min, countdown = submitit_internals.submission_timeout(submitted)
        delayed = self.checkpoint()
        delayed.set_timeout(timeout_min, countdown)
        with submitit.core.utils.temporary_save_path(paths.submitted_pickle) as tmp:
            delayed.dump(tmp)
        atomic_write_json(marker, {"action": "requeue"})
        print(
            f"[l2w launch] requeueing job {job_id} at step {step} (requeue {done + 1} of at most {self.max_requeues})",
            flush=True,
        )
        try:
            # Slurm: scontrol requeue; local: exits with the code on which submitit restarts the job.
            submitit_internals.requeue(env, countdown)
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
        atomic_write_json(self.path, data)
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


def job_key(env: submitit.JobEnvironment) -> str:
    """The job's identity across requeues: Slurm's job id (kept by requeues), the local
    controller's pid; debug ids come from id() in the launcher, so they get its pid too."""
    if env.name() == "debug":
        return f"{env.job_id}-pid{os.getpid()}"
    return str(env.job_id)


def _wait_for_json(path: Path, timeout_s: float) -> dict | None:
    """The JSON file at ``path`` once it exists and parses (rank 0's decision); None after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists():
            try:
                return json.loads(path.read_text())
            except json.JSONDecodeError:
                pass
        time.sleep(0.2)
    return None


def path_safe(text: str) -> str:
    """``text`` usable as one file or folder name (runs of other characters become ``-``)."""
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "-", text).strip("-") or "x"
