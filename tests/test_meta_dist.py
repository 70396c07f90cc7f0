"""sync="global" over gloo: N ranks x batch B = one process on the concatenated N·B batch.

One spawn per world size runs every configuration (engines x constraints x optimizers) so the
test stays fast. The model is DDP-wrapped (gloo, CPU, float64): the real update's gradient
sync is DDP's; the L2W step's own collectives are plain torch.distributed calls.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from l2w_dist.distributed.env import DistEnv
from l2w_dist.distributed.testing import run_ranks
from l2w_dist.meta import L2WConfig, LocalCollectives, TorchOptimizerUpdate, WeightNet, l2w_half_step
from tests.helpers.l2w_reference import (
    TinyExitMLP,
    make_optimizer,
    max_rel_diff,
    mean_gradients_over_ranks,
    reference_half_step,
)

B = 4  # per-rank half-batch (train half and meta half each)

GLOBAL_CONFIGS = [
    dict(hypergrad=h, constraint=c, opt=o, real_weights="updated")
    for h in ("jvp", "autograd")
    for c in ("mat", "col")
    for o in ("momentum", "adamw")
] + [
    dict(hypergrad="jvp", constraint="row", opt="nesterov", real_weights="updated"),
    dict(hypergrad="jvp", constraint="mat", opt="momentum", real_weights="pre_update"),
]
LOCAL_CONFIGS = [
    dict(hypergrad=h, constraint=c, opt=o, real_weights="updated")
    for h, c, o in (("jvp", "mat", "momentum"), ("autograd", "col", "adamw"))
]


def _build(conf: dict, seed: int = 0):
    torch.manual_seed(seed)
    model = TinyExitMLP()
    wnet = WeightNet(3, hidden=7)
    return model, wnet


def _data(world: int, seed: int = 1):
    """Two global halves (each world·B samples); rank r owns rows [r·B, (r+1)·B)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, world * B, 12, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (2, world * B), generator=g)
    return x, y


def _cfg(conf: dict, sync: str) -> L2WConfig:
    return L2WConfig(
        epsilon=0.8,
        constraint=conf["constraint"],
        hypergrad=conf["hypergrad"],
        sync=sync,
        real_weights=conf["real_weights"],
    )


def _ddp_update(ddp: DDP, optimizer: torch.optim.Optimizer) -> TorchOptimizerUpdate:
    """The real update over a DDP model, as the ddp backend builds it."""
    return TorchOptimizerUpdate(optimizer, module=ddp.module, no_sync=ddp.no_sync)


def _two_half_steps(model, wnet, opt, mopt, x, y, cfg, collectives=None):
    for tr, me in ((0, 1), (1, 0)):
        l2w_half_step(
            model, wnet, opt, mopt, train=(x[tr], y[tr]), meta=(x[me], y[me]), cfg=cfg, collectives=collectives
        )


def _state(model, wnet):
    out = {"m." + k: v.detach().clone() for k, v in model.state_dict().items()}
    out.update({"w." + k: v.detach().clone() for k, v in wnet.state_dict().items()})
    return out


def _local_reference(conf, x, y):
    """Literal per-rank released-style step: copy + create_graph meta step on local data, weight-net
    gradient averaged over ranks, real gradient averaged over ranks by hand."""
    model, wnet = _build(conf)
    opt = make_optimizer(conf["opt"], model.parameters())
    mopt = torch.optim.SGD(wnet.parameters(), lr=0.5)
    cfg = _cfg(conf, "local")
    for tr, me in ((0, 1), (1, 0)):
        reference_half_step(
            model, wnet, opt, mopt, (x[tr], y[tr]), (x[me], y[me]), cfg, average_gradients=mean_gradients_over_ranks
        )
    return _state(model, wnet)


def _rank_results(env: DistEnv) -> dict:
    torch.set_default_dtype(torch.float64)
    world, rank = env.world_size, env.rank
    results = {}
    x, y = _data(world)
    mine = slice(rank * B, (rank + 1) * B)
    for i, conf in enumerate(GLOBAL_CONFIGS):
        model, wnet = _build(conf)
        ddp = DDP(model)
        opt = _ddp_update(ddp, make_optimizer(conf["opt"], ddp.parameters()))
        mopt = torch.optim.SGD(wnet.parameters(), lr=0.5)
        _two_half_steps(ddp, wnet, opt, mopt, x[:, mine], y[:, mine], _cfg(conf, "global"))
        got = _state(model, wnet)
        # one process on the concatenated batch (every rank computes it; no process group used)
        model1, wnet1 = _build(conf)
        opt1 = make_optimizer(conf["opt"], model1.parameters())
        mopt1 = torch.optim.SGD(wnet1.parameters(), lr=0.5)
        start = _state(model1, wnet1)
        _two_half_steps(model1, wnet1, opt1, mopt1, x, y, _cfg(conf, "global"), LocalCollectives())
        want = _state(model1, wnet1)
        delta_got = {k: got[k] - start[k] for k in got}
        delta_want = {k: want[k] - start[k] for k in want}
        results[f"global{i}"] = (max_rel_diff(got, want), max_rel_diff(delta_got, delta_want))
    for i, conf in enumerate(LOCAL_CONFIGS):
        model, wnet = _build(conf)
        ddp = DDP(model)
        opt = _ddp_update(ddp, make_optimizer(conf["opt"], ddp.parameters()))
        mopt = torch.optim.SGD(wnet.parameters(), lr=0.5)
        _two_half_steps(ddp, wnet, opt, mopt, x[:, mine], y[:, mine], _cfg(conf, "local"))
        got = _state(model, wnet)
        want = _local_reference(conf, x[:, mine], y[:, mine])
        # local differs from global: a non-vacuous check that "local" really is per rank
        model_g, wnet_g = _build(conf)
        opt_g = make_optimizer(conf["opt"], model_g.parameters())
        mopt_g = torch.optim.SGD(wnet_g.parameters(), lr=0.5)
        _two_half_steps(model_g, wnet_g, opt_g, mopt_g, x, y, _cfg(conf, "global"), LocalCollectives())
        results[f"local{i}"] = (max_rel_diff(got, want), max_rel_diff(got, _state(model_g, wnet_g)))
    return results


@pytest.mark.integration
@pytest.mark.parametrize("world", [2, 4])
def test_global_sync_equals_one_process_and_local_matches_per_rank_reference(world):
    results = run_ranks(_rank_results, world, timeout_s=600)
    for rank, res in enumerate(results):
        for i, conf in enumerate(GLOBAL_CONFIGS):
            params_diff, delta_diff = res[f"global{i}"]
            assert params_diff <= 1e-9 and delta_diff <= 1e-9, (rank, conf, params_diff, delta_diff)
        for i, conf in enumerate(LOCAL_CONFIGS):
            ref_diff, vs_global = res[f"local{i}"]
            assert ref_diff <= 1e-9, (rank, conf, ref_diff)
            assert vs_global > 1e-6, (rank, conf, vs_global)


def test_default_collectives_is_local_without_process_group():
    from l2w_dist.meta import default_collectives

    assert not dist.is_initialized()
    assert default_collectives().world_size == 1
