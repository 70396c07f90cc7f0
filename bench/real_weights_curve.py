"""Toy curve: plain vs L2W real_weights="updated" vs "pre_update" on a synthetic task.

A BatchNorm-free 4-exit MLP on a 10-class Gaussian mixture with 10% label noise, 600
iterations of batch 64 (L2W: two half steps per iteration), 3 seeds; per-exit test accuracy
every 100 iterations. Evidence about the two real_weights options on a toy problem only.

    PYTHONPATH=. python bench/real_weights_curve.py OUT.json
"""

from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F

from l2w_dist.meta import L2WConfig, WeightNet, l2w_iteration
from tests.helpers.l2w_reference import TinyExitMLP

MODES = ("plain", "updated", "pre_update")


def make_data(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    means = torch.randn(10, 20, generator=torch.Generator().manual_seed(123)) * 0.9
    y = torch.randint(0, 10, (n,), generator=g)
    x = means[y] + torch.randn(n, 20, generator=g)
    flip = torch.rand(n, generator=g) < 0.1
    return x, torch.where(flip, torch.randint(0, 10, (n,), generator=g), y)


def run(mode: str, seed: int, iters: int = 600, batch: int = 64) -> list:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    xtr, ytr = make_data(6000, g)
    xte, yte = make_data(4000, torch.Generator().manual_seed(999))
    model = TinyExitMLP(num_exits=4, num_classes=10, in_features=20, hidden=32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iters)
    wnet = WeightNet(4, hidden=100)
    mopt = torch.optim.Adam(wnet.parameters(), lr=1e-3, weight_decay=1e-4)
    real_weights = "pre_update" if mode == "pre_update" else "updated"
    cfg = L2WConfig(epsilon=0.8, constraint="col", real_weights=real_weights)
    curve = []
    for it in range(iters):
        idx = torch.randint(0, 6000, (batch,), generator=g)
        x, y = xtr[idx], ytr[idx]
        if mode == "plain":
            loss = sum(F.cross_entropy(z, y) for z in model(x))
            opt.zero_grad()
            loss.backward()
            opt.step()
        else:
            l2w_iteration(model, wnet, opt, mopt, x, y, cfg)
        sched.step()
        if (it + 1) % 100 == 0:
            with torch.no_grad():
                acc = [(z.argmax(1) == yte).float().mean().item() for z in model(xte)]
            curve.append((it + 1, [round(a * 100, 2) for a in acc]))
    return curve


def main() -> None:
    torch.set_num_threads(1)
    out = {m: [run(m, s) for s in (0, 1, 2)] for m in MODES}
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(out, f, indent=1)
    for m, runs in out.items():
        final = [sum(r[-1][1][k] for r in runs) / len(runs) for k in range(4)]
        print(m, "final per-exit test acc (mean of 3 seeds):", [round(v, 2) for v in final])


if __name__ == "__main__":
    main()
