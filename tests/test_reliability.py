"""The run survives its user and its machine: stop signals on the real trainer, kill -9,
failed checkpoint writes, corrupt checkpoints, resuming with a changed config
(docs/reliability.md has one row per fault and names the test here that shows it).

Every run is the tiny one (tests/helpers/tiny_run.py: 16 iterations per epoch) with an EMA and
a held-out evaluation at each epoch end (best-k), compared with one uninterrupted run to
step 20, which crosses the epoch boundary.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from l2w_dist.engine.checkpoint import CheckpointWriteError, load_checkpoint
from l2w_dist.engine.trainer import TrainingJob
from l2w_dist.train import main as l2w_train
from l2w_dist.train import run_training
from l2w_dist.validate import main as l2w_eval
from tests.helpers.tiny_run import make_tiny_spec, overrides

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.yaml")
END = 20  # the compared runs' last step: 16 iterations per epoch, so one epoch end on the way


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> str:
    return make_tiny_spec(tmp_path_factory.mktemp("tiny_data"))


def common(spec: str, **extra) -> list[str]:
    # eval.enabled with every_epochs=1: held-out evaluation + best-k at each epoch end
    return overrides(spec, **{"train.ema_decay": 0.5, "eval.every_epochs": 1, "train.ckpt_minutes": 0, **extra})


@pytest.fixture(scope="module")
def straight(spec, tmp_path_factory) -> Path:
    """The uninterrupted run to step END."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    assert run_training(DEMO, run_dir, [*common(spec), f"train.max_steps={END}"])["status"] == "finished"
    return run_dir


def ckpt(run_dir: Path, name: str = "last.pt") -> dict:
    return load_checkpoint(run_dir / "checkpoints" / name)


def assert_same_run(a_dir: Path, b_dir: Path) -> None:
    """The two runs' final states are bitwise equal: weights, EMA, optimizers, schedules, best-k."""
    a, b = ckpt(a_dir), ckpt(b_dir)
    assert a["step"] == b["step"] == END
    for part in ("model", "ema", "weight_net"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs"
    for part in ("optimizer", "meta_optimizer"):
        for pid, state in a[part]["state"].items():
            for key, value in state.items():
                assert torch.equal(value, b[part]["state"][pid][key]), f"{part} state {pid}.{key} differs"
    assert a["scheduler"] == b["scheduler"] and a["best"] == b["best"] and len(a["best"]) == 1
    name = a["best"][0][1]  # the epoch end's best-k checkpoint: the same weights
    best_a, best_b = ckpt(a_dir, name), ckpt(b_dir, name)
    assert all(torch.equal(best_a["ema"][k], best_b["ema"][k]) for k in best_a["ema"])
    assert json.loads((a_dir / "eval.json").read_text()) == json.loads((b_dir / "eval.json").read_text())


def logged_step(run_dir: Path) -> int:
    """The last step metrics.jsonl has a line for (train.log_every=1)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = []
    for line in path.read_text().splitlines():
        try:  # the trainer may be writing the last line right now
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in record:
            steps.append(record["step"])
    return max(steps, default=0)


def start_cli(run_dir: Path, args: list[str]) -> subprocess.Popen:
    """``python -m l2w_dist.train`` (what ``l2w-train`` runs) in a child process."""
    return subprocess.Popen(
        [sys.executable, "-m", "l2w_dist.train", "--config", DEMO, "--output", str(run_dir), *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen | None = None, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while logged_step(run_dir) < step:
        assert proc is None or proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"no step {step} after {timeout} s"
        time.sleep(0.02)


# ----------------------------------------------------------------------------- stop signals


def test_sigterm_stops_the_cli_within_one_iteration_and_resumes_bitwise(spec, straight, tmp_path):
    """The real ``l2w-train`` under SIGTERM: exit 143 with a one-line message naming the step and
    the resume command; last.pt is at the iteration the signal interrupted (or the one after
    a line was logged); resumed, the run equals the uninterrupted one bit for bit."""
    run_dir = tmp_path / "run"
    args = [*common(spec), "train.max_steps=32"]  # 2 epochs: it is signalled long before the end
    proc = start_cli(run_dir, args)
    wait_for_step(run_dir, 3, proc)
    before = logged_step(run_dir)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    after = logged_step(run_dir)
    _, stderr = proc.communicate(timeout=120)
    exit_s = time.monotonic() - sent
    assert proc.returncode == 143, stderr
    state = ckpt(run_dir)
    # the iteration in progress when the signal came (a step's line is logged before its poll)
    assert before <= state["step"] <= after + 1, (before, after, state["step"])
    last_line = stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"l2w-train: stopped by SIGTERM after step {state['step']} of 32 (epoch ")
    assert f"checkpoint written: {run_dir / 'checkpoints' / 'last.pt'}. To resume: l2w-train --config" in last_line
    assert not (run_dir / "eval.json").exists()
    print(f"SIGTERM -> exit in {exit_s:.2f} s (stopped at step {state['step']})")

    assert run_training(DEMO, run_dir, [*common(spec), f"train.max_steps={END}"])["status"] == "finished"
    assert_same_run(straight, run_dir)


def test_sigint_in_process_stops_cleanly_then_resumes_bitwise(spec, straight, tmp_path):
    """Ctrl-C (a real SIGINT to this process, from a thread once step 3 is logged) in
    ``l2w-train``'s main: exit 130, last.pt at the boundary, and the resumed run is the
    uninterrupted one."""
    run_dir = tmp_path / "run"

    def interrupt() -> None:
        wait_for_step(run_dir, 3)
        os.kill(os.getpid(), signal.SIGINT)

    thread = threading.Thread(target=interrupt, daemon=True)
    thread.start()
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as exited:
        l2w_train(["--config", DEMO, "--output", str(run_dir), *common(spec), "train.max_steps=32"])
    thread.join()
    assert exited.value.code == 130
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored
    assert 3 <= ckpt(run_dir)["step"] < 16
    assert run_training(DEMO, run_dir, [*common(spec), f"train.max_steps={END}"])["status"] == "finished"
    assert_same_run(straight, run_dir)


def test_stop_at_an_epoch_end_comes_before_its_evaluation(spec, straight, tmp_path, monkeypatch):
    """A stop requested in the epoch's last iteration lands before the held-out evaluation and
    its best-k checkpoint (a preemption's grace is not spent evaluating); the resumed run does
    that epoch-end work first and ends equal to the uninterrupted run, EMA and best-k included."""
    run_dir = tmp_path / "run"
    original, evaluations, done = TrainingJob.train_step, [], []

    def counting(self, x, y):
        done.append(self.step + 1)
        return original(self, x, y)

    monkeypatch.setattr(TrainingJob, "train_step", counting)
    monkeypatch.setattr(
        TrainingJob, "epoch_eval", lambda self, f=TrainingJob.epoch_eval: evaluations.append(1) or f(self)
    )

    def stop() -> bool:  # polled by the real trainer: True once the epoch's last (16th) iteration ran
        return bool(done) and done[-1] >= 16

    result = run_training(DEMO, run_dir, [*common(spec), f"train.max_steps={END}"], stop_requested=stop)
    assert result["status"] == "preempted" and result["step"] == 16
    state = ckpt(run_dir)
    assert state["step"] == 16 and state["epoch_end_pending"] and state["best"] == []
    assert evaluations == [] and not list((run_dir / "checkpoints").glob("best_step_*.pt"))
    assert run_training(DEMO, run_dir, [*common(spec), f"train.max_steps={END}"])["status"] == "finished"
    assert evaluations == [1]
    assert_same_run(straight, run_dir)


def test_second_ctrl_c_aborts_at_once_keeping_the_previous_checkpoint(spec, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    args = ["--config", DEMO, "--output", str(run_dir), *common(spec, **{"eval.enabled": False})]
    l2w_train([*args, "train.max_steps=2"])
    original = TrainingJob.train_step

    def pressed_twice(self, x, y):
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # first: stop at the boundary ...
            os.kill(os.getpid(), signal.SIGINT)  # ... second: abort now, mid-iteration
        return original(self, x, y)

    monkeypatch.setattr(TrainingJob, "train_step", pressed_twice)
    with pytest.raises(SystemExit) as exited:
        l2w_train([*args, "train.max_steps=8"])
    assert exited.value.code == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "l2w-train: aborted by a second SIGINT; the newest checkpoint in" in err and "To resume:" in err
    assert ckpt(run_dir)["step"] == 2
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["last.pt"]


def test_l2w_eval_under_a_signal_exits_143_and_writes_no_eval_json(spec, straight, tmp_path, monkeypatch, capsys):
    import l2w_dist.evaluate.run as run_module

    original = run_module.evaluate_model

    def signalled(*args, **kwargs):  # SIGTERM arrives during the evaluation
        os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    monkeypatch.setattr(run_module, "evaluate_model", signalled)
    out = tmp_path / "eval"
    with pytest.raises(SystemExit) as exited:
        l2w_eval(["--checkpoint", str(straight / "checkpoints" / "last.pt"), "--output", str(out)])
    assert exited.value.code == 143
    assert not (out / "eval.json").exists()
    err = capsys.readouterr().err.replace("\r", "\n").strip()
    assert "Traceback" not in err
    err = err.splitlines()[-1].split("\x1b[A")[-1]  # after the evaluation's progress bar
    assert err == f"l2w-eval: stopped by SIGTERM before the evaluation finished; no new {out / 'eval.json'} was written"


# ------------------------------------------------------------------------ crashes (kill -9)


def test_kill_9_resumes_from_the_epoch_end_checkpoint(spec, straight, tmp_path):
    """SIGKILL after the first epoch end (train.ckpt_minutes=0): last.pt is the epoch end's, it
    loads, and resuming from it ends equal to the uninterrupted run."""
    run_dir = tmp_path / "run"
    proc = start_cli(run_dir, [*common(spec), "train.max_steps=32"])
    wait_for_step(run_dir, 18, proc)
    proc.kill()
    proc.wait()
    state = ckpt(run_dir)
    assert state["step"] == 16 and len(state["best"]) == 1  # the epoch end's
    stale = run_dir / "checkpoints" / ".last.pt.k9xyz.tmp"  # what a kill during a write leaves
    stale.write_bytes(b"partial")
    assert run_training(DEMO, run_dir, [*common(spec), f"train.max_steps={END}"])["status"] == "finished"
    assert not stale.exists()
    assert_same_run(straight, run_dir)


def test_a_stop_during_the_final_evaluation_abandons_only_the_evaluation(spec, straight, tmp_path, monkeypatch):
    """The final checkpoint is written before the final evaluation: a signal there abandons the
    evaluation at once; the resumed run trains no further and only evaluates."""
    import l2w_dist.evaluate.run as run_module
    from l2w_dist.utils import StopSignals

    run_dir = tmp_path / "run"
    original = run_module.evaluate_model

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    monkeypatch.setattr(run_module, "evaluate_model", signalled)
    with StopSignals() as stop:
        result = run_training(DEMO, run_dir, [*common(spec), f"train.max_steps={END}"], stop_requested=stop)
    assert result["status"] == "preempted" and result["step"] == END and stop.exit_code == 143
    assert not (run_dir / "eval.json").exists()
    monkeypatch.undo()
    assert run_training(DEMO, run_dir, [*common(spec), f"train.max_steps={END}"])["status"] == "finished"
    assert_same_run(straight, run_dir)


def test_ckpt_minutes_writes_last_pt_on_time(spec, tmp_path, monkeypatch):
    saved = []
    original = TrainingJob.save
    monkeypatch.setattr(
        TrainingJob, "save", lambda self, periodic=False: saved.append(self.step) or original(self, periodic)
    )
    extra = {"eval.enabled": False, "train.max_steps": 4, "train.ckpt_minutes": 1e-9}
    run_training(DEMO, tmp_path / "timed", common(spec, **extra))
    assert saved == [0, 1, 2, 3, 4, 4]  # due at every poll here (the first before any iteration), then the final save
    saved.clear()
    run_training(DEMO, tmp_path / "untimed", common(spec, **{**extra, "train.ckpt_minutes": 0}))
    assert saved == [4]


# ------------------------------------------------------------------------------- storage


def failing_writes(after_bytes: int):
    """``os.fdopen`` whose binary files raise ENOSPC once ``after_bytes`` were written (a disk
    filling up in the middle of a checkpoint)."""
    real = os.fdopen

    class Filling:
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, data):
            self.n += len(data)
            if self.n > after_bytes:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

    return lambda fd, mode="r", *a, **k: Filling(real(fd, mode, *a, **k)) if "b" in mode else real(fd, mode, *a, **k)


def test_full_disk_at_checkpoint_time_keeps_the_previous_checkpoint(spec, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    args = ["--config", DEMO, "--output", str(run_dir), *common(spec, **{"eval.enabled": False})]
    l2w_train([*args, "train.max_steps=2"])
    monkeypatch.setattr(os, "fdopen", failing_writes(4096))
    with pytest.raises(SystemExit) as exited:
        l2w_train([*args, "train.max_steps=4"])
    monkeypatch.undo()
    assert exited.value.code == 1
    last = run_dir / "checkpoints" / "last.pt"
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        err[-1]
        == f"l2w-train: cannot write checkpoint {last}: No space left on device (ENOSPC); the previous last.pt is intact"  # noqa: E501
    )
    assert ckpt(run_dir)["step"] == 2
    assert [p.name for p in last.parent.iterdir()] == ["last.pt"]  # no temporary file left


def test_failed_write_error_names_the_file_and_cause(tmp_path, monkeypatch):
    from l2w_dist.engine.checkpoint import save_atomic

    monkeypatch.setattr(os, "fdopen", failing_writes(0))
    with pytest.raises(
        CheckpointWriteError,
        match=r"cannot write checkpoint .*new\.pt: No space left on device \(ENOSPC\); no new\.pt was written",
    ):
        save_atomic({"w": torch.ones(3)}, tmp_path / "new.pt")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------- corrupt checkpoints


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_l2w_eval_refuses_a_truncated_or_foreign_checkpoint(straight, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes((straight / "checkpoints" / "last.pt").read_bytes())
    truncate(bad)
    with pytest.raises(SystemExit) as exited:
        l2w_eval(["--checkpoint", str(bad), "--output", str(tmp_path / "out")])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"l2w-eval: {bad} is not a readable checkpoint (") and "truncated or corrupt" in err
    assert "\n" not in err and not (tmp_path / "out").exists()

    torch.save({"weights": torch.ones(2)}, bad)
    with pytest.raises(SystemExit) as exited:
        l2w_eval(["--checkpoint", str(bad)])
    assert exited.value.code == 2
    assert (
        capsys.readouterr().err.strip()
        == f"l2w-eval: {bad} is not a checkpoint written by l2w-train (it has no config, model)"
    )


def test_corrupt_last_pt_falls_back_to_the_newest_good_periodic_one_or_refuses(spec, tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = common(spec, **{"eval.enabled": False, "train.ckpt_every": 2})
    run_training(DEMO, run_dir, [*args, "train.max_steps=5"])
    folder = run_dir / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["last.pt", "step_2.pt", "step_4.pt"]
    truncate(folder / "last.pt")
    truncate(folder / "step_4.pt")
    capsys.readouterr()
    assert run_training(DEMO, run_dir, [*args, "train.max_steps=6"])["status"] == "finished"
    out = capsys.readouterr().out
    assert f"{folder / 'last.pt'} is not a readable checkpoint" in out
    assert "resuming from the newest good periodic checkpoint step_2.pt instead" in out
    assert f"resumed from {folder / 'step_2.pt'} at step 2" in out
    assert ckpt(run_dir)["step"] == 6

    for name in ("last.pt", "step_2.pt", "step_4.pt", "step_6.pt"):
        truncate(folder / name)
    with pytest.raises(SystemExit) as exited:
        l2w_train(["--config", DEMO, "--output", str(run_dir), *args, "train.max_steps=8"])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"l2w-train: {folder / 'last.pt'} is not a readable checkpoint")
    assert err.endswith(
        "none of the 3 periodic checkpoints loads either: refusing to resume. "
        f"Restore a good last.pt, or move {folder} away to start over"
    )


# ---------------------------------------------------------------------------- resume config


def test_resume_refuses_a_config_that_changes_the_training(spec, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    args = ["--config", DEMO, "--output", str(run_dir), *common(spec, **{"eval.enabled": False})]
    l2w_train([*args, "train.max_steps=1"])
    built = []
    monkeypatch.setattr("l2w_dist.engine.trainer.create_model", lambda *a, **k: built.append(1))
    changed = ["train.batch_size=32", "model.options={num_classes: 4, num_blocks: 3, channels: 8, growth_rate: 2}"]
    with pytest.raises(SystemExit) as exited:
        l2w_train([*args, "train.max_steps=2", *changed])
    assert exited.value.code == 2 and built == []  # refused before the model is built
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (
        f"l2w-train: cannot resume {run_dir / 'checkpoints' / 'last.pt'}: model.options.channels: 4 → 8; "
        "train.batch_size: 16 → 32. These change the training (docs/reliability.md lists what may change); "
        "use the checkpoint's values or another --output"
    )
    # What may change (docs/reliability.md): the run continues.
    monkeypatch.undo()
    allowed = [
        "train.max_steps=3",
        "train.log_every=2",
        "train.ckpt_minutes=30",
        "eval.enabled=true",
        "data.eval_batch_size=32",
    ]
    assert run_training(DEMO, run_dir, [*common(spec), *allowed])["step"] == 3


def worker_pids(agent_pid: int, ranks: int, timeout: float = 60.0) -> dict[int, int]:
    """torchrun's worker processes by RANK, read from their environment. The agent may have other
    children (multiprocessing's resource tracker, a worker just exiting): those are skipped."""
    deadline, found = time.monotonic() + timeout, {}
    while time.monotonic() < deadline:
        children = subprocess.run(["pgrep", "-P", str(agent_pid)], capture_output=True, text=True).stdout.split()
        for pid in children:
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            rank = next((e.split(b"=", 1)[1] for e in environ if e.startswith(b"RANK=")), None)
            if rank is not None:
                found[int(rank)] = int(pid)
        if len(found) == ranks:
            return found
        time.sleep(0.5)
    raise AssertionError(f"torchrun agent {agent_pid}: found workers {found}, expected {ranks} ranks")


@pytest.mark.slow
def test_torchrun_sigterm_to_one_rank_stops_every_rank_at_the_same_step(spec, tmp_path):
    """Under torchrun (2 gloo ranks) a SIGTERM that reaches only rank 1 stops both after the
    same iteration (the stop is all-reduced): the collective checkpoint is written and both
    workers exit, rank 1 with 143; resuming under torchrun finishes the run."""
    from l2w_dist.distributed.testing import free_port

    run_dir = tmp_path / "run"
    args = [*common(spec, **{"eval.enabled": False}), "train.max_steps=32", "dist.backend=ddp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port())]
    cmd += ["-m", "l2w_dist.train", "--config", DEMO, "--output", str(run_dir), *args]
    agent = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_step(run_dir, 3, agent, timeout=600)
        os.kill(worker_pids(agent.pid, 2)[1], signal.SIGTERM)
        out, _ = agent.communicate(timeout=300)
    finally:
        if agent.poll() is None:
            agent.kill()
    state = ckpt(run_dir)
    assert 3 <= state["step"] < 32 and state["world_size"] == 2
    assert "exitcode  : 143" in out, out[-3000:]  # torchrun's failure report names rank 1's exit code
    # both ranks left the loop at the same step: the next run resumes there and finishes
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / 'last.pt'} at step {state['step']}" in again.stdout
    assert ckpt(run_dir)["step"] == 32
