"""train.cuda_graph: refusals, the capture/replay logic and its eager fallback (CPU), and graph
replay equal to eager execution (CUDA only: skipped without a GPU)."""

from __future__ import annotations

import copy

import pytest
import torch

from l2w_dist.config import ConfigError, apply_overrides, load_config
from l2w_dist.engine.cuda_graph import GraphedIteration, check_cuda_graph
from l2w_dist.meta import L2WConfig, WeightNet, l2w_iteration
from l2w_dist.meta.update import DeviceHyperparameters
from tests.helpers.l2w_reference import TinyExitMLP, TinyMSDNetLike, make_optimizer, max_rel_diff

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU machine)")


def test_refusals_name_the_key_and_the_reason(monkeypatch):
    with pytest.raises(ConfigError, match=r"^train.cuda_graph=true needs a CUDA device; this run trains on cpu"):
        check_cuda_graph(torch.device("cpu"), "none", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for backend in ("ddp", "deepspeed"):
        with pytest.raises(ConfigError, match=rf"not supported with dist.backend={backend}: .*collectives"):
            check_cuda_graph(torch.device("cuda"), backend, False)
    with pytest.raises(ConfigError, match="train.compile=true"):
        check_cuda_graph(torch.device("cuda"), "none", True)
    check_cuda_graph(torch.device("cuda"), "none", False)  # the supported case passes


def test_trainer_refuses_cuda_graph_on_cpu_before_any_work(tmp_path):
    from l2w_dist.distributed.env import DistEnv
    from l2w_dist.engine.trainer import TrainingJob

    cfg = load_config("configs/demo.yaml", ["train.cuda_graph=true", "data.spec=/nonexistent"])
    assert cfg.train.cuda_graph is True and apply_overrides(cfg, ["train.cuda_graph=false"]).train.cuda_graph is False
    with pytest.raises(ConfigError, match="train.cuda_graph=true needs a CUDA device") as err:
        TrainingJob(cfg, tmp_path, DistEnv(device=torch.device("cpu")))  # before the data is even looked at
    assert "\n" not in str(err.value)


class _EagerRecorder(GraphedIteration):
    """A CPU stand-in for a capture: 'replay' runs the recorded call on the static inputs and
    copies its results into fixed output buffers, as a CUDA graph replay does."""

    def record(self, sx, sy, kind):
        out: dict[str, torch.Tensor] = {}
        self.recorded = getattr(self, "recorded", 0) + 1

        def replay():
            for k, v in self.fn(sx, sy, kind).items():
                out.setdefault(k, torch.empty_like(v)).copy_(v)

        return replay, out


class _FailingRecorder(GraphedIteration):
    def record(self, sx, sy, kind):
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")


def _iteration_fn():
    torch.manual_seed(0)
    model = TinyExitMLP()
    wnet = WeightNet(3, hidden=7)
    opt = make_optimizer("momentum", model.parameters())
    mopt = torch.optim.Adam(wnet.parameters(), lr=1e-3)
    cfg = L2WConfig()

    def fn(x, y, do_meta):
        return l2w_iteration(model, wnet, opt, mopt, x, y, cfg, step=0 if do_meta else 1, meta_interval=2)

    return fn, model


def _batches(n: int):
    gen = torch.Generator().manual_seed(1)
    out = [(torch.randn(8, 12, generator=gen), torch.randint(0, 5, (8,), generator=gen)) for _ in range(n)]
    out.append((out[0][0][:4], out[0][1][:4]))  # a short last batch
    return out


def _run(wrapper_cls=None, **kw):
    fn, model = _iteration_fn()
    call = fn if wrapper_cls is None else wrapper_cls(fn, **kw)
    losses = [call(x, y, i % 2 == 0)["loss"].clone() for i, (x, y) in enumerate(_batches(6))]
    return call, model, torch.stack(losses)


@pytest.fixture(scope="module")
def eager():
    _, model, losses = _run()
    return model, losses


def test_replay_reads_every_new_batch_from_the_static_buffers(eager):
    """Warm-up calls eager, one record per kind (meta step or not), then replays on each new
    batch copied into the static inputs: the same training as eager, bit for bit."""
    eager_model, eager_losses = eager
    graphed, model, losses = _run(_EagerRecorder, warmup=1)
    assert graphed.recorded == 2 and set(graphed.graphs) == {True, False} and graphed.failed is None
    assert torch.equal(losses, eager_losses)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), eager_model.state_dict().values()))


def test_capture_failure_falls_back_to_eager_with_one_line(eager):
    lines: list[str] = []
    eager_model, eager_losses = eager
    graphed, model, losses = _run(_FailingRecorder, warmup=1, log=lines.append)
    assert lines == [
        "train.cuda_graph: capturing the iteration failed (RuntimeError: operation not permitted when stream "
        "is capturing); training continues eagerly"
    ]
    assert graphed.graphs == {} and graphed.failed
    assert torch.equal(losses, eager_losses)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), eager_model.state_dict().values()))


# ----------------------------------------------------------------------------- CUDA


def _cuda_setup(opt_kind: str, precision: str):
    torch.manual_seed(0)
    model = TinyMSDNetLike(width=8).cuda()
    wnet = WeightNet(3, hidden=16).cuda()
    opt = make_optimizer(opt_kind, model.parameters(), lr=0.05)
    mopt = torch.optim.Adam(wnet.parameters(), lr=1e-3)
    hparams = [DeviceHyperparameters(opt), DeviceHyperparameters(mopt)]
    return model, wnet, opt, mopt, hparams


@cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("opt_kind", ["momentum", "adamw"])
@pytest.mark.parametrize("real_weights", ["updated", "pre_update"])
def test_graph_replay_equals_eager_on_cuda(opt_kind, precision, real_weights):
    """Meta and no-meta iterations captured and replayed equal the same iterations run eagerly,
    with a learning rate that changes every step (the tensors the graph reads)."""
    from l2w_dist.utils import autocast

    gen = torch.Generator().manual_seed(2)
    batches = [(torch.randn(32, 3, 8, 8, generator=gen), torch.randint(0, 5, (32,), generator=gen)) for _ in range(8)]
    ends, all_losses = [], []
    for graphed in (False, True):
        model, wnet, opt, mopt, hparams = _cuda_setup(opt_kind, precision)
        cfg = L2WConfig(real_weights=real_weights)

        def fn(x, y, do_meta, model=model, wnet=wnet, opt=opt, mopt=mopt, cfg=cfg):
            with autocast("cuda", precision, cache=False):
                return l2w_iteration(model, wnet, opt, mopt, x, y, cfg, step=0 if do_meta else 1, meta_interval=2)

        call = GraphedIteration(fn, warmup=2) if graphed else fn
        losses = []
        for i, (x, y) in enumerate(batches):
            for group in opt.param_groups:
                group["lr"] = 0.05 * (1 - i / 10)  # as a schedule writes it
            for h in hparams:
                h.refresh()
            losses.append(call(x.cuda(), y.cuda(), i % 2 == 0)["loss"].clone())
        if graphed:
            assert set(call.graphs) == {True, False} and call.failed is None
        torch.cuda.synchronize()
        ends.append({**copy.deepcopy(model.state_dict()), **{"w." + k: v for k, v in wnet.state_dict().items()}})
        all_losses.append(torch.stack(losses))
    tol = 1e-4 if precision == "fp32" else 2e-2
    assert max_rel_diff(ends[0], ends[1]) <= tol
    assert torch.allclose(all_losses[0], all_losses[1], rtol=tol, atol=tol)


@cuda
@pytest.mark.parametrize("opt_kind", ["momentum", "adamw"])
def test_device_form_iteration_never_syncs_on_cuda(opt_kind):
    """CUDA's own sync detector (set_sync_debug_mode('error')) over an eager iteration."""
    model, wnet, opt, mopt, _ = _cuda_setup(opt_kind, "fp32")
    x, y = torch.randn(32, 3, 8, 8, device="cuda"), torch.randint(0, 5, (32,), device="cuda")
    l2w_iteration(model, wnet, opt, mopt, x, y, L2WConfig())
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in (0, 1):
            l2w_iteration(model, wnet, opt, mopt, x, y, L2WConfig(), step=step, meta_interval=2)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@cuda
@pytest.mark.parametrize("meta", [True, False])
def test_training_with_cuda_graph_matches_eager(tmp_path, meta):
    """l2w-train with train.cuda_graph=true (plain baseline and L2W) trains as the eager run."""
    from l2w_dist.train import run_training
    from tests.helpers.tiny_run import make_tiny_spec, overrides

    spec = make_tiny_spec(tmp_path)
    finals = []
    for graph in (False, True):
        extra = {"train.max_steps": 8, "eval.enabled": False, "meta.enabled": meta, "meta.interval": 2}
        extra |= {"train.device": "cuda", "train.cuda_graph": graph}
        run_dir = tmp_path / f"run_{graph}"
        run_training(None, run_dir, overrides(spec, **extra))
        finals.append(torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu")["model"])
    assert max_rel_diff(finals[0], finals[1]) <= 1e-3  # fused vs foreach optimizer kernels: rounding only
