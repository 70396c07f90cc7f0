"""Backends over gloo: DeepSpeed ZeRO state gathering, portable optimizer checkpoints, argument errors.

The reference for every distributed run is one process training a copy of the model on
the concatenated batch with a plain torch optimizer (what DDP computes, by definition).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from l2w_dist.distributed.backends import build_backend
from l2w_dist.distributed.deepspeed import ZERO3_REFUSAL
from l2w_dist.distributed.env import DistEnv
from l2w_dist.distributed.testing import run_ranks
from l2w_dist.meta.update import TorchOptimizerUpdate, UnsupportedOptimizerError

B = 4  # per-rank batch


def _model() -> nn.Module:
    # odd sizes, so ZeRO partition boundaries fall inside parameters
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3))


def _optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True)
    if name == "adam":  # without L2 weight decay: the virtual step takes it as AdamW
        return torch.optim.Adam(model.parameters(), lr=0.05, betas=(0.8, 0.95))
    if name == "adam_l2":  # L2 weight decay: refused
        return torch.optim.Adam(model.parameters(), lr=0.05, weight_decay=1e-2)
    return torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=1e-2, betas=(0.8, 0.95))


def _batch(step: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(world * B, 7, generator=g), torch.randn(world * B, 3, generator=g)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _train(update, model, x, y, steps, set_lr):
    for k in range(steps):
        if k == 2:
            set_lr(0.02)
        xs, ys = x[k], y[k]
        update.zero_grad()
        update.backward((model(xs) - ys).pow(2).mean())
        update.step()


def _zero_vs_reference(env: DistEnv, stage: int, opt_name: str, steps: int = 3) -> dict:
    """Train ZeRO-``stage`` and a one-process reference alike; compare state, params, state dicts."""
    world, r = env.world_size, env.rank
    ref = _model()
    ref_opt = _optimizer(opt_name, ref)
    model = copy.deepcopy(ref)
    backend = build_backend("deepspeed", model, _optimizer(opt_name, model), env=env, zero_stage=stage)
    batches = [_batch(k, world) for k in range(steps)]

    def set_ref_lr(lr):
        for g in ref_opt.param_groups:
            g["lr"] = lr

    # reference: full batch, one process
    _train(
        TorchOptimizerUpdate(ref_opt),
        ref,
        [b[0] for b in batches],
        [b[1] for b in batches],
        steps,
        set_ref_lr,
    )
    # deepspeed: this rank's slice
    xs = [b[0][r * B : (r + 1) * B] for b in batches]
    ys = [b[1][r * B : (r + 1) * B] for b in batches]
    _train(backend.update, backend.model, xs, ys, steps, backend.set_lr)

    # the gathered ZeRO state equals what the plain update reads from the torch optimizer
    params = dict(backend.module.named_parameters())
    got = backend.update.virtual_state(params)
    ref_params = dict(ref.named_parameters())
    wanted = TorchOptimizerUpdate(ref_opt).virtual_state(ref_params)
    out = {"param": 0.0, "state": 0.0, "meta_mismatch": [], "sd": 0.0, "loaded": 0.0}
    for name, p in params.items():
        want = wanted[name]
        have = got[name]
        out["param"] = max(out["param"], _rel(p.detach(), ref_params[name].detach()))
        for field in ("kind", "lr", "weight_decay", "momentum", "nesterov", "betas", "eps", "step"):
            if getattr(have, field) != getattr(want, field):
                out["meta_mismatch"].append((name, field, getattr(have, field), getattr(want, field)))
        for buf in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
            a, b = getattr(have, buf), getattr(want, buf)
            if (a is None) != (b is None):
                out["meta_mismatch"].append((name, buf, a is None, b is None))
            elif a is not None:
                assert a.shape == b.shape, (name, buf, a.shape, b.shape)
                out["state"] = max(out["state"], _rel(a, b))

    # the portable checkpoint equals the torch optimizer's own state dict ...
    sd, ref_sd = backend.optimizer_state_dict(), ref_opt.state_dict()
    assert sd["state"].keys() == ref_sd["state"].keys()
    for idx, st in ref_sd["state"].items():
        for key, val in st.items():
            out["sd"] = max(out["sd"], _rel(sd["state"][idx][key].float(), val.float()))
    assert [g["params"] for g in sd["param_groups"]] == [g["params"] for g in ref_sd["param_groups"]]
    # ... and a torch optimizer's state dict loads into a fresh engine, which then reports the same state
    fresh = copy.deepcopy(ref)
    backend2 = build_backend("deepspeed", fresh, _optimizer(opt_name, fresh), env=env, zero_stage=stage)
    backend2.load_optimizer_state_dict(ref_sd)
    got2 = backend2.update.virtual_state(dict(backend2.module.named_parameters()))
    for name in params:
        for buf in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
            a, b = getattr(got2[name], buf), getattr(got[name], buf)
            if b is not None:
                out["loaded"] = max(out["loaded"], _rel(a, b))
    out["loaded_lr"] = backend2.get_lr()
    return out


def _all_zero_cases(env: DistEnv) -> dict:
    # one spawn for every case: importing DeepSpeed is slow in every process
    cases = [(stage, opt) for stage in (1, 2) for opt in ("sgd", "adamw")] + [(2, "adam")]
    return {(stage, opt): _zero_vs_reference(env, stage, opt) for stage, opt in cases}


@pytest.mark.integration
@pytest.mark.parametrize("world", [2, 4])
def test_zero_virtual_state_equals_torch_optimizer_state(world):
    """ZeRO-1/2 on 2 and 4 ranks: DeepSpeedUpdate.virtual_state is exactly a torch optimizer's state.

    Also: the parameters equal the one-process reference after 3 steps (with an lr
    change), the portable state dict equals the torch optimizer's, and it loads back.
    """
    for rank_results in run_ranks(_all_zero_cases, world, timeout_s=150):
        for case, res in rank_results.items():
            assert res["meta_mismatch"] == [], (case, res["meta_mismatch"])
            assert res["param"] < 1e-6, (case, res)
            assert res["state"] < 1e-6, (case, res)
            assert res["sd"] < 1e-6, (case, res)
            assert res["loaded"] < 1e-6, (case, res)
            assert res["loaded_lr"] == pytest.approx(0.02)


def test_bad_kind_and_stage_names():
    env = DistEnv()
    m = _model()
    opt = _optimizer("sgd", m)
    with pytest.raises(ValueError, match=r"kind='ddpp'.*'none', 'ddp', 'deepspeed'"):
        build_backend("ddpp", m, opt, env=env)
    with pytest.raises(ValueError, match="stage 3 is not supported"):
        build_backend("deepspeed", m, opt, env=env, zero_stage=3)
    assert "functional_call" in ZERO3_REFUSAL
    with pytest.raises(ValueError, match=r"zero_stage=4"):
        build_backend("deepspeed", m, opt, env=env, zero_stage=4)
    with pytest.raises(ValueError, match=r"zero_stage=2 is a DeepSpeed setting"):
        build_backend("ddp", m, opt, env=env, zero_stage=2)
    with pytest.raises(ValueError, match=r"precision='fp16'"):
        build_backend("none", m, opt, env=env, precision="fp16")
    with pytest.raises(TypeError, match="RMSprop is not supported"):
        build_backend("none", m, torch.optim.RMSprop(m.parameters()), env=env)
    with pytest.raises(RuntimeError, match="needs an initialised process group"):
        build_backend("ddp", m, opt, env=env)


def test_plain_backend_is_the_module():
    m = _model()
    b = build_backend("none", m, _optimizer("sgd", m), env=DistEnv())
    assert b.model is m and b.module is m
    b.set_lr(0.3)
    assert b.get_lr() == 0.3


def test_adam_with_l2_decay_is_refused_alike_by_the_plain_update_and_deepspeed():
    """One translation of torch optimizers: the plain update and the DeepSpeed backend refuse the
    same optimizers with the same message (Adam without L2 decay is accepted by both, as AdamW:
    test_zero_virtual_state_equals_torch_optimizer_state)."""
    m = _model()
    opt = _optimizer("adam_l2", m)
    with pytest.raises(UnsupportedOptimizerError, match="Adam with L2 weight decay") as plain:
        TorchOptimizerUpdate(opt).virtual_state(dict(m.named_parameters()))
    with pytest.raises(UnsupportedOptimizerError) as deepspeed:
        build_backend("deepspeed", m, opt, env=DistEnv(), zero_stage=2)
    assert str(deepspeed.value) == str(plain.value)
    adam = TorchOptimizerUpdate(_optimizer("adam", m)).virtual_state(dict(m.named_parameters()))
    assert {s.kind for s in adam.values()} == {"adamw"}
