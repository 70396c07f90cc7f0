"""The L2W step through the backends, over gloo (2 CPU processes).

- DeepSpeed ZeRO-1 and ZeRO-2 end 3 L2W iterations with the same parameters as DDP (fp32);
  bf16 autocast under ZeRO-2 runs and stays close.
- BatchNorm models: with ``sync_batchnorm=True`` (GlobalBatchNorm) ``sync="global"`` equals
  one process on the concatenated batch (float64, both engines, running statistics included);
  without it, ``sync="global"`` equals one process with ghost BatchNorm over the ranks' slices
  (the difference is exactly the statistics' batch size), and ``sync="local"`` equals a literal
  per-rank released-style reference.

The BatchNorm-free global-vs-one-process equalities over DDP are meta's
(tests/test_meta_dist.py); they are not repeated here.
"""

from __future__ import annotations

import copy

import pytest
import torch

from l2w_dist.distributed.backends import build_backend
from l2w_dist.distributed.env import DistEnv
from l2w_dist.distributed.testing import run_ranks
from l2w_dist.meta import L2WConfig, LocalCollectives, WeightNet, l2w_half_step, l2w_iteration
from tests.helpers.l2w_reference import (
    TinyExitMLP,
    TinyMSDNetLike,
    make_optimizer,
    max_rel_diff,
    mean_gradients_over_ranks,
    reference_half_step,
)

B = 4  # per-rank half batch


def _state(module, wnet) -> dict[str, torch.Tensor]:
    out = {"m." + k: v.detach().clone() for k, v in module.state_dict().items()}
    out.update({"w." + k: v.detach().clone() for k, v in wnet.state_dict().items()})
    return out


# ------------------------------------------------------------------ ZeRO-1/2 == DDP (fp32)

ZERO_CASES = [
    dict(hypergrad="jvp", constraint="mat", opt="momentum", real_weights="updated"),
    dict(hypergrad="jvp", constraint="col", opt="adamw", real_weights="updated"),
    dict(hypergrad="autograd", constraint="mat", opt="nesterov", real_weights="updated"),
    dict(hypergrad="jvp", constraint="mat", opt="momentum", real_weights="pre_update"),
]


def _l2w_run(env: DistEnv, kind: str, stage: int, case: dict, iters: int = 3, precision: str = "fp32"):
    torch.manual_seed(0)
    model, wnet = TinyExitMLP(), WeightNet(3, hidden=7)
    opt = make_optimizer(case["opt"], model.parameters())
    backend = build_backend(kind, model, opt, env=env, zero_stage=stage, precision=precision)
    mopt = torch.optim.Adam(wnet.parameters(), lr=1e-2)
    cfg = L2WConfig(
        epsilon=0.8,
        constraint=case["constraint"],
        hypergrad=case["hypergrad"],
        real_weights=case["real_weights"],
    )
    g = torch.Generator().manual_seed(7)
    for it in range(iters):
        x = torch.randn(env.world_size, 2 * B, 12, generator=g)[env.rank]
        y = torch.randint(0, 5, (env.world_size, 2 * B), generator=g)[env.rank]
        backend.set_lr(0.1 * (1 - it / iters) + 0.01)  # a schedule, as the trainer's
        with backend.autocast():
            l2w_iteration(backend.model, wnet, backend.update, mopt, x, y, cfg)
    return _state(backend.module, wnet)


def _zero_vs_ddp(env: DistEnv) -> list[tuple[dict, int, float, float]]:
    out = []
    for case in ZERO_CASES:
        ddp = _l2w_run(env, "ddp", 0, case)
        torch.manual_seed(0)
        start = _state(TinyExitMLP(), WeightNet(3, hidden=7))
        for stage in (1, 2):
            ds = _l2w_run(env, "deepspeed", stage, case)
            moved = max(float((ddp[k] - start[k]).abs().max() / start[k].abs().max()) for k in ddp)
            out.append((case, stage, max_rel_diff(ds, ddp), moved))
        if case is ZERO_CASES[0]:  # bf16 autocast under ZeRO-2: fp32 master state, close to fp32
            bf16 = _l2w_run(env, "deepspeed", 2, case, precision="bf16")
            assert all(v.dtype == ddp[k].dtype for k, v in bf16.items())
            out.append(({**case, "precision": "bf16"}, 2, max_rel_diff(bf16, ddp), moved))
    return out


@pytest.mark.integration
def test_zero1_zero2_equal_ddp_after_three_l2w_iterations():
    for rank_results in run_ranks(_zero_vs_ddp, 2, timeout_s=170):
        for case, stage, diff, moved in rank_results:
            assert moved > 1e-3, (case, "training did not move the parameters: vacuous comparison")
            if case.get("precision") == "bf16":
                assert 0 < diff <= 5e-2, (case, stage, diff)  # bf16 forwards: close, not equal
            else:
                assert diff <= 1e-6, (case, stage, diff)


# ------------------------------------------------------------------ BatchNorm (float64)

BN_CASES = [
    dict(hypergrad="jvp", constraint="mat", opt="momentum"),
    dict(hypergrad="autograd", constraint="col", opt="adamw"),
    dict(hypergrad="jvp", constraint="row", opt="nesterov"),
]


class _GhostBatchNorm2d(torch.nn.BatchNorm2d):
    """BatchNorm with statistics per consecutive group of the batch (one group per rank)."""

    groups = 1

    def forward(self, x):
        return torch.cat([torch.nn.BatchNorm2d.forward(self, part) for part in x.chunk(self.groups)])


def _bn_data(world: int):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, world * B, 3, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (2, world * B), generator=g)
    return x, y


def _two_halves(model, wnet, opt, mopt, x, y, cfg, collectives=None):
    for tr, me in ((0, 1), (1, 0)):
        l2w_half_step(
            model,
            wnet,
            opt,
            mopt,
            train=(x[tr], y[tr]),
            meta=(x[me], y[me]),
            cfg=cfg,
            collectives=collectives,
        )


def _fresh(case):
    torch.manual_seed(0)
    model, wnet = TinyMSDNetLike(), WeightNet(3, hidden=7)
    return (
        model,
        wnet,
        make_optimizer(case["opt"], model.parameters()),
        torch.optim.SGD(wnet.parameters(), lr=0.5),
    )


def _local_reference(case, x, y):
    """Released per-rank step, literally: copy + create_graph on local data, local BatchNorm,
    weight-net gradient and real gradient averaged over ranks by hand."""
    model, wnet, opt, mopt = _fresh(case)
    cfg = L2WConfig(epsilon=0.8, constraint=case["constraint"], sync="local")
    for tr, me in ((0, 1), (1, 0)):
        reference_half_step(
            model, wnet, opt, mopt, (x[tr], y[tr]), (x[me], y[me]), cfg, average_gradients=mean_gradients_over_ranks
        )
    return _state(model, wnet)


def _bn_worker(env: DistEnv) -> dict:
    torch.set_default_dtype(torch.float64)
    world, r = env.world_size, env.rank
    x, y = _bn_data(world)
    mine = slice(r * B, (r + 1) * B)
    out = {}
    for i, case in enumerate(BN_CASES):
        cfg = L2WConfig(epsilon=0.8, constraint=case["constraint"], hypergrad=case["hypergrad"], sync="global")
        # N ranks, DDP + GlobalBatchNorm
        model, wnet, opt, mopt = _fresh(case)
        backend = build_backend("ddp", model, opt, env=env, sync_batchnorm=True)
        _two_halves(backend.model, wnet, backend.update, mopt, x[:, mine], y[:, mine], cfg)
        got = _state(backend.module, wnet)
        # one process, plain BatchNorm, concatenated batch
        model1, wnet1, opt1, mopt1 = _fresh(case)
        start = _state(model1, wnet1)
        _two_halves(model1, wnet1, opt1, mopt1, x, y, cfg, LocalCollectives())
        want = _state(model1, wnet1)
        delta = max_rel_diff({k: got[k] - start[k] for k in got}, {k: want[k] - start[k] for k in want})
        # N ranks, DDP, per-rank BatchNorm: differs (the statistics are those of B samples)
        model2, wnet2, opt2, mopt2 = _fresh(case)
        plain = build_backend("ddp", model2, opt2, env=env)
        _two_halves(plain.model, wnet2, plain.update, mopt2, x[:, mine], y[:, mine], cfg)
        # ... and equals exactly one process with "ghost" BatchNorm over the ranks' slices
        model3, wnet3, opt3, mopt3 = _fresh(case)
        for m in model3.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.__class__ = _GhostBatchNorm2d
                m.groups = world
        _two_halves(model3, wnet3, opt3, mopt3, x, y, cfg, LocalCollectives())
        no_stats = [k for k in want if "running" not in k and "num_batches" not in k]
        ghost = max_rel_diff(
            {k: _state(model2, wnet2)[k] for k in no_stats}, {k: _state(model3, wnet3)[k] for k in no_stats}
        )
        unsynced = max_rel_diff(
            {k: v for k, v in _state(model2, wnet2).items() if "running" not in k},
            {k: v for k, v in want.items() if "running" not in k},
        )
        out[f"global{i}"] = (max_rel_diff(got, want), delta, unsynced, ghost)
    # sync="local" with per-rank BatchNorm against the literal per-rank reference
    for i, case in enumerate(BN_CASES[:2]):
        cfg = L2WConfig(epsilon=0.8, constraint=case["constraint"], hypergrad=case["hypergrad"], sync="local")
        model, wnet, opt, mopt = _fresh(case)
        backend = build_backend("ddp", model, opt, env=env)
        _two_halves(backend.model, wnet, backend.update, mopt, x[:, mine], y[:, mine], cfg)
        got = _state(backend.module, wnet)
        want = _local_reference(case, x[:, mine], y[:, mine])
        # DDP broadcasts rank 0's buffers before each forward: running statistics are rank 0's
        # history on every rank, so they are compared on rank 0 only.
        keys = [k for k in got if r == 0 or not ("running" in k or "num_batches" in k)]
        out[f"local{i}"] = max_rel_diff({k: got[k] for k in keys}, {k: want[k] for k in keys})
    return out


@pytest.mark.integration
def test_batchnorm_global_with_sync_bn_equals_one_process_and_local_matches_reference():
    for rank, res in enumerate(run_ranks(_bn_worker, 2, timeout_s=170)):
        for i, case in enumerate(BN_CASES):
            diff, delta, unsynced, ghost = res[f"global{i}"]
            assert diff <= 1e-9 and delta <= 1e-9, (rank, case, diff, delta)
            assert unsynced > 1e-6, (rank, case, "per-rank BatchNorm should differ", unsynced)
            assert ghost <= 1e-9, (rank, case, "per-rank BatchNorm = one process with ghost BatchNorm", ghost)
        for i, case in enumerate(BN_CASES[:2]):
            assert res[f"local{i}"] <= 1e-9, (rank, case, res[f"local{i}"])


def test_global_batchnorm_is_batchnorm_in_one_process():
    from l2w_dist.distributed.sync_bn import convert_sync_batchnorm

    torch.manual_seed(0)
    ref = TinyMSDNetLike()
    model = convert_sync_batchnorm(copy.deepcopy(ref))
    x = torch.randn(6, 3, 6, 6)
    for a, b in zip(model(x), ref(x)):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(model.state_dict(), ref.state_dict())
    model.eval(), ref.eval()
    for a, b in zip(model(x), ref(x)):
        torch.testing.assert_close(a, b)
