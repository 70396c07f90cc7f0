"""The L2W iteration and the plain step never wait for the device (no host sync), and the
device-tensor optimizer form keeps the virtual step exact."""

from __future__ import annotations

import itertools

import pytest
import torch

import l2w_dist.meta.l2w as l2w_module
from l2w_dist.meta import L2WConfig, WeightNet, l2w_iteration, virtual_step
from l2w_dist.meta.update import DeviceHyperparameters, TorchOptimizerUpdate
from tests.helpers.host_sync import HostSyncError, NoHostSync, host_step_counts
from tests.helpers.l2w_reference import TinyMSDNetLike, make_optimizer, max_rel_diff


def _setup(opt_kind: str, device_form: bool, seed: int = 0, wpn_input: str = "loss"):
    torch.manual_seed(seed)
    model, x, y = TinyMSDNetLike(), torch.randn(16, 3, 8, 8), torch.randint(0, 5, (16,))
    wnet = WeightNet(3, hidden=7, input=wpn_input)
    opt = make_optimizer(opt_kind, model.parameters())
    mopt = torch.optim.Adam(wnet.parameters(), lr=1e-3)
    if device_form:  # what train.cuda_graph runs: lr and step counts as device tensors
        DeviceHyperparameters(opt)
        DeviceHyperparameters(mopt)
    return model, wnet, opt, mopt, x, y


CASES = [
    dict(real_weights=rw, hypergrad=hg, constraint=c)
    for rw, hg, c in itertools.product(
        ("updated", "pre_update"), ("jvp", "autograd", "finite_difference"), ("mat", "col", "row")
    )
]
# The default suite's share of the grid: every mode, engine, constraint and optimizer form once.
FAST = [
    ("momentum", True, dict(real_weights="updated", hypergrad="jvp", constraint="mat")),
    ("adamw", True, dict(real_weights="pre_update", hypergrad="autograd", constraint="row", input="both")),
    ("adamw", False, dict(real_weights="updated", hypergrad="finite_difference", constraint="col")),
    ("momentum", False, dict(real_weights="pre_update", hypergrad="jvp", constraint="col", label_smoothing=0.1)),
]


def _assert_no_host_read(opt_kind: str, device_form: bool, case: dict) -> None:
    """After one eager warm-up iteration (what a graph capture runs first: optimizer state,
    cached constants), an iteration with the meta step and one without read nothing back."""
    model, wnet, opt, mopt, x, y = _setup(opt_kind, device_form, wpn_input=case.get("input", "loss"))
    cfg = L2WConfig(epsilon=0.8, **case)
    l2w_iteration(model, wnet, opt, mopt, x, y, cfg)
    allowed = host_step_counts(opt, mopt)
    assert not (device_form and allowed)  # the device form keeps every step count on the device
    for step in (0, 1):  # meta step on, then off (interval 2)
        detector = NoHostSync(allowed)
        with detector:
            stats = l2w_iteration(model, wnet, opt, mopt, x, y, cfg, step=step, meta_interval=2)
        assert detector.seen > 500, case  # the detector watched the whole iteration
        assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in stats.values())
        assert torch.isfinite(stats["loss"]), (case, step)


@pytest.mark.parametrize(("opt_kind", "device_form", "case"), FAST)
def test_l2w_iteration_never_reads_the_device(opt_kind, device_form, case):
    _assert_no_host_read(opt_kind, device_form, case)


@pytest.mark.slow
@pytest.mark.parametrize("device_form", [False, True], ids=["host_hparams", "device_hparams"])
@pytest.mark.parametrize("opt_kind", ["momentum", "adamw"])
def test_l2w_iteration_never_reads_the_device_full_grid(opt_kind, device_form):
    """Every real-weights mode x engine x constraint, for each optimizer form."""
    for case in CASES:
        _assert_no_host_read(opt_kind, device_form, case)


PLANTS = {
    "item": lambda t: t[0, 0].item(),
    "tolist": lambda t: t.tolist(),
    "bool": lambda t: bool(t.sum() > 0),
    "float": lambda t: float(t.sum()),
    "mask_index": lambda t: t[t > 0],
    "nonzero": lambda t: t.nonzero(),
    "cpu": lambda t: t.cpu(),
}


def test_detector_catches_a_planted_host_read(monkeypatch):
    """The detector is not blind: one host read planted inside the iteration fails it."""
    model, wnet, opt, mopt, x, y = _setup("momentum", True)
    cfg = L2WConfig()
    l2w_iteration(model, wnet, opt, mopt, x, y, cfg)
    original = l2w_module.weighted_loss
    for plant in PLANTS.values():

        def planted(ce, weights, plant=plant):
            plant(ce.detach())
            return original(ce, weights)

        monkeypatch.setattr(l2w_module, "weighted_loss", planted)
        with pytest.raises(HostSyncError), NoHostSync():  # noqa: PT012
            l2w_iteration(model, wnet, opt, mopt, x, y, cfg)


def test_trainer_step_never_reads_the_device(tmp_path):
    """The trainer's plain step and L2W step (stats kept on the device, the loss watched on the
    device) until the log interval, where one copy brings the stats to the host."""
    from l2w_dist.config import apply_overrides, load_config
    from l2w_dist.distributed.env import DistEnv
    from l2w_dist.engine.logging import to_host
    from l2w_dist.engine.trainer import TrainingJob
    from tests.helpers.tiny_run import make_tiny_spec, overrides

    spec = make_tiny_spec(tmp_path)
    base = load_config("configs/demo.yaml", overrides(spec, **{"train.max_steps": 4, "eval.enabled": False}))
    env = DistEnv(device=torch.device("cpu"))
    cfg = apply_overrides(base, ["meta.enabled=true", "optim.name=adamw"])
    (tmp_path / "run").mkdir()
    job = TrainingJob(cfg, tmp_path / "run", env)
    x, y = next(iter(job.train_loader))
    for meta in (True, False):
        job.cfg.meta.enabled = meta
        job.train_step(x, y)  # warm-up: optimizer state
        job.step += 1
        with NoHostSync(host_step_counts(job.optimizer, job.meta_optimizer)):
            stats = job.train_step(x, y)
            job._watch_loss(stats["loss"])
        host = to_host(stats)
        assert all(isinstance(v, float) for v in host.values()) and host["loss"] > 0
        assert ("meta_loss" in host) == meta
    job.close()


# ------------------------------------------------------------------ device-tensor optimizer form


@pytest.mark.parametrize("opt_kind", ["momentum", "nesterov", "adamw"])
def test_device_form_virtual_step_is_the_real_step(f64, opt_kind):
    """With lr and step counts as device tensors (fused real step), the virtual step read from
    the same tensors lands on the real step's θ (float64), per parameter and multi-tensor."""
    torch.manual_seed(1)
    model = TinyMSDNetLike()
    opt = make_optimizer(opt_kind, model.parameters())
    hparams = DeviceHyperparameters(opt)
    params = dict(model.named_parameters())
    update = TorchOptimizerUpdate(opt)
    for _ in range(3):  # state (momentum / moments, step counts) in play
        grads = {n: torch.randn_like(p) for n, p in params.items()}
        states = update.virtual_state(params)
        assert all(isinstance(s.lr, torch.Tensor) for s in states.values())
        if opt_kind == "adamw":
            assert all(isinstance(s.step, torch.Tensor) for s in states.values() if s.exp_avg is not None)
        with torch.no_grad(), NoHostSync():
            loop = virtual_step({n: p.detach() for n, p in params.items()}, grads, states, adamw_foreach=False)
            multi = virtual_step({n: p.detach() for n, p in params.items()}, grads, states, adamw_foreach=True)
        update.step_with_grads(grads, params)
        real = {n: p.detach().clone() for n, p in params.items()}
        assert max_rel_diff(loop, real) <= 1e-12
        assert max_rel_diff(multi, real) <= 1e-12
        for group in opt.param_groups:  # a schedule writes a number; refresh copies it in place
            group["lr"] = 0.5 * float(hparams.lrs[0])
        hparams.refresh()
        assert all(g["lr"] is t for g, t in zip(opt.param_groups, hparams.lrs))


@pytest.mark.parametrize("opt_kind", ["momentum", "adamw"])
def test_device_form_iteration_equals_host_form(f64, opt_kind):
    """A whole L2W iteration with device hyper-parameters equals the host-number form (float64)."""
    ends = []
    for device_form in (False, True):
        model, wnet, opt, mopt, x, y = _setup(opt_kind, device_form)
        for step in range(3):
            l2w_iteration(model, wnet, opt, mopt, x, y, L2WConfig(), step=step)
        ends.append({**model.state_dict(), **{"w." + k: v for k, v in wnet.state_dict().items()}})
    assert max_rel_diff(ends[0], ends[1]) <= 1e-9
