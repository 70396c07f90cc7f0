"""Every bad value is refused before any work: ``l2w-train``, ``l2w-eval`` and the launchers
end with one line naming the key (exit 2, no traceback), and nothing was prepared, built,
created or submitted.

The sweep goes through the real entry points (``main([...])`` in this process, plus a few
real subprocesses); anything past the checks (data preparation, model construction, the
process group, the run folder, an executor) fails the test."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import l2w_dist.data.from_config
import l2w_dist.distributed
import l2w_dist.engine.trainer
import l2w_dist.evaluate
import l2w_dist.launch.cli
from l2w_dist import train, validate
from l2w_dist.config import load_config
from l2w_dist.launch import CIFAR, IMAGENET
from l2w_dist.launch import main as launch_main
from tests.helpers.tiny_run import make_tiny_spec, overrides
from tests.launch_testutil import launch_cmd, launcher_env

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "demo.yaml")


class WorkStarted(AssertionError):
    """Something past the checks ran."""


def _forbid(*_args, **_kwargs):
    raise WorkStarted("work started before the bad value was refused")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The tiny data set, and spec files that are broken in different ways."""
    folder = tmp_path_factory.mktemp("data")
    spec = make_tiny_spec(folder)
    side = json.loads(Path(spec).read_text())
    broken = {}
    (folder / "not-json.json").write_text("shards: [a, b]\n")
    broken["not_json"] = folder / "not-json.json"
    (folder / "no-splits.json").write_text(json.dumps({"format": "x"}))
    broken["no_splits"] = folder / "no-splits.json"
    missing = json.loads(json.dumps(side))
    missing["splits"]["train"]["shards"] = ["tiny-train-999999.tar"]
    (folder / "missing-shard.json").write_text(json.dumps(missing))
    broken["missing_shard"] = folder / "missing-shard.json"
    no_holdout = json.loads(json.dumps(side))
    del no_holdout["splits"]["holdout"]
    (folder / "no-holdout.json").write_text(json.dumps(no_holdout))
    broken["no_holdout"] = folder / "no-holdout.json"
    (folder / "a-file").write_text("")
    broken["file"] = folder / "a-file"
    broken["folder"] = folder
    return spec, broken


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if data preparation, model construction, the process group or the trainer is reached."""
    monkeypatch.setattr(l2w_dist.data.from_config, "prepare_fashion_mnist", _forbid)
    monkeypatch.setattr(l2w_dist.engine.trainer, "create_model", _forbid)
    monkeypatch.setattr(l2w_dist.engine.trainer.TrainingJob, "__init__", _forbid)
    monkeypatch.setattr(l2w_dist.distributed, "init_distributed", _forbid)
    monkeypatch.setattr(l2w_dist.evaluate, "evaluate_run", _forbid)
    monkeypatch.setattr(l2w_dist.launch.cli, "make_executor", _forbid)


def _assert_one_line(err: str, key: str, prefix: str) -> None:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(prefix) and key in lines[0], err


# (base, overrides, the key the message must name). base "tiny": configs/demo.yaml on the
# tiny data set (tests/helpers/tiny_run.py); "demo": configs/demo.yaml as it is (embedded data).
SWEEP = [
    # reported by the user
    ("tiny", ["model.name=msdnet_foo"], "model.name"),
    ("tiny", ["data.spec=/nonexistent.json"], "data.spec"),
    ("tiny", ["train.threads=-1"], "train.threads"),
    ("tiny", ["data.eval_batch_size=0"], "data.eval_batch_size"),
    ("tiny", ["train.ckpt_every=-1"], "train.ckpt_every"),
    ("tiny", ["eval.every_epochs=-1"], "eval.every_epochs"),
    # model options: unknown, wrong type, refused by the builder, too few classes
    ("tiny", ["model.options.foo=1"], "model.options.foo"),
    ("tiny", ["model.options.channels=abc"], "model.options.channels"),
    ("tiny", ["model.options.bottleneck=3"], "model.options.bottleneck"),
    ("tiny", ["model.options.growth_factor=[1,2,x]"], "model.options.growth_factor"),
    ("tiny", ["model.options.reduction=2"], "model.options"),
    ("tiny", ["model.options.step_mode=sideways"], "step_mode"),
    ("tiny", ["model.options.num_blocks=0"], "num_blocks"),
    ("tiny", ["model.options.num_classes=2"], "model.options.num_classes"),
    ("tiny", ["model.options=3"], "model.options"),
    ("tiny", ["model.name=cnn_exits", "model.options={backbone: no_such_net}"], "no_such_net"),
    ("tiny", ["model.name=msdnet_imagenet", "model.options={step: 5}"], "step"),
    # data
    ("tiny", ["data.spec=NOT_JSON"], "data.spec"),
    ("tiny", ["data.spec=NO_SPLITS"], "data.spec"),
    ("tiny", ["data.spec=MISSING_SHARD"], "data.spec"),
    ("tiny", ["data.spec=NO_HOLDOUT"], "data.spec"),
    ("tiny", ["data.spec=FOLDER"], "data.spec"),
    ("tiny", ["data.num_workers=-1"], "data.num_workers"),
    ("tiny", ["data.img_size=4"], "data.img_size"),
    ("tiny", ["data.img_size=224"], "data.img_size"),  # the CIFAR MSDNet's exits expect 32x32
    ("tiny", ["data.img_size=8"], "data.img_size"),  # too small for its strided exits
    ("tiny", ["data.max_bad_fraction=1.5"], "data.max_bad_fraction"),
    ("tiny", ["data.calibration=train"], "data.calibration"),
    ("tiny", ["data.dataset=mnist"], "data.dataset"),
    ("demo", ["data.dataset=cifar"], "data.spec"),
    ("demo", ["data.holdout=70000"], "data.holdout"),
    ("demo", ["data.holdout=0"], "data.holdout"),
    ("demo", ["data.root=A_FILE/sub"], "data.root"),
    ("demo", ["model.name=vit_exits", "model.options={backbone: deit_tiny_patch16_224}"], "data.img_size"),
    # optimisation and schedule
    ("tiny", ["optim.lr=-1"], "optim.lr"),
    ("tiny", ["optim.lr=fast"], "optim.lr"),
    ("tiny", ["optim.name=adam"], "optim.name"),
    ("tiny", ["optim.momentum=1.5"], "optim.momentum"),
    ("tiny", ["optim.betas=[0.9,1.0]"], "optim.betas"),
    ("tiny", ["optim.grad_clip=-1"], "optim.grad_clip"),
    ("tiny", ["optim.label_smoothing=1"], "optim.label_smoothing"),
    ("tiny", ["optim.warmup_steps=-5"], "optim.warmup_steps"),
    ("tiny", ["meta.target_p_index=40"], "meta.target_p_index"),
    ("tiny", ["meta.target_p_index=0"], "meta.target_p_index"),
    ("tiny", ["meta.constraint=diag"], "meta.constraint"),
    ("tiny", ["meta.interval=0"], "meta.interval"),
    ("tiny", ["train.epochs=0"], "train.epochs"),
    ("tiny", ["train.max_steps=-1"], "train.max_steps"),
    ("tiny", ["train.batch_size=7"], "train.batch_size"),
    ("tiny", ["train.batch_size=1000"], "train.batch_size"),
    ("tiny", ["train.seed=-1"], "train.seed"),
    ("tiny", ["train.precision=fp16"], "train.precision"),
    ("tiny", ["train.ema_decay=1.5"], "train.ema_decay"),
    ("tiny", ["train.keep_best=-1"], "train.keep_best"),
    ("tiny", ["train.log_every=0"], "train.log_every"),
    ("tiny", ["train.foo=1"], "train.foo"),
    ("tiny", ["eval.enabled=maybe"], "eval.enabled"),
    # distributed, W&B
    ("tiny", ["dist.backend=mpi"], "dist.backend"),
    ("tiny", ["dist.backend=ddp"], "dist.backend"),
    ("tiny", ["dist.zero_stage=4"], "dist.zero_stage"),
    ("tiny", ["dist.zero_stage=2"], "dist.zero_stage"),
    ("tiny", ["dist.backend=deepspeed", "dist.zero_stage=3"], "dist.zero_stage"),
    ("tiny", ["wandb.mode=maybe"], "wandb.mode"),
    ("tiny", ["wandb.tags=[ok,'']"], "wandb.tags"),
    ("tiny", ["optim.lr"], "optim.lr"),  # not key=value
    ("tiny", ["model.options={num_classes: 4"], "model.options"),  # not YAML
]
if not torch.cuda.is_available():
    SWEEP.append(("tiny", ["train.device=cuda"], "train.device"))


def _argv(base: str, extra: list[str], data, output: Path) -> list[str]:
    spec, broken = data
    names = {k.upper(): str(v) for k, v in broken.items()}  # NOT_JSON -> the broken spec's path
    filled = []
    for item in extra:
        key, sep, value = item.partition("=")
        value = names.get(value, value).replace("A_FILE", str(broken["file"]))
        filled.append(key + sep + value)
    head = overrides(spec) if base == "tiny" else []
    return ["--config", DEMO, "--output", str(output), *head, *filled]


def test_the_sweep_has_every_reported_value_and_more():
    assert len(SWEEP) >= 2 * 27


@pytest.mark.parametrize("base, extra, key", SWEEP, ids=[" ".join(e) for _b, e, _k in SWEEP])
def test_l2w_train_refuses_a_bad_value_before_any_work(base, extra, key, data, no_work, tmp_path, capsys):
    output = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        train.main(_argv(base, extra, data, output))
    assert exit_.value.code == 2
    _assert_one_line(capsys.readouterr().err, key, "l2w-train: config error: ")
    assert not output.exists()


@pytest.mark.parametrize("base", ["tiny", "demo"])
def test_good_config_passes_the_checks_and_reaches_the_work(base, data, no_work, tmp_path):
    """The control: the same entry with good values gets past every check (so the sweep's
    refusals are the checks', not the stand-ins')."""
    with pytest.raises(WorkStarted):
        train.main(_argv(base, [], data, tmp_path / "run"))


# ------------------------------------------------------------------------------- l2w-eval
@pytest.fixture(scope="module")
def checkpoint(data, tmp_path_factory):
    """A checkpoint as l2w-train writes it, as far as l2w-eval reads it before any work: its config."""
    path = tmp_path_factory.mktemp("run") / "checkpoints" / "last.pt"
    path.parent.mkdir()
    cfg = load_config(DEMO, overrides(data[0]))
    torch.save({"config": cfg.to_dict(), "model": {}, "ema": None}, path)
    return path


@pytest.mark.parametrize(
    "extra, key",
    [
        (["data.eval_batch_size=0"], "data.eval_batch_size"),
        (["data.spec=/nonexistent.json"], "data.spec"),
        (["model.name=msdnet_foo"], "model.name"),
        (["model.options.channels=-3"], "channels"),
        (["data.calibration=holdout", "data.spec=NO_HOLDOUT"], "data.spec"),
        (["train.device=cuda"] if not torch.cuda.is_available() else ["train.device=gpu"], "train.device"),
        (["--weights", "ema"], "--weights ema"),
        (["data.spec"], "data.spec"),
    ],
)
def test_l2w_eval_refuses_a_bad_value_before_any_work(extra, key, data, checkpoint, no_work, tmp_path, capsys):
    extra = [e.replace("NO_HOLDOUT", str(data[1]["no_holdout"])) for e in extra]
    with pytest.raises(SystemExit) as exit_:
        validate.main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "out"), *extra])
    assert exit_.value.code == 2
    _assert_one_line(capsys.readouterr().err, key, "l2w-eval: ")
    assert not (tmp_path / "out").exists()


def test_l2w_eval_refuses_a_missing_checkpoint(no_work, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        validate.main(["--checkpoint", str(tmp_path / "nope.pt")])
    assert exit_.value.code == 2
    _assert_one_line(capsys.readouterr().err, "nope.pt", "l2w-eval: ")


def test_l2w_eval_good_overrides_reach_the_work(data, checkpoint, no_work, tmp_path):
    with pytest.raises(WorkStarted):
        validate.main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "out"), "data.eval_batch_size=32"])


# ------------------------------------------------------------------------------- launchers
LAUNCH_SWEEP = [
    (["model.name=msdnet_foo"], "model.name"),
    (["data.spec=/nonexistent.json"], "data.spec"),
    (["model.options.foo=1"], "model.options.foo"),
    (["data.eval_batch_size=0"], "data.eval_batch_size"),
    (["train.threads=-1"], "train.threads"),
    (["--tasks-per-node", "3", "train.batch_size=16"], "train.batch_size"),  # 16 over 3 ranks
    (["dist.backend=deepspeed", "dist.zero_stage=3"], "dist.zero_stage"),
    (["--array", "optim.lr=0.1,-1"], "optim.lr"),  # the second array task's value
]


@pytest.mark.parametrize("preset", [CIFAR, IMAGENET], ids=["cifar", "imagenet"])
@pytest.mark.parametrize("extra, key", LAUNCH_SWEEP, ids=[" ".join(e) for e, _k in LAUNCH_SWEEP])
def test_launchers_refuse_a_bad_value_before_submitting(preset, extra, key, data, no_work, tmp_path, capsys):
    output = tmp_path / "runs"
    argv = ["--cluster", "local", "--gpus-per-node", "0", "--config", DEMO, "--output", str(output)]
    code = launch_main([*argv, *overrides(data[0]), *extra], preset=preset)
    assert code == 2
    err = capsys.readouterr().err
    _assert_one_line(err, "", "error: config error in ")
    assert key in err.split("): ", 1)[1]  # in the message, not only in the overrides it lists
    assert "nothing was submitted" in err and not output.exists()


# ------------------------------------------------------------------------------- real processes
def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=launcher_env(), timeout=120, cwd=REPO)


@pytest.mark.integration
def test_real_l2w_train_process_prints_one_line_and_exits_2(tmp_path):
    res = _run([sys.executable, "-m", "l2w_dist.train", "--config", DEMO, "--output", str(tmp_path / "a"),
                "model.name=msdnet_foo"])  # fmt: skip
    assert res.returncode == 2, res.stderr
    _assert_one_line(res.stderr, "model.name", "l2w-train: config error: ")
    assert not (tmp_path / "a").exists()


@pytest.mark.slow
def test_real_processes_print_one_line_and_exit_2(tmp_path):
    """As a user runs them: the trainer and both launcher scripts."""
    cases = [
        ([sys.executable, "-m", "l2w_dist.train", "--config", DEMO, "--output", str(tmp_path / "a"),
          "data.spec=/nonexistent.json"], "data.spec", "l2w-train: config error: "),
        (launch_cmd("--cluster", "local", "--gpus-per-node", "0", "--config", DEMO, "--output",
                    str(tmp_path / "b"), "train.threads=-1", script="cifar"), "train.threads", "error: config error"),
        (launch_cmd("--cluster", "local", "--gpus-per-node", "0", "--config", DEMO, "--output",
                    str(tmp_path / "c"), "model.options.foo=1", script="imagenet"), "options.foo", "error: config"),
    ]  # fmt: skip
    for cmd, key, prefix in cases:
        res = _run(cmd)
        assert res.returncode == 2, res.stderr
        _assert_one_line(res.stderr, key, prefix)
    assert not any((tmp_path / d).exists() for d in "abc")
