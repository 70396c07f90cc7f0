"""N ranks == one process, run under a real launcher (torchrun, one or several nodes).

Launched by tests/test_dist_torchrun.py as two torchrun "nodes" on localhost; usable by
hand on a real cluster too:

    torchrun --nnodes 2 --nproc-per-node 2 --node-rank R --master-addr HOST --master-port P \
        tests/dist_scripts/equality.py --out DIR

Every rank joins through ``init_distributed()`` (the code path of real runs), records the
layout it read from the launcher, runs two L2W half steps with ``sync="global"`` through
the DDP backend on its slice of a fixed float64 batch, computes the one-process result on
the concatenated batch itself, and writes ``DIR/rank{R}.json`` with the differences.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from l2w_dist.distributed import cleanup, init_distributed  # noqa: E402
from l2w_dist.distributed.backends import build_backend  # noqa: E402
from l2w_dist.meta import L2WConfig, LocalCollectives, WeightNet, l2w_half_step  # noqa: E402
from tests.helpers.l2w_reference import TinyExitMLP, TinyMSDNetLike, make_optimizer, max_rel_diff  # noqa: E402

B = 3  # per-rank half batch
CASES = [
    dict(model="mlp", hypergrad="jvp", constraint="mat", opt="momentum", sync_bn=False),
    dict(model="mlp", hypergrad="autograd", constraint="col", opt="adamw", sync_bn=False),
    dict(model="bn", hypergrad="jvp", constraint="mat", opt="nesterov", sync_bn=True),
]


def _build(case):
    torch.manual_seed(0)
    model = TinyExitMLP() if case["model"] == "mlp" else TinyMSDNetLike()
    wnet = WeightNet(3, hidden=7)
    return (
        model,
        wnet,
        make_optimizer(case["opt"], model.parameters()),
        torch.optim.SGD(wnet.parameters(), lr=0.5),
    )


def _data(case, world):
    g = torch.Generator().manual_seed(11)
    shape = (2, world * B, 12) if case["model"] == "mlp" else (2, world * B, 3, 6, 6)
    return torch.randn(*shape, generator=g), torch.randint(0, 5, (2, world * B), generator=g)


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


def _state(module, wnet):
    out = {"m." + k: v.detach().clone() for k, v in module.state_dict().items()}
    out.update({"w." + k: v.detach().clone() for k, v in wnet.state_dict().items()})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    env = init_distributed("gloo")
    record = {
        k: getattr(env, k)
        for k in (
            "rank",
            "world_size",
            "local_rank",
            "local_world_size",
            "node_rank",
            "num_nodes",
            "backend",
            "launcher",
        )
    }
    record["cases"] = []
    try:
        for case in CASES:
            cfg = L2WConfig(epsilon=0.8, constraint=case["constraint"], hypergrad=case["hypergrad"], sync="global")
            x, y = _data(case, env.world_size)
            mine = slice(env.rank * B, (env.rank + 1) * B)
            model, wnet, opt, mopt = _build(case)
            backend = build_backend("ddp", model, opt, env=env, sync_batchnorm=case["sync_bn"])
            _two_halves(backend.model, wnet, backend.update, mopt, x[:, mine], y[:, mine], cfg)
            got = _state(backend.module, wnet)
            model1, wnet1, opt1, mopt1 = _build(case)
            _two_halves(model1, wnet1, opt1, mopt1, x, y, cfg, LocalCollectives())
            record["cases"].append({**case, "max_rel_diff": max_rel_diff(got, _state(model1, wnet1))})
    finally:
        with open(os.path.join(args.out, f"rank{env.rank}.json"), "w") as f:
            json.dump(record, f)
        cleanup()


if __name__ == "__main__":
    main()
