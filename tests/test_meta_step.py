"""L2W meta-step on one process, float64: jvp = autograd = a literal released-style reference."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from l2w_dist.meta import (
    L2WConfig,
    TorchOptimizerUpdate,
    WeightNet,
    allocate_exits,
    l2w_half_step,
    l2w_iteration,
    target_counts,
    target_proportions,
)
from tests.helpers.l2w_reference import (
    TinyExitMLP,
    TinyMSDNetLike,
    loop_allocate,
    make_optimizer,
    max_rel_diff,
    reference_half_step,
    reference_meta_loss,
)

OPTIMIZERS = ["sgd", "momentum", "nesterov", "adamw"]
# The paper's ImageNet setting: what the tests that do not choose their own ε and constraint run.
IMAGENET = {"epsilon": 0.3, "constraint": "mat"}


def _setup(model_kind: str, opt_kind: str, batch: int = 16, seed: int = 0):
    torch.manual_seed(seed)
    if model_kind == "bn":
        model, x = TinyMSDNetLike(), torch.randn(batch, 3, 8, 8)
    else:
        model, x = TinyExitMLP(), torch.randn(batch, 12)
    y = torch.randint(0, 5, (batch,))
    wnet = WeightNet(3, hidden=7)
    opt = make_optimizer(opt_kind, model.parameters())
    mopt = torch.optim.SGD(wnet.parameters(), lr=0.5)  # SGD: the φ update is proportional to ∂meta/∂φ
    return model, wnet, opt, mopt, x, y


def _snapshot(model: nn.Module, wnet: nn.Module) -> dict[str, torch.Tensor]:
    out = {"m." + k: v.detach().clone() for k, v in model.state_dict().items()}
    out.update({"w." + k: v.detach().clone() for k, v in wnet.state_dict().items()})
    return out


def _two_half_steps(variant: str, model_kind: str, opt_kind: str, constraint: str = "col"):
    """Start state and end state after (X1,X2),(X2,X1): momentum / Adam moments in play."""
    model, wnet, opt, mopt, x, y = _setup(model_kind, opt_kind)
    start = _snapshot(model, wnet)
    cfg = L2WConfig(epsilon=0.8, constraint=constraint, hypergrad=variant if variant != "ref" else "jvp")
    h = x.shape[0] // 2
    if variant == "ref":
        reference_half_step(model, wnet, opt, mopt, (x[:h], y[:h]), (x[h:], y[h:]), cfg)
        reference_half_step(model, wnet, opt, mopt, (x[h:], y[h:]), (x[:h], y[:h]), cfg)
    else:
        l2w_iteration(model, wnet, opt, mopt, x, y, cfg)
    end = _snapshot(model, wnet)
    delta = {k: end[k] - start[k] for k in end if end[k].is_floating_point() and "running" not in k}
    return end, delta


@pytest.mark.parametrize("opt_kind", OPTIMIZERS)
@pytest.mark.parametrize("model_kind", ["bn", "nobn"])
def test_jvp_equals_autograd_equals_literal_reference(f64, model_kind, opt_kind):
    """(a) jvp = autograd and (b) both = the released-style loop, on parameters and their updates."""
    ends, deltas = {}, {}
    for variant in ("jvp", "autograd", "ref"):
        ends[variant], deltas[variant] = _two_half_steps(variant, model_kind, opt_kind)
    # the weight net really moved (its update is the hypergradient, SGD meta optimizer)
    assert max(d.abs().max().item() for k, d in deltas["ref"].items() if k.startswith("w.")) > 1e-4
    for a, b in (("jvp", "autograd"), ("jvp", "ref"), ("autograd", "ref")):
        assert max_rel_diff(ends[a], ends[b]) <= 1e-9, (a, b)
        assert max_rel_diff(deltas[a], deltas[b]) <= 1e-9, (a, b)


@pytest.mark.parametrize("constraint", ["mat", "row"])
def test_constraints_mat_row_match_reference(f64, constraint):
    ends = {v: _two_half_steps(v, "bn", "momentum", constraint)[1] for v in ("jvp", "ref")}
    assert max_rel_diff(ends["jvp"], ends["ref"]) <= 1e-9


def test_reference_is_sensitive_to_the_hypergradient(f64):
    """Guard against a vacuous comparison: a different ε gives a clearly different weight net."""
    _, d1 = _two_half_steps("jvp", "nobn", "momentum")
    model, wnet, opt, mopt, x, y = _setup("nobn", "momentum")
    before = _snapshot(model, wnet)
    l2w_iteration(model, wnet, opt, mopt, x, y, L2WConfig(epsilon=0.5, constraint="col"))
    d2 = {k: v - before[k] for k, v in _snapshot(model, wnet).items() if k in d1}
    assert max_rel_diff(d1, d2) > 1e-3


@pytest.mark.parametrize("opt_kind", ["nesterov", "adamw"])
@pytest.mark.parametrize("engine", ["jvp", "autograd"])
def test_hypergradient_matches_central_finite_difference(f64, engine, opt_kind):
    """(c) ∂meta/∂φ of the step = central difference of the meta loss along random directions."""
    model, wnet, opt, mopt, x, y = _setup("bn", opt_kind)
    # one real iteration first so that momentum buffers / Adam moments exist
    l2w_iteration(model, wnet, opt, mopt, x, y, L2WConfig(epsilon=0.8, constraint="col"))
    cfg = L2WConfig(epsilon=0.8, constraint="mat", hypergrad=engine)
    train, meta = (x[:8], y[:8]), (x[8:], y[8:])
    frozen_model, frozen_opt_state = copy.deepcopy(model), copy.deepcopy(opt.state_dict())
    phi0 = [p.detach().clone() for p in wnet.parameters()]

    zero_lr = torch.optim.SGD(wnet.parameters(), lr=0.0)
    l2w_half_step(model, wnet, opt, zero_lr, train=train, meta=meta, cfg=cfg)
    grad = [p.grad.clone() for p in wnet.parameters()]

    def meta_at(phi):
        m = copy.deepcopy(frozen_model)
        o = make_optimizer(opt_kind, m.parameters())
        o.load_state_dict(frozen_opt_state)
        w = copy.deepcopy(wnet)
        with torch.no_grad():
            for p, v in zip(w.parameters(), phi):
                p.copy_(v)
        return float(reference_meta_loss(m, w, o, train, meta, cfg, create_graph=False))

    g = torch.Generator().manual_seed(1)
    h = 1e-6
    for _ in range(3):
        d = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in phi0]
        plus = meta_at([p + h * e for p, e in zip(phi0, d)])
        minus = meta_at([p - h * e for p, e in zip(phi0, d)])
        fd = (plus - minus) / (2 * h)
        analytic = sum((a * e).sum().item() for a, e in zip(grad, d))
        assert abs(fd - analytic) <= 1e-6 * max(abs(fd), 1e-8) + 1e-10, (fd, analytic)


@pytest.mark.parametrize("real_weights", ["updated", "pre_update"])
@pytest.mark.parametrize("engine", ["jvp", "autograd"])
def test_batchnorm_stats_equal_a_plain_step(f64, engine, real_weights):
    """(d) running statistics after a half step = after one plain train-mode forward on the same data."""
    model, wnet, opt, mopt, x, y = _setup("bn", "momentum")
    plain = copy.deepcopy(model)
    cfg = L2WConfig(**IMAGENET, hypergrad=engine, real_weights=real_weights)
    l2w_half_step(model, wnet, opt, mopt, train=(x[:8], y[:8]), meta=(x[8:], y[8:]), cfg=cfg)
    plain(x[:8])
    stats = {k: v for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    expect = {k: v for k, v in plain.state_dict().items() if k in stats}
    assert stats and all(torch.equal(stats[k], expect[k]) for k in stats)


def test_pre_update_uses_pseudo_gradient(f64):
    """pre_update: the real step is the released one with weights from the weight net before its step."""
    model, wnet, opt, mopt, x, y = _setup("nobn", "momentum")
    ref_model, ref_w = copy.deepcopy(model), copy.deepcopy(wnet)
    ref_opt = make_optimizer("momentum", ref_model.parameters())
    cfg = L2WConfig(epsilon=0.8, constraint="col", real_weights="pre_update")
    l2w_half_step(model, wnet, opt, mopt, train=(x[:8], y[:8]), meta=(x[8:], y[8:]), cfg=cfg)
    logits = ref_model(x[:8])
    ce = torch.stack([nn.functional.cross_entropy(z, y[:8], reduction="none") for z in logits], 1)
    with torch.no_grad():
        t = ref_w(ce.detach())
        w = 1 + 0.8 * (t - t.mean(1, keepdim=True))
    ((w * ce).sum() / 8).backward()
    ref_opt.step()
    got = {k: v for k, v in model.state_dict().items()}
    assert max_rel_diff(got, ref_model.state_dict()) <= 1e-12


@pytest.mark.parametrize("tied", [False, True])
def test_vectorised_allocation_equals_loop(tied):
    """(e) vectorised allocation = the literal greedy loop, random and heavily tied confidences."""
    g = torch.Generator().manual_seed(3)
    for n, k in ((40, 5), (37, 4), (7, 3), (3, 5)):
        conf = torch.rand(n, k, generator=g, dtype=torch.float64)
        if tied:
            conf = (conf * 3).floor() / 3  # only a few distinct values
        counts = target_counts(n, k, 0.75)
        assert allocate_exits(conf, counts).tolist() == loop_allocate(conf, counts)
        assert torch.bincount(allocate_exits(conf, counts), minlength=k).tolist() == counts


def test_target_proportions_paper_values():
    q = target_proportions(5, 15 / 20)
    assert [round(v, 3) for v in q] == [0.328, 0.246, 0.184, 0.138, 0.104]
    assert abs(sum(q) - 1) < 1e-12
    with pytest.raises(ValueError, match="num_exits"):
        target_proportions(0, 0.5)


@pytest.mark.parametrize(
    "field,value",
    [
        ("constraint", "diag"),
        ("input", "logits"),
        ("hypergrad", "double"),
        ("sync", "none"),
        ("real_weights", "old"),
        ("epsilon", -1.0),
        ("target_p_index", 0),
        ("label_smoothing", 1.5),
        ("fd_step", 0.0),
    ],
)
def test_config_validation_names_value_and_allowed(field, value):
    with pytest.raises(ValueError, match=field) as info:
        L2WConfig(**{field: value})
    assert repr(value) in str(info.value)


def test_weight_net_shapes_and_input_validation():
    assert WeightNet(4, hidden=6, layers=2, input="both")(torch.rand(3, 8)).shape == (3, 4)
    out = WeightNet(4, hidden=6)(torch.randn(10, 4) * 100)
    assert out.abs().max() <= 1  # tanh range (saturates to 1.0 in float32)
    with pytest.raises(ValueError, match="'probs'"):
        WeightNet(4, input="probs")


@pytest.mark.parametrize("wpn_input", ["conf", "both"])
def test_conf_inputs_jvp_equals_autograd(f64, wpn_input):
    results = []
    for engine in ("jvp", "autograd"):
        model, _, opt, mopt, x, y = _setup("bn", "adamw")
        wnet = WeightNet(3, hidden=7, input=wpn_input)
        mopt = torch.optim.SGD(wnet.parameters(), lr=0.5)
        cfg = L2WConfig(**IMAGENET, input=wpn_input, hypergrad=engine, label_smoothing=0.1)
        stats = l2w_iteration(model, wnet, opt, mopt, x, y, cfg)
        results.append(_snapshot(model, wnet))
    assert max_rel_diff(results[0], results[1]) <= 1e-9
    assert set(stats) >= {"loss", "meta_loss", "ce/0", "w_mean/2", "w_std/1", "w_min/0", "w_max/2", "alloc/0"}
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in stats.values())  # on the device
    assert sum(stats[f"alloc/{k}"] for k in range(3)) == 8


def test_do_meta_false_is_a_weighted_plain_step(f64):
    model, wnet, opt, mopt, x, y = _setup("nobn", "sgd")
    phi = [p.detach().clone() for p in wnet.parameters()]
    stats = l2w_half_step(
        model, wnet, opt, mopt, train=(x[:8], y[:8]), meta=(x[8:], y[8:]), cfg=L2WConfig(**IMAGENET), do_meta=False
    )
    assert all(torch.equal(a, b) for a, b in zip(phi, wnet.parameters()))
    assert stats["meta_loss"] != stats["meta_loss"]  # NaN: no meta step


def test_bf16_autocast_smoke():
    model, wnet, opt, mopt, x, y = _setup("bn", "momentum")
    model, wnet = model.float(), wnet.float()
    opt = make_optimizer("momentum", model.parameters())
    mopt = torch.optim.Adam(wnet.parameters(), lr=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stats = l2w_iteration(model, wnet, opt, mopt, x.float(), y, L2WConfig(**IMAGENET))
    assert all(v == v for v in stats.values()), stats  # finite, no NaN


class _NoForwardAD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g * 2


class _ModelWithCustomOp(TinyExitMLP):
    def forward(self, x):
        return [_NoForwardAD.apply(z) for z in super().forward(x)]


def test_op_without_forward_ad_points_to_autograd(f64):
    torch.manual_seed(0)
    model = _ModelWithCustomOp()
    wnet = WeightNet(3, hidden=5)
    opt, mopt = make_optimizer("sgd", model.parameters()), torch.optim.SGD(wnet.parameters(), lr=0.1)
    x, y = torch.randn(8, 12), torch.randint(0, 5, (8,))
    with pytest.raises(NotImplementedError, match="hypergrad='autograd'") as info:
        l2w_half_step(model, wnet, opt, mopt, train=(x[:4], y[:4]), meta=(x[4:], y[4:]), cfg=L2WConfig(**IMAGENET))
    assert "_NoForwardAD" in str(info.value)
    # and the autograd engine handles it
    l2w_half_step(
        model,
        wnet,
        opt,
        mopt,
        train=(x[:4], y[:4]),
        meta=(x[4:], y[4:]),
        cfg=L2WConfig(**IMAGENET, hypergrad="autograd"),
    )


def test_unsupported_optimizer_is_refused():
    model, wnet, _, mopt, x, y = _setup("nobn", "sgd")
    opt = torch.optim.RMSprop(model.parameters())
    with pytest.raises(ValueError, match="RMSprop"):
        l2w_half_step(model, wnet, opt, mopt, train=(x[:8], y[:8]), meta=(x[8:], y[8:]), cfg=L2WConfig(**IMAGENET))


@pytest.mark.parametrize("opt_kind", [pytest.param("nesterov", marks=pytest.mark.slow), "adamw"])
def test_real_msdnet_jvp_equals_autograd_equals_reference(f64, opt_kind):
    """The same equalities on the real MSDNet (CIFAR preset, reduced width), BatchNorm in train mode."""
    from l2w_dist.models import create_model

    ends = {}
    for variant in ("jvp", "autograd", "ref"):
        torch.manual_seed(0)
        model = create_model("msdnet_cifar", num_classes=5, num_blocks=3, channels=4, growth_rate=2)
        x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 5, (8,))
        wnet = WeightNet(3, hidden=7)
        opt = make_optimizer(opt_kind, model.parameters())
        mopt = torch.optim.SGD(wnet.parameters(), lr=0.5)
        cfg = L2WConfig(epsilon=0.8, constraint="col", hypergrad="jvp" if variant == "ref" else variant)
        start = _snapshot(model, wnet)
        if variant == "ref":
            reference_half_step(model, wnet, opt, mopt, (x[:4], y[:4]), (x[4:], y[4:]), cfg)
            reference_half_step(model, wnet, opt, mopt, (x[4:], y[4:]), (x[:4], y[:4]), cfg)
        else:
            l2w_iteration(model, wnet, opt, mopt, x, y, cfg)
        end = _snapshot(model, wnet)
        ends[variant] = {k: end[k] - start[k] for k in end if end[k].is_floating_point()}
    assert max(d.abs().max().item() for k, d in ends["ref"].items() if k.startswith("w.")) > 1e-5
    assert max_rel_diff(ends["jvp"], ends["autograd"]) <= 1e-9
    assert max_rel_diff(ends["jvp"], ends["ref"]) <= 1e-9


class _MinimalRealUpdate:
    """A RealUpdate that is not TorchOptimizerUpdate (as a DeepSpeed backend would be)."""

    module = None  # the model the step is called with is the plain module

    def __init__(self, optimizer):
        self._inner = TorchOptimizerUpdate(optimizer)

    def no_sync(self):
        return self._inner.no_sync()

    def virtual_state(self, params):
        return self._inner.virtual_state(params)

    def zero_grad(self):
        self._inner.zero_grad()

    def backward(self, loss):
        self._inner.backward(loss)

    def step(self):
        self._inner.step()


def test_any_real_update_is_accepted_and_pre_update_needs_step_with_grads(f64):
    results = []
    for wrap in (lambda o: o, _MinimalRealUpdate):
        model, wnet, opt, mopt, x, y = _setup("nobn", "adamw")
        l2w_iteration(model, wnet, wrap(opt), mopt, x, y, L2WConfig(epsilon=0.3, constraint="row"))
        results.append(_snapshot(model, wnet))
    assert max_rel_diff(results[0], results[1]) == 0.0
    model, wnet, opt, mopt, x, y = _setup("nobn", "sgd")
    with pytest.raises(ValueError, match="step_with_grads"):
        l2w_iteration(
            model, wnet, _MinimalRealUpdate(opt), mopt, x, y, L2WConfig(**IMAGENET, real_weights="pre_update")
        )


def test_meta_interval_skips_the_meta_step(f64):
    model, wnet, opt, mopt, x, y = _setup("nobn", "sgd")
    phi = [p.detach().clone() for p in wnet.parameters()]
    stats = l2w_iteration(model, wnet, opt, mopt, x, y, L2WConfig(**IMAGENET), step=3, meta_interval=2)
    assert all(torch.equal(a, b) for a, b in zip(phi, wnet.parameters()))
    assert stats["meta_loss"] != stats["meta_loss"]
    l2w_iteration(model, wnet, opt, mopt, x, y, L2WConfig(**IMAGENET), step=4, meta_interval=2)
    assert not all(torch.equal(a, b) for a, b in zip(phi, wnet.parameters()))
    with pytest.raises(ValueError, match="meta_interval"):
        l2w_iteration(model, wnet, opt, mopt, x, y, L2WConfig(**IMAGENET), meta_interval=0)


@pytest.mark.parametrize("opt_kind", ["momentum", "adamw"])
def test_finite_difference_engine_close_to_autograd(f64, opt_kind):
    """The third engine: central difference of the per-sample losses along D·u (no AD through θ)."""
    grads = {}
    for engine in ("autograd", "finite_difference"):
        model, wnet, opt, mopt, x, y = _setup("bn", opt_kind)
        l2w_iteration(model, wnet, opt, mopt, x, y, L2WConfig(epsilon=0.8, constraint="col"))
        zero_lr = torch.optim.SGD(wnet.parameters(), lr=0.0)
        cfg = L2WConfig(epsilon=0.8, constraint="mat", hypergrad=engine, fd_step=1e-5)
        l2w_half_step(model, wnet, opt, zero_lr, train=(x[:8], y[:8]), meta=(x[8:], y[8:]), cfg=cfg)
        grads[engine] = torch.cat([p.grad.reshape(-1) for p in wnet.parameters()])
    err = (grads["finite_difference"] - grads["autograd"]).norm() / grads["autograd"].norm()
    assert err < 1e-7, err.item()


@pytest.mark.parametrize("with_state", [False, True])
def test_multi_tensor_adamw_step_equals_per_parameter_formula(f64, with_state):
    """The no-graph (jvp engine) AdamW virtual step and ∂θ'/∂g by _foreach ops equal the
    per-parameter formulas (the autograd engine's path), groups of mixed hyper-parameters."""
    from l2w_dist.meta.update import ParamOptState
    from l2w_dist.meta.virtual_step import derivative_of_one, step_derivative, virtual_step

    gen = torch.Generator().manual_seed(0)
    shapes = {"a": (3, 4), "b": (5,), "c": (2, 2, 3), "d": (7,)}
    params = {n: torch.randn(s, generator=gen) for n, s in shapes.items()}
    grads = {n: torch.randn(s, generator=gen) for n, s in shapes.items()}
    grads["d"][2:5] = 0.0  # zero gradient: v' = 0 where there is no state
    states = {}
    for i, (n, s) in enumerate(shapes.items()):
        moments = {}
        if with_state:
            moments = {"exp_avg": torch.randn(s, generator=gen), "exp_avg_sq": torch.rand(s, generator=gen)}
        states[n] = ParamOptState(
            kind="adamw",
            lr=1e-3 * (1 + i % 2),
            weight_decay=0.05 * (i % 2),
            betas=(0.9, 0.999),
            eps=1e-8,
            step=3 * with_state,
            **moments,
        )
    with torch.no_grad():  # adamw_foreach: on CPU the default is the per-parameter loop
        fast = virtual_step(params, grads, states, adamw_foreach=True)
    with torch.enable_grad():  # grad mode selects the per-parameter (differentiable) formula
        slow = virtual_step(params, grads, states)
    d_fast = step_derivative(grads, states, adamw_foreach=True)
    with torch.no_grad():
        d_slow = {n: derivative_of_one(states[n], g) for n, g in grads.items()}
    for n in shapes:
        torch.testing.assert_close(fast[n], slow[n].detach(), rtol=1e-14, atol=1e-15)
        torch.testing.assert_close(d_fast[n], d_slow[n], rtol=1e-13, atol=1e-15)
    assert torch.isfinite(d_fast["d"]).all()


@pytest.mark.parametrize("opt_kind", ["momentum", "nesterov", "adamw"])
def test_pre_update_iteration_reuses_the_meta_forward_exactly(f64, opt_kind):
    """pre_update: half step a's meta forward (X2 at θ') is half step b's train forward (X2 at θ,
    θ = θ'): one model forward fewer per iteration, and the same parameters, weight net,
    BatchNorm statistics, optimizer state and stats as running that forward again."""
    runs = {}
    for chain in (True, False):
        cfg = L2WConfig(epsilon=0.8, constraint="col", real_weights="pre_update", reuse_meta_forward=chain)
        model, wnet, opt, mopt, x, y = _setup("bn", opt_kind)
        calls = []
        model.register_forward_hook(lambda *a, calls=calls: calls.append(1))
        stats = [l2w_iteration(model, wnet, opt, mopt, x, y, cfg) for _ in range(3)]
        state = _snapshot(model, wnet)
        state.update({f"opt.{i}.{k}": v for i, s in enumerate(opt.state.values()) for k, v in s.items()})
        runs[chain] = (state, stats, len(calls))
    (got, got_stats, got_calls), (ref, ref_stats, ref_calls) = runs[True], runs[False]
    assert (got_calls, ref_calls) == (3 * 5, 3 * 6)  # 3 iterations: 5 model forwards instead of 6
    assert max_rel_diff(got, ref) <= 1e-12
    if opt_kind != "adamw":  # SGD's real step lands on θ' to the bit; torch's AdamW rounds differently
        assert all(torch.equal(got[k], ref[k]) for k in got if "running" in k or "num_batches" in k)
    for a, b in zip(got_stats, ref_stats):
        assert all(abs(a[k] - b[k]) <= 1e-12 * max(1.0, abs(b[k])) for k in a)


def test_pre_update_does_not_reuse_when_the_real_step_differs(f64):
    """Gradient clipping (or a custom update, or local sync across ranks) moves θ off θ': no reuse;
    nor when the config turns it off."""
    from l2w_dist.meta.l2w import _reuses_meta_forward

    model, wnet, opt, mopt, x, y = _setup("bn", "momentum")
    pre = L2WConfig(**IMAGENET, real_weights="pre_update")
    assert _reuses_meta_forward(opt, pre, None)
    assert _reuses_meta_forward(TorchOptimizerUpdate(opt), pre, None)
    assert not _reuses_meta_forward(TorchOptimizerUpdate(opt, grad_clip_norm=1.0), pre, None)
    assert not _reuses_meta_forward(_MinimalRealUpdate(opt), pre, None)
    assert not _reuses_meta_forward(opt, L2WConfig(**IMAGENET, real_weights="updated"), None)
    assert not _reuses_meta_forward(opt, L2WConfig(**IMAGENET, real_weights="pre_update", hypergrad="autograd"), None)
    assert not _reuses_meta_forward(
        opt, L2WConfig(**IMAGENET, real_weights="pre_update", reuse_meta_forward=False), None
    )
