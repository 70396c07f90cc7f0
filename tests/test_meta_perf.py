"""Behaviour the fast paths of the L2W step must keep (autocast caching, skipped work)."""

import copy

import pytest
import torch

from l2w_dist.meta import L2WConfig, WeightNet, l2w_half_step, l2w_iteration
from tests.helpers.l2w_reference import TinyMSDNetLike


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = TinyMSDNetLike()
    wnet = WeightNet(3, hidden=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    mopt = torch.optim.Adam(wnet.parameters(), lr=1e-2)
    return model, wnet, opt, mopt


@pytest.mark.parametrize("real_weights", ["updated", "pre_update"])
def test_bf16_autocast_around_an_iteration_uses_the_updated_weights(real_weights):
    """Autocast caches bf16 parameter copies until its context exits; the second half step
    must still see θ after the first half step's update (as if each ran in its own context)."""
    torch.manual_seed(1)
    x, y = torch.randn(8, 3, 6, 6), torch.randint(0, 5, (8,))
    cfg = L2WConfig(epsilon=0.3, constraint="mat", real_weights=real_weights)
    runs = []
    for one_context in (True, False):
        model, wnet, opt, mopt = _setup()
        if one_context:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                l2w_iteration(model, wnet, opt, mopt, x, y, cfg)
        else:
            for train, meta in (((x[:4], y[:4]), (x[4:], y[4:])), ((x[4:], y[4:]), (x[:4], y[:4]))):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    l2w_half_step(model, wnet, opt, mopt, train=train, meta=meta, cfg=cfg)
        runs.append(copy.deepcopy(model.state_dict()) | {f"wnet.{k}": v for k, v in wnet.state_dict().items()})
    for name in runs[0]:
        torch.testing.assert_close(runs[0][name], runs[1][name], rtol=0, atol=0, msg=name)
