"""Helpers shared by the launcher tests: run launch/*.py as a user would, find processes, poll."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
STAND_IN = "launch_stand_in:run_training"


def launcher_env(step_s: float = 0.05) -> dict[str, str]:
    """The launcher's environment: the test double importable in jobs, one thread per rank."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(OMP_NUM_THREADS="1", L2W_STAND_IN_STEP_S=str(step_s), PYTHONUNBUFFERED="1")
    return env


def launch_cmd(*args: str, script: str = "imagenet") -> list[str]:
    return [sys.executable, str(REPO / "launch" / f"{script}.py"), *args]


def run_launcher(
    args: Sequence[str], env: dict[str, str] | None = None, timeout: float = 120, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        launch_cmd(*args),
        env=env or launcher_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
    )


def start_launcher(
    args: Sequence[str], env: dict[str, str] | None = None, cwd: Path | None = None, log: Path | None = None
) -> subprocess.Popen:
    out = open(log, "w") if log else subprocess.PIPE  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(
        launch_cmd(*args),
        env=env or launcher_env(),
        stdout=out,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
    )


def wait_until(
    predicate: Callable[[], bool],
    timeout: float,
    what: str,
    interval: float = 0.2,
    proc: subprocess.Popen | None = None,
    log: Path | None = None,
) -> None:
    """Poll ``predicate``; fail early (with the launcher's log) if ``proc`` ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            text = log.read_text() if log and log.exists() else ""
            raise AssertionError(f"the launcher exited ({proc.returncode}) before {what}:\n{text}")
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def trace_steps(run_dir: Path, rank: int = 0) -> int:
    """Steps the test double has run on ``rank`` (all attempts together)."""
    path = run_dir / f"trace_rank{rank}.txt"
    return len(path.read_text().split()) if path.exists() else 0


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc; no psutil needed)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            found.append(int(entry.name))
    return found


def signal_all(pids: Sequence[int], sig: signal.Signals = signal.SIGUSR2) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def requeue_log(run_dir: Path) -> dict:
    return json.loads((run_dir / "requeues.json").read_text())


def demo_overrides(data_root: Path, steps: int) -> list[str]:
    """configs/demo.yaml made tiny: a small MSDNet, few steps, one thread, a 500-image holdout."""
    return [
        f"train.max_steps={steps}",
        f"data.root={data_root}",
        "data.holdout=500",
        "data.num_workers=0",
        "train.threads=1",
        "train.batch_size=32",
        "train.log_every=1",
        "meta.hidden=16",
        "model.options={num_classes: 10, num_blocks: 3, channels: 4, growth_rate: 2}",
    ]


def prepared_demo_data(tmp_path_factory) -> Path:
    """The embedded Fashion-MNIST as shards, once per test session (a no-op when already there)."""
    from l2w_dist.data.fashion_mnist import prepare_fashion_mnist

    root = tmp_path_factory.getbasetemp() / "fashion-mnist-holdout500"
    prepare_fashion_mnist(root, holdout=500, seed=0)
    return root


def metric_steps(run_dir: Path) -> int:
    """Iterations the real trainer has logged (train.log_every=1: one line per step)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    return sum('"loss"' in line for line in path.read_text().splitlines())
