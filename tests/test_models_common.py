"""Contract tests every registered model must pass (picked up through ``list_models()``).

A model added to the registry is tested here automatically, at its default options
unless ``SMALL_OPTIONS`` names smaller ones that keep CPU runtime low.
"""

from __future__ import annotations

import math

import pytest
import torch

from l2w_dist.models import create_model, list_models

# Options that shrink models whose defaults are too large for a quick CPU test.
SMALL_OPTIONS: dict[str, dict] = {
    "vit_exits": dict(backbone="vit_tiny_patch16_224", img_size=32, patch_size=8, depth=4, embed_dim=48, num_heads=3),
    "cnn_exits": dict(backbone="resnet18", img_size=64),
}
BATCH = 2


def _build(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return create_model(name, **SMALL_OPTIONS.get(name, {}))


def test_registry_is_populated():
    names = list_models()
    for expected in ("ranet_cifar", "ranet_imagenet", "vit_exits", "cnn_exits"):
        assert expected in names


@pytest.mark.parametrize("name", list_models())
def test_forward_shapes_and_backward(name):
    model = _build(name).train()
    assert model.num_exits == len(model.exit_heads) >= 1
    x = torch.randn(BATCH, *model.input_size)
    logits = model(x)
    assert isinstance(logits, list) and len(logits) == model.num_exits
    for out in logits:
        assert out.shape == (BATCH, model.num_classes)
        assert torch.isfinite(out).all()
    loss = sum(torch.nn.functional.cross_entropy(out, torch.zeros(BATCH, dtype=torch.long)) for out in logits)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient (unused by every exit): {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", list_models())
def test_seeded_determinism(name):
    a, b = _build(name, seed=3).eval(), _build(name, seed=3).eval()
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    torch.manual_seed(1)
    x = torch.randn(1, *a.input_size)
    with torch.no_grad():
        assert all(torch.equal(p, q) for p, q in zip(a(x), b(x)))
    c = _build(name, seed=4)
    assert any(not torch.equal(sa[k], v) for k, v in c.state_dict().items() if v.is_floating_point())


@pytest.mark.parametrize("name", list_models())
def test_exit_flops_positive_and_increasing(name):
    model = _build(name)
    flops = model.exit_flops
    assert len(flops) == model.num_exits
    assert all(math.isfinite(f) and f > 0 for f in flops)
    assert all(later > earlier for earlier, later in zip(flops, flops[1:]))


def test_unknown_model_name_lists_available():
    with pytest.raises(ValueError) as err:
        create_model("no_such_model")
    for name in list_models():
        assert name in str(err.value)


@pytest.mark.parametrize("name", list_models())
def test_unknown_option_is_a_clear_error(name):
    with pytest.raises(ValueError) as err:
        create_model(name, not_an_option_xyz=1, **SMALL_OPTIONS.get(name, {}))
    message = str(err.value)
    assert "not_an_option_xyz" in message
    assert "num_classes" in message  # names the options the builder does accept
