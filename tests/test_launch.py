"""The launcher without Slurm: options, errors before submission, and preemption/requeue on the
local (processes) and debug (in-process) clusters, with a deterministic test double as trainer."""

from __future__ import annotations

import json
import os
import re
import signal
import time

import pytest
import submitit
import torch

from l2w_dist.launch import (
    IMAGENET,
    LaunchError,
    SlurmStopSignals,
    build_parser,
    expand_array,
    launch,
    make_executor,
    parse_time,
    submitit_internals,
)
from l2w_dist.launch.submitit_internals import SubmititInternalsError
from tests import launch_stand_in
from tests.launch_testutil import (
    REPO,
    STAND_IN,
    children,
    demo_overrides,
    launcher_env,
    prepared_demo_data,
    requeue_log,
    run_launcher,
    start_launcher,
    trace_steps,
    wait_until,
)


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text("train: {max_steps: 10}\n")
    return path


def _final_model(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ----------------------------------------------------------------------------- options


def test_parse_time_slurm_formats():
    assert parse_time("90") == 90
    assert parse_time("1:30") == 2  # minutes:seconds, rounded up
    assert parse_time("12:00:00") == 720
    assert parse_time("2-00:00:00") == 2880
    assert parse_time("1-2") == 26 * 60
    for bad in ("", "soon", "1:2:3:4", "0"):
        with pytest.raises(LaunchError):
            parse_time(bad)


def test_expand_array_sweeps_sets_and_grids():
    assert expand_array([]) == [[]]
    assert expand_array(["train.seed=0,1,2"]) == [["train.seed=0"], ["train.seed=1"], ["train.seed=2"]]
    assert expand_array(["optim.lr=0.4 meta.interval=10;optim.lr=0.8"]) == [
        ["optim.lr=0.4", "meta.interval=10"],
        ["optim.lr=0.8"],
    ]
    grid = expand_array(["train.seed=0,1", "meta.epsilon=0.3,0.8"])
    assert len(grid) == 4 and ["train.seed=1", "meta.epsilon=0.3"] in grid
    for bad in ("train.seed", "a=1 b=2", "x;y"):
        with pytest.raises(LaunchError, match="--array"):
            expand_array([bad])


def test_sbatch_script_has_the_resources_and_the_requeue_signal(tmp_path, monkeypatch):
    """The ImageNet recipe's launch: 4 nodes x 8 GPUs, one task per GPU, USR2 before the limit, requeueable."""
    # Only the sbatch text is built here, but submitit's Slurm executor refuses to exist
    # without an srun on PATH: give it one, so the test runs where Slurm is not installed.
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 1\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    args = build_parser(IMAGENET).parse_args(
        [
            "--cluster",
            "slurm",
            "--nodes",
            "4",
            "--gpus-per-node",
            "8",
            "--partition",
            "gpu",
            "--account",
            "acc",
            "--qos",
            "high",
            "--constraint",
            "a100",
            "--mem",
            "400G",
            "--time",
            "2-00:00:00",
            "--signal-delay",
            "300",
        ]
    )
    executor = make_executor(
        args, IMAGENET, "slurm", tmp_path, partition="gpu", tasks_per_node=8, timeout_min=parse_time(args.time)
    )
    script = executor._executor._make_submission_file_text("CMD", "uid")
    for line in (
        "--nodes=4",
        "--gpus-per-node=8",
        "--ntasks-per-node=8",
        "--cpus-per-task=8",
        "--partition=gpu",
        "--account=acc",
        "--qos=high",
        "--constraint=a100",
        "--mem=400G",
        "--time=2880",
        "--signal=USR2@300",
        "--requeue",
        "--job-name=l2w-imagenet",
    ):
        assert f"#SBATCH {line}\n" in script, line
    assert "srun --unbuffered" in script


def test_cluster_must_be_explicit(capsys):
    with pytest.raises(SystemExit):
        build_parser(IMAGENET).parse_args(["--config", "configs/demo.yaml"])
    assert "--cluster" in capsys.readouterr().err


@pytest.mark.parametrize(
    "cluster, argv, message",
    [
        ("local", ["--gpus-per-node", "2", "--tasks-per-node", "3"], "one task per GPU"),
        ("local", ["--nodes", "2", "--gpus-per-node", "0"], "runs on this machine only"),
        ("local", ["--time", "1", "--signal-delay", "120", "--gpus-per-node", "0"], "--signal-delay"),
        ("local", ["--gpus-per-node", "0", "not-an-override"], "overrides are KEY=VALUE"),
        ("debug", ["--tasks-per-node", "2"], "--cluster debug runs one task"),
    ],
)
def test_bad_options_fail_before_submission(tmp_path, tiny_config, cluster, argv, message):
    args = build_parser(IMAGENET).parse_args(
        ["--cluster", cluster, "--config", str(tiny_config), "--output", str(tmp_path / "run"), *argv]
    )
    with pytest.raises(LaunchError, match=message):
        launch(args, IMAGENET)
    assert not (tmp_path / "run").exists()


@pytest.mark.integration
def test_config_error_names_the_key_and_submits_nothing(tmp_path, tiny_config):
    out = tmp_path / "run"
    res = run_launcher(
        [
            "--cluster",
            "debug",
            "--gpus-per-node",
            "0",
            "--config",
            str(tiny_config),
            "--output",
            str(out),
            "optim.lr=-1",
            "--trainer",
            STAND_IN,
        ]
    )
    assert res.returncode == 2, res.stdout + res.stderr
    assert "optim.lr" in res.stderr and "nothing was submitted" in res.stderr
    res = run_launcher(
        [
            "--cluster",
            "local",
            "--gpus-per-node",
            "0",
            "--config",
            str(tiny_config),
            "--output",
            str(out),
            "--array",
            "train.sedd=0,1",
            "--trainer",
            STAND_IN,
        ]
    )
    assert res.returncode == 2 and "train.sedd" in res.stderr
    res = run_launcher(
        [
            "--cluster",
            "local",
            "--gpus-per-node",
            "0",
            "--config",
            str(tmp_path / "nope.yaml"),
            "--output",
            str(out),
            "--trainer",
            STAND_IN,
        ]
    )
    assert res.returncode == 2 and "nope.yaml" in res.stderr
    assert not out.exists()


def test_stop_signals_only_set_a_flag():
    stop = SlurmStopSignals()
    before = signal.getsignal(signal.SIGUSR2)
    stop.install()
    try:
        assert not stop()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop() and not stop.requeue_requested
        os.kill(os.getpid(), signal.SIGUSR2)
        assert stop.requeue_requested and stop.received == ["SIGTERM", "SIGUSR2"]
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGUSR2) == before


# ------------------------------------------------------------- submitit's private attributes


def test_installed_submitit_is_in_the_tested_range():
    """CI runs the version the shim was written for; the range's bounds are where they say."""
    assert submitit_internals.is_tested_version(), submitit.__version__
    assert submitit_internals.installed_version() == tuple(int(p) for p in submitit.__version__.split(".")[:3])
    assert submitit_internals.tested_range_text() == ">=1.5,<1.6"
    assert submitit_internals.is_tested_version((1, 5)) and submitit_internals.is_tested_version((1, 5, 9))
    assert not submitit_internals.is_tested_version((1, 4, 9)) and not submitit_internals.is_tested_version((1, 6, 0))


def test_each_private_accessor_works_on_the_installed_submitit(tmp_path, monkeypatch):
    assert submitit_internals.usr_signal() == signal.SIGUSR2  # submitit's default warning signal

    submission = submitit.helpers.DelayedSubmission(print)
    submission.set_timeout(90, 7)
    assert submitit_internals.submission_timeout(submission) == (90, 7)

    executor = submitit.AutoExecutor(folder=tmp_path, cluster="local")
    submitit_internals.set_local_signal_delay(executor, 45)
    assert executor._executor.parameters["signal_delay_s"] == 45

    monkeypatch.setenv("SUBMITIT_LOCAL_JOB_ID", "4242")
    with pytest.raises(SystemExit) as exited:  # the local controller restarts a job that exits so
        submitit_internals.requeue(submitit.local.local.LocalJobEnvironment(), 3)
    assert exited.value.code == submitit.local.local.LOCAL_REQUEUE_RETURN_CODE

    submitit_internals.check_job_internals()


def _assert_one_clear_line(attribute, accessor, *args):
    """``accessor(*args)`` fails with one line naming the installed version, ``attribute`` and the range."""
    with pytest.raises(SubmititInternalsError) as err:
        accessor(*args)
    message = str(err.value)
    assert "\n" not in message
    assert f"submitit {submitit.__version__} has no {attribute}," in message
    assert "submitit>=1.5,<1.6" in message


def test_a_missing_private_attribute_is_one_clear_line(tmp_path, monkeypatch):
    for attribute in ("_timeout_min", "_timeout_countdown"):
        submission = submitit.helpers.DelayedSubmission(print)
        delattr(submission, attribute)
        _assert_one_clear_line(f"DelayedSubmission.{attribute}", submitit_internals.submission_timeout, submission)

    executor = submitit.AutoExecutor(folder=tmp_path, cluster="local")
    del executor._executor
    _assert_one_clear_line("AutoExecutor._executor", submitit_internals.set_local_signal_delay, executor, 45)

    monkeypatch.delattr(submitit.local.local.LocalJobEnvironment, "_requeue")
    monkeypatch.delattr(submitit.JobEnvironment, "_requeue")
    local_env = submitit.local.local.LocalJobEnvironment()
    _assert_one_clear_line("LocalJobEnvironment._requeue", submitit_internals.requeue, local_env, 3)
    _assert_one_clear_line("JobEnvironment._requeue", submitit_internals.check_job_internals)

    monkeypatch.delattr(submitit.JobEnvironment, "_usr_sig")
    _assert_one_clear_line("JobEnvironment._usr_sig", submitit_internals.usr_signal)
    _assert_one_clear_line("JobEnvironment._usr_sig", submitit_internals.check_job_internals)


def test_an_untested_submitit_version_is_named_in_the_error_and_warned_about(monkeypatch, capsys):
    from l2w_dist.launch.preflight import check_submitit

    monkeypatch.setattr(submitit, "__version__", "1.7.0")
    assert submitit_internals.installed_version() == (1, 7, 0) and not submitit_internals.is_tested_version()
    check_submitit()  # every attribute is still there: a warning, not an error
    assert "warning: submitit 1.7.0 is outside the range" in capsys.readouterr().err
    monkeypatch.delattr(submitit.JobEnvironment, "_usr_sig")
    _assert_one_clear_line("JobEnvironment._usr_sig", submitit_internals.usr_signal)
    with pytest.raises(LaunchError, match=r"submitit 1\.7\.0 has no JobEnvironment\._usr_sig"):
        check_submitit()


def test_a_missing_private_attribute_stops_the_launch_before_submission(tmp_path, tiny_config, monkeypatch):
    monkeypatch.delattr(submitit.JobEnvironment, "_requeue")
    args = build_parser(IMAGENET).parse_args(
        ["--cluster", "local", "--gpus-per-node", "0", "--config", str(tiny_config), "--output", str(tmp_path / "run")]
    )
    with pytest.raises(LaunchError, match=r"JobEnvironment\._requeue"):
        launch(args, IMAGENET)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------- debug and local clusters


@pytest.mark.integration
def test_debug_cluster_preempted_run_requeues_in_process_and_matches(tmp_path, tiny_config):
    """USR2 mid-training: checkpoint at an iteration boundary, re-run, same final parameters."""
    out = tmp_path / "run"
    proc = start_launcher(
        [
            "--cluster",
            "debug",
            "--gpus-per-node",
            "0",
            "--config",
            str(tiny_config),
            "--output",
            str(out),
            "--trainer",
            STAND_IN,
            "train.max_steps=60",
        ],
        log=tmp_path / "launcher.log",
    )
    wait_until(lambda: trace_steps(out) >= 10, 60, "10 training steps", proc=proc, log=tmp_path / "launcher.log")
    os.kill(proc.pid, signal.SIGUSR2)
    assert proc.wait(timeout=60) == 0, (tmp_path / "launcher.log").read_text()
    log = requeue_log(out)
    assert log["requeues"] == 1
    assert [e["event"] for e in log["events"]] == ["start", "requeued", "start", "finished"]
    assert 10 <= log["events"][1]["step"] < 60
    _assert_same(_final_model(out), launch_stand_in.reference_model(60, world=1))
    assert (out / "eval.json").exists()
    assert "finished at step 60" in (tmp_path / "launcher.log").read_text()


@pytest.mark.integration
def test_max_requeues_stops_with_a_clear_error_and_keeps_the_checkpoint(tmp_path, tiny_config):
    out = tmp_path / "run"
    proc = start_launcher(
        [
            "--cluster",
            "debug",
            "--gpus-per-node",
            "0",
            "--config",
            str(tiny_config),
            "--output",
            str(out),
            "--trainer",
            STAND_IN,
            "--max-requeues",
            "0",
            "train.max_steps=400",
        ],
        log=tmp_path / "launcher.log",
    )
    wait_until(lambda: trace_steps(out) >= 5, 60, "5 training steps", proc=proc, log=tmp_path / "launcher.log")
    os.kill(proc.pid, signal.SIGUSR2)
    proc.wait(timeout=60)
    text = (tmp_path / "launcher.log").read_text()
    assert proc.returncode != 0
    assert "--max-requeues 0" in text
    log = requeue_log(out)
    assert log["events"][-1]["event"] == "gave-up"
    step = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["step"]
    assert step == log["events"][-1]["step"] >= 5
    # Launching again continues the run, with a fresh requeue budget.
    res = run_launcher(
        [
            "--cluster",
            "debug",
            "--config",
            str(tiny_config),
            "--output",
            str(out),
            "--trainer",
            STAND_IN,
            "--max-requeues",
            "0",
            "train.max_steps=60",
        ],
        env=launcher_env(step_s=0.0),
    )
    assert res.returncode == 0 and "finished at step 60" in res.stdout, res.stdout + res.stderr
    assert trace_steps(out) == 60


@pytest.mark.integration
def test_local_cluster_two_ranks_requeue_resumes_exactly(tmp_path, tiny_config):
    """2 gloo ranks as local processes; USR2 to every rank (as Slurm sends it); the job
    requeues itself (submitit's local controller restarts it) and resumes from the checkpoint."""
    out = tmp_path / "run"
    proc = start_launcher(
        [
            "--cluster",
            "local",
            "--gpus-per-node",
            "0",
            "--tasks-per-node",
            "2",
            "--config",
            str(tiny_config),
            "--output",
            str(out),
            "--trainer",
            STAND_IN,
            "train.max_steps=40",
        ],
        env=launcher_env(step_s=0.02),
        log=tmp_path / "launcher.log",
    )
    wait_until(
        lambda: trace_steps(out, 0) >= 10 and trace_steps(out, 1) >= 10,
        90,
        "10 steps on both ranks",
        proc=proc,
        log=tmp_path / "launcher.log",
    )
    controllers = children(proc.pid)
    tasks = [pid for c in controllers for pid in children(c)]
    assert len(tasks) == 2, (controllers, tasks)
    for pid in tasks:
        os.kill(pid, signal.SIGUSR2)
    assert proc.wait(timeout=120) == 0, (tmp_path / "launcher.log").read_text()
    log = requeue_log(out)
    assert log["requeues"] == 1, log
    assert [e["event"] for e in log["events"]] == ["start", "requeued", "start", "finished"]
    _assert_same(_final_model(out), launch_stand_in.reference_model(40, world=2))
    envs = [json.loads((out / f"env_rank{r}.json").read_text()) for r in (0, 1)]
    assert [(e["RANK"], e["LOCAL_RANK"], e["WORLD_SIZE"]) for e in envs] == [("0", "0", "2"), ("1", "1", "2")]
    assert envs[0]["MASTER_PORT"] == envs[1]["MASTER_PORT"] and envs[0]["MASTER_ADDR"] == envs[1]["MASTER_ADDR"]


@pytest.mark.integration
def test_array_gives_each_task_its_run_folder(tmp_path, tiny_config):
    out = tmp_path / "sweep"
    start = time.monotonic()
    res = run_launcher(
        [
            "--cluster",
            "debug",
            "--gpus-per-node",
            "0",
            "--config",
            str(tiny_config),
            "--output",
            str(out),
            "--trainer",
            STAND_IN,
            "--seeds",
            "0,1",
            "train.max_steps=3",
        ],
        env=launcher_env(step_s=0.0),
    )
    assert res.returncode == 0, res.stdout + res.stderr
    dirs = sorted(p.name for p in out.iterdir() if p.name[0].isdigit())
    assert dirs == ["0_train.seed=0", "1_train.seed=1"]
    assert all((out / d / "eval.json").exists() for d in dirs)
    assert res.stdout.count("finished at step 3") == 2
    assert time.monotonic() - start < 60


# ------------------------------------------------ the real trainer, configs/demo.yaml, no Slurm


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    return prepared_demo_data(tmp_path_factory)


@pytest.mark.integration
@pytest.mark.parametrize("cluster, tasks", [("debug", 1), ("local", 2)])
def test_demo_runs_without_slurm(tmp_path, demo_data, cluster, tasks):
    """The same job as on Slurm: --cluster debug (one rank, in process), --cluster local (2 gloo ranks)."""
    out = tmp_path / "run"
    wandb = ["wandb.mode=offline", "wandb.project=l2wtest"] if cluster == "debug" else []
    res = run_launcher(
        [
            "--cluster",
            cluster,
            "--gpus-per-node",
            "0",
            "--tasks-per-node",
            str(tasks),
            "--config",
            str(REPO / "configs" / "demo.yaml"),
            "--output",
            str(out),
            *demo_overrides(demo_data, 4),
            *wandb,
        ],
        timeout=300,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "finished at step 4; top-1 per exit:" in res.stdout
    if wandb:  # the link printed at submission names the run the trainer logs to
        run_id = re.search(r"W&B:\s+https://wandb.ai/<your-entity>/l2wtest/runs/(\w+)", res.stdout).group(1)
        assert list((out / "wandb").glob(f"offline-run-*-{run_id}")), sorted((out / "wandb").iterdir())
    result = json.loads((out / "eval.json").read_text())
    assert len(result["anytime"]) == 3 and len(result["budgeted"]) == 39
    log = requeue_log(out)
    assert [e["event"] for e in log["events"]] == ["start", "finished"]
    assert log["events"][0]["world_size"] == tasks


@pytest.mark.integration
def test_relaunch_into_the_same_folder_resumes(tmp_path, tiny_config):
    """A second launch with the same --output continues the run (it is not a requeue)."""
    out = tmp_path / "run"
    common = [
        "--cluster",
        "debug",
        "--gpus-per-node",
        "0",
        "--config",
        str(tiny_config),
        "--output",
        str(out),
        "--trainer",
        STAND_IN,
    ]
    env = launcher_env(step_s=0.0)
    assert run_launcher([*common, "train.max_steps=10"], env=env).returncode == 0
    res = run_launcher([*common, "train.max_steps=20"], env=env)
    assert res.returncode == 0 and "finished at step 20" in res.stdout
    assert trace_steps(out) == 20  # steps 1-10 were not redone
    _assert_same(_final_model(out), launch_stand_in.reference_model(20, world=1))
    log = requeue_log(out)
    assert log["requeues"] == 0 and [e["event"] for e in log["events"]] == ["start", "finished"] * 2
    assert len(json.loads((out / "launch.json").read_text())["launches"]) == 2


def test_overrides_may_be_mixed_with_options(tmp_path, tiny_config, capsys):
    from l2w_dist.launch import main

    code = main(
        [
            "--cluster",
            "debug",
            "optim.lr=abc",
            "--gpus-per-node",
            "0",
            "--config",
            str(tiny_config),
            "meta.interval=3",
            "--output",
            str(tmp_path / "run"),
        ],
        preset=IMAGENET,
    )
    err = capsys.readouterr().err
    assert code == 2 and "optim.lr=abc meta.interval=3" in err and "must be a number" in err


@pytest.mark.integration
def test_wandb_link_is_printed_and_its_run_id_reaches_the_job(tmp_path, tiny_config):
    out = tmp_path / "run"
    res = run_launcher(
        [
            "--cluster",
            "debug",
            "--config",
            str(tiny_config),
            "--output",
            str(out),
            "--trainer",
            STAND_IN,
            "train.max_steps=2",
            "wandb.mode=offline",
            "wandb.project=proj",
            "wandb.entity=team",
        ],
        env=launcher_env(step_s=0.0),
    )
    assert res.returncode == 0, res.stdout + res.stderr
    link = re.search(r"W&B:\s+https://wandb.ai/team/proj/runs/(\w+) \(offline", res.stdout)
    assert link, res.stdout
    assert json.loads((out / "env_rank0.json").read_text())["WANDB_RUN_ID"] == link.group(1)
    res = run_launcher(
        [
            "--cluster",
            "debug",
            "--config",
            str(tiny_config),
            "--output",
            str(tmp_path / "off"),
            "--trainer",
            STAND_IN,
            "train.max_steps=2",
        ],
        env=launcher_env(step_s=0.0),
    )
    assert "W&B" not in res.stdout


@pytest.mark.integration
def test_a_failing_job_is_reported_with_its_error(tmp_path, tiny_config):
    out = tmp_path / "run"
    res = run_launcher(
        [
            "--cluster",
            "local",
            "--gpus-per-node",
            "0",
            "--config",
            str(tiny_config),
            "--output",
            str(out),
            "--trainer",
            "launch_stand_in:failing_training",
        ]
    )
    assert res.returncode == 1
    assert "failed on purpose" in res.stderr and "failed; logs in" in res.stderr
    assert requeue_log(out)["events"][-1]["event"] == "failed"
