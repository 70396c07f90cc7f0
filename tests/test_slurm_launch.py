"""The launcher on a real single-node Slurm (tests/slurm_harness.sh starts it from Debian's packages).

Skipped only where Slurm is not installed and this is not CI; in CI (CI=true) a missing
sbatch is a failure. The controller is started for this module if none answers, and
stopped afterwards if this module started it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

from l2w_dist.distributed.testing import free_port
from tests import launch_stand_in
from tests.launch_testutil import (
    REPO,
    STAND_IN,
    demo_overrides,
    launcher_env,
    metric_steps,
    prepared_demo_data,
    requeue_log,
    run_launcher,
    trace_steps,
    wait_until,
)

pytestmark = [pytest.mark.slurm, pytest.mark.integration]

HARNESS = REPO / "tests" / "slurm_harness.sh"


def _controller_up() -> bool:
    try:
        res = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return res.returncode == 0 and "is UP" in res.stdout


@pytest.fixture(scope="module")
def slurm():
    if shutil.which("sbatch") is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(
                "CI=true but sbatch is not installed: .ci/run must install slurmctld slurmd slurm-client "
                "(apt-get install -y --no-install-recommends slurmctld slurmd slurm-client)"
            )
        pytest.skip(
            "Slurm is not installed here (apt-get install -y --no-install-recommends "
            "slurmctld slurmd slurm-client); CI runs these tests"
        )
    started = False
    if not _controller_up():
        res = subprocess.run([str(HARNESS), "start"], capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            pytest.fail(f"could not start the local Slurm with {HARNESS}:\n{res.stdout}{res.stderr}")
        started = True
    yield
    if started:
        subprocess.run([str(HARNESS), "stop"], capture_output=True, text=True, timeout=60)


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text("train: {max_steps: 10}\n")
    return path


def _submit(args, env=None) -> tuple[str, subprocess.CompletedProcess]:
    """Run the launcher (it returns once the job is submitted) and return the job id."""
    res = run_launcher(["--cluster", "slurm", *args], env=env, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    match = re.search(r"submitted slurm job (\S+)", res.stdout)
    assert match, res.stdout
    return match.group(1), res


def _job_state(job_id: str) -> str:
    res = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=10)
    match = re.search(r"JobState=(\S+)", res.stdout)
    return match.group(1) if match else "UNKNOWN"


def _wait_job(job_id: str, timeout: float) -> str:
    final = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED")
    wait_until(lambda: _job_state(job_id) in final, timeout, f"Slurm job {job_id} to end", interval=0.5)
    return _job_state(job_id)


def _final_model(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


def _logs(run_dir: Path) -> str:
    return "\n".join(f"== {p.name}\n{p.read_text()[-3000:]}" for p in sorted((run_dir / "submitit").glob("*_log.*")))


def _queued(name: str) -> str:
    return subprocess.run(["squeue", "-h", "-n", name], capture_output=True, text=True, timeout=10).stdout.strip()


# ------------------------------------------------------------------ errors before submission


def test_missing_partition_fails_before_submission(slurm, tmp_path, tiny_config):
    out = tmp_path / "run"
    res = run_launcher(
        [
            "--cluster",
            "slurm",
            "--partition",
            "nosuch",
            "--gpus-per-node",
            "0",
            "--cpus-per-task",
            "1",
            "--config",
            str(tiny_config),
            "--output",
            str(out),
            "--name",
            "l2w-test-nopart",
            "--trainer",
            STAND_IN,
        ]
    )
    assert res.returncode == 2, res.stdout + res.stderr
    assert "'nosuch' does not exist" in res.stderr and "debug" in res.stderr
    assert "nothing was submitted" in res.stderr
    assert not out.exists() and _queued("l2w-test-nopart") == ""


def test_config_error_fails_before_submission(slurm, tmp_path, tiny_config):
    out = tmp_path / "run"
    res = run_launcher(
        [
            "--cluster",
            "slurm",
            "--gpus-per-node",
            "0",
            "--cpus-per-task",
            "1",
            "--config",
            str(tiny_config),
            "--output",
            str(out),
            "--name",
            "l2w-test-badcfg",
            "--trainer",
            STAND_IN,
            "meta.constraint=diagonal",
        ]
    )
    assert res.returncode == 2
    assert "meta.constraint" in res.stderr and "'mat'" in res.stderr
    assert not out.exists() and _queued("l2w-test-badcfg") == ""


def _conf_with_port(tmp_path: Path, port: int) -> Path:
    conf = Path("/etc/slurm/slurm.conf").read_text()
    conf = re.sub(r"^SlurmctldPort=\d+", f"SlurmctldPort={port}", conf, flags=re.M)
    path = tmp_path / "slurm.conf"
    path.write_text(conf)
    return path


def test_unreachable_controller_fails_fast(slurm, tmp_path, tiny_config):
    """Nothing listens on the controller's port: `scontrol ping` says DOWN at once."""
    env = launcher_env()
    env["SLURM_CONF"] = str(_conf_with_port(tmp_path, free_port()))
    start = time.monotonic()
    res = run_launcher(
        [
            "--cluster",
            "slurm",
            "--gpus-per-node",
            "0",
            "--config",
            str(tiny_config),
            "--output",
            str(tmp_path / "run"),
            "--trainer",
            STAND_IN,
        ],
        env=env,
    )
    assert res.returncode == 2
    assert "Slurm controller unreachable" in res.stderr and "DOWN" in res.stderr
    assert time.monotonic() - start < 15
    assert not (tmp_path / "run").exists()


def test_silent_controller_times_out(slurm, tmp_path, tiny_config):
    """A controller that accepts connections but never answers: the check gives up after --check-timeout."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted = []

    def accept_forever():
        while True:
            try:
                accepted.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept_forever, daemon=True).start()
    env = launcher_env()
    env["SLURM_CONF"] = str(_conf_with_port(tmp_path, server.getsockname()[1]))
    try:
        start = time.monotonic()
        res = run_launcher(
            [
                "--cluster",
                "slurm",
                "--gpus-per-node",
                "0",
                "--config",
                str(tiny_config),
                "--output",
                str(tmp_path / "run"),
                "--check-timeout",
                "2",
                "--trainer",
                STAND_IN,
            ],
            env=env,
        )
        elapsed = time.monotonic() - start
    finally:
        server.close()
        for conn in accepted:
            conn.close()
    assert res.returncode == 2
    assert "did not answer within 2 s" in res.stderr
    assert elapsed < 12
    assert not (tmp_path / "run").exists()


# --------------------------------------------------- preemption and requeue (test double)


@pytest.mark.parametrize("interrupt", ["usr2", pytest.param("scontrol-requeue", marks=pytest.mark.slow)])
def test_interrupted_job_requeues_and_resumes_exactly(slurm, tmp_path, tiny_config, interrupt):
    """1 node x 2 gloo tasks. usr2: the time-limit/preemption warning — all ranks stop at the
    same iteration, rank 0 checkpoints, the job requeues itself. scontrol-requeue: Slurm
    requeues it from outside (SIGTERM, then SIGKILL after KillWait; the real trainer's test
    below does this too, hence slow here). Either way the job starts again, resumes from the
    checkpoint and ends with the uninterrupted run's parameters."""
    out = tmp_path / "run"
    steps = 60
    job_id, _ = _submit(
        [
            "--gpus-per-node",
            "0",
            "--tasks-per-node",
            "2",
            "--cpus-per-task",
            "1",
            "--config",
            str(tiny_config),
            "--output",
            str(out),
            "--time",
            "10",
            "--signal-delay",
            "60",
            "--trainer",
            STAND_IN,
            f"train.max_steps={steps}",
        ],
        env=launcher_env(step_s=0.05),
    )
    wait_until(lambda: trace_steps(out, 0) >= 10, 90, "10 steps on rank 0")
    if interrupt == "usr2":
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=10)
    else:
        subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=10)
    assert _wait_job(job_id, 120) == "COMPLETED", _logs(out)
    log = requeue_log(out)
    events = [e["event"] for e in log["events"]]
    assert log["requeues"] == 1, log
    expected_stop = "requeued" if interrupt == "usr2" else "stopped"
    assert events == ["start", expected_stop, "start", "finished"], log
    stopped_at = log["events"][1]["step"]
    assert 10 <= stopped_at < steps
    assert log["events"][2]["slurm_restart_count"] == 1
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["step"] == steps
    reference = launch_stand_in.reference_model(steps, world=2)
    final = _final_model(out)
    assert all(torch.equal(final[k], reference[k]) for k in reference)
    # Every step ran exactly once before the stop and once after it: nothing was redone or lost.
    assert trace_steps(out, 0) == steps and trace_steps(out, 1) == steps
    # The rank environment came from Slurm through submitit's JobEnvironment.
    envs = [json.loads((out / f"env_rank{r}.json").read_text()) for r in (0, 1)]
    assert [(e["RANK"], e["LOCAL_RANK"], e["WORLD_SIZE"]) for e in envs] == [("0", "0", "2"), ("1", "1", "2")]
    assert envs[0]["MASTER_ADDR"] == socket.gethostname() == envs[1]["MASTER_ADDR"]


def test_a_finished_run_is_not_killed_by_a_late_warning(slurm, tmp_path, tiny_config):
    """USR2 (the time-limit warning) keeps arriving while the finished job writes its result
    and exits: the job must still end COMPLETED, with its result, and not be requeued."""
    out = tmp_path / "run"
    job_id, _ = _submit(
        [
            "--gpus-per-node",
            "0",
            "--tasks-per-node",
            "2",
            "--cpus-per-task",
            "1",
            "--config",
            str(tiny_config),
            "--output",
            str(out),
            "--trainer",
            STAND_IN,
            "train.max_steps=5",
        ],
        env=launcher_env(step_s=0.0),
    )
    wait_until(lambda: (out / "done_rank0").exists() and (out / "done_rank1").exists(), 90, "the run to finish")
    deadline = time.monotonic() + 60
    while _job_state(job_id) in ("RUNNING", "COMPLETING") and time.monotonic() < deadline:
        subprocess.run(["scancel", "--signal=USR2", job_id], capture_output=True, timeout=10)
        time.sleep(0.02)
    assert _wait_job(job_id, 60) == "COMPLETED", _logs(out)
    assert [e["event"] for e in requeue_log(out)["events"]] == ["start", "finished"]
    assert len(list((out / "submitit").glob(f"{job_id}_*_result.pkl"))) == 2


@pytest.mark.slow
def test_time_limit_warning_requeues_until_done(slurm, tmp_path, tiny_config):
    """A real time limit: --time 1 --signal-delay 45, so Slurm sends USR2 ~15-45 s into every
    attempt (slurmctld checks limits periodically); the job requeues itself each time and the
    run completes with every step done exactly once and the uninterrupted parameters."""
    out = tmp_path / "run"
    steps = 300
    job_id, _ = _submit(
        [
            "--gpus-per-node",
            "0",
            "--tasks-per-node",
            "2",
            "--cpus-per-task",
            "1",
            "--config",
            str(tiny_config),
            "--output",
            str(out),
            "--time",
            "1",
            "--signal-delay",
            "45",
            "--trainer",
            STAND_IN,
            f"train.max_steps={steps}",
        ],
        env=launcher_env(step_s=0.1),
    )
    assert _wait_job(job_id, 400) == "COMPLETED", _logs(out)
    log = requeue_log(out)
    assert log["requeues"] >= 1, log
    assert all(e["signals"] == ["SIGUSR2"] for e in log["events"] if e["event"] == "requeued")
    assert log["events"][-1]["event"] == "finished"
    assert trace_steps(out, 0) == steps and trace_steps(out, 1) == steps
    reference = launch_stand_in.reference_model(steps, world=2)
    final = _final_model(out)
    assert all(torch.equal(final[k], reference[k]) for k in reference)


# ------------------------------------------------------ the real trainer on configs/demo.yaml

DEMO = str(REPO / "configs" / "demo.yaml")
DEMO_STEPS = 16
TWO_GLOO_RANKS = ["--gpus-per-node", "0", "--tasks-per-node", "2", "--cpus-per-task", "1"]


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    return prepared_demo_data(tmp_path_factory)


@pytest.fixture(scope="module")
def uninterrupted_demo(slurm, demo_data, tmp_path_factory) -> Path:
    """launch/imagenet.py --cluster slurm --config configs/demo.yaml, 1 node x 2 gloo tasks."""
    out = tmp_path_factory.mktemp("demo") / "run"
    job_id, res = _submit(
        [*TWO_GLOO_RANKS, "--config", DEMO, "--output", str(out), *demo_overrides(demo_data, DEMO_STEPS)]
    )
    assert f"{out}/submitit/{job_id}_0_log.out" in res.stdout  # the log paths are printed
    assert _wait_job(job_id, 240) == "COMPLETED", _logs(out)
    return out


def test_demo_trains_and_evaluates_on_two_gloo_ranks(uninterrupted_demo):
    out = uninterrupted_demo
    result = json.loads((out / "eval.json").read_text())
    assert [row["exit"] for row in result["anytime"]] == [1, 2, 3]
    flops = [row["flops"] for row in result["anytime"]]
    assert flops == sorted(flops) and flops[0] > 0
    assert len(result["budgeted"]) == 39
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["step"] == DEMO_STEPS
    log = requeue_log(out)
    assert log["requeues"] == 0 and [e["event"] for e in log["events"]] == ["start", "finished"]
    assert log["events"][0]["world_size"] == 2
    rank1 = next((out / "submitit").glob("*_1_log.out")).read_text()
    assert "rank 1/2" in rank1


def test_demo_requeued_mid_training_resumes_to_the_same_parameters(slurm, demo_data, uninterrupted_demo, tmp_path):
    out = tmp_path / "run"
    job_id, _ = _submit(
        [*TWO_GLOO_RANKS, "--config", DEMO, "--output", str(out), *demo_overrides(demo_data, DEMO_STEPS)]
    )
    wait_until(lambda: metric_steps(out) >= 4, 120, "4 logged training steps")
    subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=10)
    assert _wait_job(job_id, 240) == "COMPLETED", _logs(out)
    log = requeue_log(out)
    assert log["requeues"] == 1, log
    assert [e["event"] for e in log["events"]] == ["start", "stopped", "start", "finished"], log
    assert 4 <= log["events"][1]["step"] < DEMO_STEPS
    assert (out / "eval.json").exists()
    final = _final_model(out)
    reference = _final_model(uninterrupted_demo)
    assert final.keys() == reference.keys()
    different = [k for k in reference if not torch.equal(final[k], reference[k])]
    assert not different, different[:5]
