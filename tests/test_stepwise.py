"""The stepwise forward of every model family: stage k on the samples still active, the
leaving ones dropped from the carried state, computes the full forward's logits.

Tolerance: float32, ``|stepwise - full| <= 1e-5 * max |full logit of that exit|`` (a
compacted batch may take another convolution algorithm, so equality to the last bit is not
promised; the differences seen are a few 1e-7 of the logits' scale).
"""

from __future__ import annotations

import pytest
import torch

from l2w_dist.models import create_model
from l2w_dist.models.base import StageState

TINY_VIT = dict(backbone="vit_tiny_patch16_224", img_size=32, patch_size=8, depth=4, embed_dim=48, num_heads=3)

FAMILIES = {
    "msdnet": lambda: create_model("msdnet_cifar", num_classes=5, num_blocks=3, channels=4, growth_rate=2),
    # prune="min" keeps every scale up to the last layers: transitions at 1/3 and 2/3 depth
    "msdnet_min": lambda: create_model(
        "msdnet_cifar", num_classes=5, num_blocks=3, channels=4, growth_rate=2, prune="min"
    ),
    # 4 flows (two of the same resolution): exits in every flow, cross-links between flows
    "ranet": lambda: create_model("ranet_cifar", num_classes=5, n_channels=8, growth_rate=4, step=2),
    "vit_exits": lambda: create_model("vit_exits", num_classes=5, exit_blocks=[1, 3, 4], **TINY_VIT),
    "cnn_exits": lambda: create_model("cnn_exits", backbone="resnet18", num_classes=5, img_size=32),
}


def stepwise(model, x: torch.Tensor, keep_masks: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Run the stages; after stage k keep only ``keep_masks[k]`` of the samples still active.
    Returns, per stage, (original indices of the samples it ran on, its logits)."""
    state = model.begin(x)
    active = torch.arange(x.shape[0])
    out = []
    for k in range(model.stages()):
        logits, state = model.step(k, state)
        out.append((active, logits))
        if k < model.stages() - 1:
            keep = keep_masks[k][active]
            active = active[keep]
            state = state.select(keep)
    return out


def assert_close_scaled(got: torch.Tensor, want: torch.Tensor, scale_of: torch.Tensor, what: str) -> None:
    assert got.shape == want.shape, what
    tol = 1e-5 * scale_of.abs().max().item()
    torch.testing.assert_close(got, want, atol=tol, rtol=0, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_stepwise_equals_full_forward(family):
    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    x = torch.randn(8, *model.input_size)
    with torch.no_grad():
        full = model(x)
        # random departures; a sample is never re-admitted, so combine masks cumulatively
        g = torch.Generator().manual_seed(1)
        masks = [torch.rand(8, generator=g) > 0.3 for _ in range(model.stages())]
        runs = stepwise(model, x, masks)
        nobody = stepwise(model, x, [torch.ones(8, dtype=torch.bool)] * model.stages())
    assert len(full) == len(runs) == model.num_exits
    ran = [len(idx) for idx, _ in runs]
    assert ran[0] == 8 and ran[-1] < 8, f"the masks must drop samples: {ran}"
    for k, (idx, logits) in enumerate(runs):
        assert_close_scaled(logits, full[k][idx], full[k], f"exit {k}")
    for k, (idx, logits) in enumerate(nobody):
        assert idx.tolist() == list(range(8))
        assert_close_scaled(logits, full[k], full[k], f"exit {k}, nobody leaves")


def test_stage_state_select_drops_samples_from_every_tensor():
    state = StageState({"a": [torch.arange(4.0), torch.ones(4, 2)], "b": (torch.arange(4)[:, None],)})
    kept = state.select(torch.tensor([True, False, True, False]))
    assert kept.batch_size == 2
    assert kept.tensors["a"][0].tolist() == [0.0, 2.0] and kept.tensors["b"][0].squeeze(1).tolist() == [0, 2]
    assert kept.tensors["a"][1].shape == (2, 2)
    assert state.select(torch.tensor([3])).tensors["a"][0].tolist() == [3.0]


def test_stepwise_runs_the_input_pre_hooks():
    """The uint8 normaliser (data.normalize_on=device) is a forward pre-hook: begin() applies it too."""
    from l2w_dist.data.transforms import attach_input_normalizer

    model = FAMILIES["msdnet"]().eval()
    attach_input_normalizer(model, "cifar")
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        full = model(x)
        logits, _ = model.step(0, model.begin(x))
    assert_close_scaled(logits, full[0], full[0], "exit 0 on uint8 input")


def test_cnn_exits_without_sequential_stages_says_why():
    model = create_model("cnn_exits", backbone="efficientnet_b0", num_classes=3, img_size=32).eval()
    assert len(model(torch.randn(1, 3, 32, 32))) == 4  # trains and evaluates as before
    with pytest.raises(NotImplementedError, match="EfficientNetFeatures"):
        model.begin(torch.randn(1, 3, 32, 32))
