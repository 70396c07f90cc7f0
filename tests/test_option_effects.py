"""Each trainer option shows its effect on the real training step (``TrainingJob.train_step``,
the L2W iteration and the plain baseline), so an option that were ignored fails its test:
bf16 runs the forward under autocast, channels_last trains in that memory format, grad_clip
bounds the gradient the optimizer steps with, label_smoothing is in the loss."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import l2w_dist.meta.l2w
from l2w_dist.config import load_config
from l2w_dist.distributed import DistEnv
from l2w_dist.engine.trainer import TrainingJob
from tests.helpers.tiny_run import make_tiny_spec, overrides

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


@pytest.fixture(scope="module")
def tiny_spec(tmp_path_factory):
    return make_tiny_spec(tmp_path_factory.mktemp("data"))


@pytest.fixture
def make_job(tiny_spec, tmp_path):
    jobs = []

    def make(**extra) -> tuple[TrainingJob, torch.Tensor, torch.Tensor]:
        """A job on the tiny set, and its loader's first batch."""
        settings = {"eval.enabled": False, "train.max_steps": 2, "data.eval_batch_size": 32, **extra}
        cfg = load_config(DEMO, overrides(tiny_spec, **settings))
        run_dir = tmp_path / f"run{len(jobs)}"
        run_dir.mkdir()
        job = TrainingJob(cfg, run_dir, DistEnv())
        jobs.append(job)
        x, y = next(iter(job.train_loader))
        return job, x, y

    yield make
    for job in jobs:
        job.close()


def _first_conv(job: TrainingJob) -> nn.Conv2d:
    return next(m for m in job.backend.module.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize(
    "meta, precision, dtype",
    [(True, "bf16", torch.bfloat16), (False, "bf16", torch.bfloat16), (False, "fp32", torch.float32)],
    ids=["l2w-bf16", "plain-bf16", "plain-fp32"],
)
def test_bf16_runs_the_training_forward_under_autocast(make_job, meta, precision, dtype):
    job, x, y = make_job(**{"train.precision": precision, "meta.enabled": meta})
    seen = []
    _first_conv(job).register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    job.train_step(x, y)
    assert seen and set(seen) == {dtype}  # every forward of the step (train, meta, virtual)
    assert all(p.dtype == torch.float32 for p in job.backend.module.parameters())  # weights stay fp32


@pytest.mark.parametrize("channels_last", [True, False])
def test_channels_last_trains_in_that_memory_format(make_job, channels_last):
    job, x, y = make_job(**{"train.channels_last": channels_last, "meta.enabled": False})
    conv = _first_conv(job)
    seen = []
    conv.register_forward_pre_hook(
        lambda m, inp: seen.append(
            (
                inp[0].is_contiguous(memory_format=torch.channels_last),
                m.weight.is_contiguous(memory_format=torch.channels_last),
            )
        )
    )
    assert x.is_contiguous(memory_format=torch.channels_last) == channels_last  # the loader's batch
    job.train_step(x, y)
    assert seen == [(channels_last, channels_last)]


def _stepped_grad_norms(job: TrainingJob) -> list[float]:
    """The global gradient norm each time the model's optimizer steps."""
    norms: list[float] = []

    def record(optimizer, _args, _kwargs):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))

    job.optimizer.register_step_pre_hook(record)
    return norms


@pytest.mark.parametrize("meta", [True, False], ids=["l2w", "plain"])
def test_grad_clip_bounds_the_gradient_the_optimizer_steps_with(make_job, meta):
    clip = 1e-3
    clipped, x, y = make_job(**{"optim.grad_clip": clip, "meta.enabled": meta})
    norms_clipped = _stepped_grad_norms(clipped)
    clipped.train_step(x, y)
    assert len(norms_clipped) == (2 if meta else 1)  # L2W: a real step per half batch
    assert max(norms_clipped) <= clip * (1 + 1e-4)
    if not meta:  # the same step unclipped: the bound above is the clip's doing
        free, _, _ = make_job(**{"optim.grad_clip": 0, "meta.enabled": meta})
        norms_free = _stepped_grad_norms(free)
        free.train_step(x, y)
        assert len(norms_free) == 1 and norms_free[0] > 10 * clip


@pytest.mark.parametrize("smoothing", [0.2, 0.0])
def test_label_smoothing_is_in_the_baseline_loss(make_job, smoothing):
    job, x, y = make_job(**{"optim.label_smoothing": smoothing, "meta.enabled": False})
    with torch.no_grad():  # train mode, as the step runs it (BatchNorm: batch statistics)
        logits = job.backend.model(x)
    stats = job.train_step(x, y)
    for k, lg in enumerate(logits):
        smoothed = F.cross_entropy(lg, y, label_smoothing=smoothing).item()
        plain = F.cross_entropy(lg, y).item()
        assert stats[f"ce/{k}"] == pytest.approx(smoothed, rel=1e-5, abs=1e-6)
        if smoothing:
            assert abs(smoothed - plain) > 1e-3


def test_label_smoothing_reaches_the_l2w_losses(make_job, monkeypatch):
    """The L2W step's train-half losses (weight-net features, weighted train loss, virtual
    step) are the smoothed cross entropy; the meta objective stays the plain one."""
    job, x, y = make_job(**{"optim.label_smoothing": 0.2, "meta.enabled": True})
    real = l2w_dist.meta.l2w.per_sample_ce
    calls = []

    def spy(logits, targets, label_smoothing=0.0):
        out = real(logits, targets, label_smoothing)
        expected = torch.stack(
            [F.cross_entropy(z.float(), targets, reduction="none", label_smoothing=label_smoothing) for z in logits], 1
        )
        calls.append((label_smoothing, torch.allclose(out.detach().float(), expected.detach(), atol=1e-5)))
        return out

    monkeypatch.setattr(l2w_dist.meta.l2w, "per_sample_ce", spy)
    job.train_step(x, y)
    assert all(same for _ls, same in calls)
    smoothed = [ls for ls, _same in calls if ls == 0.2]
    assert len(smoothed) >= 2 and {ls for ls, _same in calls} == {0.2, 0.0}  # 0.0: the meta loss
