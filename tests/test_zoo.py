"""RANet, vit_exits and cnn_exits: reference FLOPs, forward-mode AD, options, genericity."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch.func import functional_call, jvp
from torch.utils.flop_counter import FlopCounterMode

from l2w_dist.models import create_model
from l2w_dist.models.cnn_exits import CNNExits
from l2w_dist.models.ranet import RANet, count_exit_ops_official
from l2w_dist.models.vit_exits import ViTExits, default_exit_blocks

# Per-exit cumulative ops of the released RANet (github.com/yangle15/RANet-pytorch,
# models/RANet.py) in the configurations of train_cifar.sh / train_imagenet.sh, measured
# with the released op_counter.py rule (conv/linear multiply-adds + ReLU, pooling and
# linear-bias element ops) on the released model code, batch 1 (see docs/models_zoo.md).
RANET_REFERENCE = {
    "ranet_cifar": [15826020, 31306440, 44690220, 50404752, 60712628, 63717656, 90255228, 94997472],
    "ranet_imagenet": [
        168066600,
        520465424,
        731890809,
        903794197,
        1052251864,
        1118803728,
        1589013903,
        1680979979,
    ],
}

TINY_VIT = dict(backbone="vit_tiny_patch16_224", img_size=32, patch_size=8, depth=4, embed_dim=48, num_heads=3)


def _flops(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Multiply-adds of one forward (FlopCounterMode counts 2 per multiply-add)."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    return counter.get_total_flops() / 2


def _jvp_matches_reverse_mode(model: torch.nn.Module, x: torch.Tensor) -> None:
    """In train mode, the JVP of the summed exit logits along a random direction of all
    parameters equals the reverse-mode directional derivative (what the L2W step relies on)."""
    model.train()
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    tangent = {k: torch.randn_like(v) for k, v in params.items()}

    def f(p):
        state = {**p, **{k: v.clone() for k, v in buffers.items()}}  # BN stats: fresh scratch copies
        return torch.stack([out.sum() for out in functional_call(model, state, (x,))])

    _, forward_mode = jvp(f, (params,), (tangent,))
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    outs = f(leaves)
    for k in range(outs.numel()):
        grads = torch.autograd.grad(outs[k], list(leaves.values()), retain_graph=True, allow_unused=True)
        reverse = sum((g * tangent[n]).sum() for g, n in zip(grads, leaves) if g is not None)
        torch.testing.assert_close(forward_mode[k], reverse, rtol=1e-6, atol=1e-8)


# ---------------------------------------------------------------------------- RANet


@pytest.mark.parametrize("name", ["ranet_cifar", "ranet_imagenet"])
def test_ranet_flops_match_released_counter(name):
    model = create_model(name)
    ref = RANET_REFERENCE[name]
    assert model.num_exits == len(ref) == 8
    assert model.exit_flops_official == pytest.approx(ref, rel=1e-9)
    # exit_flops (multiply-adds, or the op_counter rule where base supports it): within 1 %.
    assert model.exit_flops == pytest.approx(ref, rel=0.01)


def test_ranet_cifar_structure():
    model = create_model("ranet_cifar")
    assert model.input_size == (3, 32, 32) and model.num_classes == 100
    assert sum(p.numel() for p in model.parameters()) == 3354710  # the released model's count
    assert [len(flow) for flow in model.flows] == [2, 4, 6, 8]
    assert [sum(e) for e in model._exit_after] == [2, 2, 2, 2]


def test_ranet_jvp_in_train_mode():
    torch.manual_seed(0)
    model = create_model("ranet_cifar", num_classes=10, n_channels=8, growth_rate=4).double()
    _jvp_matches_reverse_mode(model, torch.randn(4, 3, 32, 32, dtype=torch.float64))


def test_ranet_options():
    lg = create_model("ranet_cifar", step=2, step_mode="lg", scale_list="1-2-3", gr_factor="4-2-1", bn_factor="4-2-1")
    assert lg.num_exits == 6
    assert len(lg(torch.randn(2, 3, 32, 32))) == 6
    with pytest.raises(ValueError, match="even"):
        create_model("ranet_cifar", step_mode="linear")
    with pytest.raises(ValueError, match="one entry per scale"):
        create_model("ranet_cifar", gr_factor=(4, 2, 1))
    with pytest.raises(ValueError, match="gr_factor"):
        create_model("ranet_cifar", gr_factor="4-x-1-1")


def test_official_counter_rule_counts_relu_and_pool():
    """The op_counter rule = multiply-adds + ReLU/pool/bias element ops, checked on a tiny net."""
    net = RANet(
        num_classes=10,
        input_size=(3, 8, 8),
        imagenet_stem=False,
        n_blocks=1,
        block_step=1,
        step=1,
        scale_list=(1,),
        gr_factor=(1,),
        bn_factor=(1,),
        n_channels=4,
        growth_rate=2,
        head_channels=4,
    )
    ops = count_exit_ops_official(net, net.input_size)
    # stem conv 3->4 (3x3, 8x8) + ReLU; layer: 1x1 4->2, ReLU, 3x3 2->2, ReLU (8x8);
    # head: 3x3 6->4 (4x4), ReLU, 3x3 4->4 (2x2), ReLU, avgpool 2x2, linear 4->10 + bias.
    expected = (
        4 * 3 * 9 * 64
        + 4 * 64
        + 4 * 2 * 64
        + 2 * 64
        + 2 * 2 * 9 * 64
        + 2 * 64
        + 6 * 4 * 9 * 16
        + 4 * 16
        + 4 * 4 * 9 * 4
        + 4 * 4
        + 4 * 4
        + 40
        + 10
    )
    assert ops == [expected]


# ------------------------------------------------------------------------ vit_exits


def test_default_exit_blocks():
    assert default_exit_blocks(12) == [3, 6, 9, 12]
    assert default_exit_blocks(6) == [2, 3, 5, 6]
    assert default_exit_blocks(2) == [1, 2]


def test_deit_small_default_exits():
    model = create_model("vit_exits")  # deit_small_patch16_224, random weights
    assert model.exit_blocks == [3, 6, 9, 12] and model.num_exits == 4
    assert model.input_size == (3, 224, 224)
    assert not model.fused_attn
    assert all(not m.fused_attn for m in model.modules() if hasattr(m, "fused_attn") and m is not model)


def test_vit_exits_shapes_and_fused_switch():
    model = create_model("vit_exits", num_classes=7, **TINY_VIT).eval()
    attn = [m for m in model.backbone.modules() if hasattr(m, "fused_attn")]
    assert len(attn) == 4 and not any(m.fused_attn for m in attn)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        plain = model(x)
        model.set_fused_attn(True)
        assert all(m.fused_attn for m in attn)
        fused = model(x)
    assert [tuple(o.shape) for o in plain] == [(3, 7)] * 4
    for a, b in zip(plain, fused):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_vit_exits_jvp_with_fused_attention_off():
    torch.manual_seed(0)
    model = create_model("vit_exits", num_classes=5, exit_blocks=[2, 4], **TINY_VIT).double()
    _jvp_matches_reverse_mode(model, torch.randn(2, 3, 32, 32, dtype=torch.float64))


def test_vit_exits_without_class_token_pools_tokens():
    model = create_model("vit_exits", num_classes=5, class_token=False, global_pool="avg", **TINY_VIT)
    assert not model.use_class_token
    out = model(torch.randn(2, 3, 32, 32))
    assert len(out) == 4 and out[0].shape == (2, 5)


def test_vit_last_exit_is_the_timm_model():
    """With the backbone's norm and head carried over, the last exit computes timm's logits."""
    torch.manual_seed(0)
    kwargs = {k: v for k, v in TINY_VIT.items() if k != "backbone"}
    ref = timm.create_model("vit_tiny_patch16_224", num_classes=6, **kwargs).eval()
    with torch.no_grad():
        torch.nn.init.normal_(ref.norm.weight)  # make the carried-over norm non-trivial
    model = ViTExits(copy.deepcopy(ref), exit_blocks=[1, 4], num_classes=6).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[-1], ref(x))
    # FLOPs: the full timm forward plus the earlier exit's linear head.
    assert model.exit_flops[-1] == pytest.approx(_flops(ref, x[:1]) + 48 * 6)


def test_vit_exits_bad_options():
    with pytest.raises(ValueError, match="1..4"):
        create_model("vit_exits", exit_blocks=[2, 5], **TINY_VIT)
    with pytest.raises(ValueError, match="unknown timm backbone"):
        create_model("vit_exits", backbone="not_a_vit")


# ------------------------------------------------------------------------ cnn_exits


def test_cnn_exits_resnet18_flops_follow_the_backbone():
    model = create_model("cnn_exits", backbone="resnet18", num_classes=10, img_size=64)
    assert model.num_exits == 4 and model.input_size == (3, 64, 64)
    channels = [h.linear.in_features for h in model.exit_heads]
    assert channels == [64, 128, 256, 512]
    ref = timm.create_model("resnet18", num_classes=10).eval()
    full = _flops(ref, torch.zeros(1, 3, 64, 64))  # backbone + fc(512 -> 10)
    assert model.exit_flops[-1] == pytest.approx(full + sum(c * 10 for c in channels[:-1]))
    # Exits run as the backbone runs: the first exit costs a fraction of the whole.
    assert model.exit_flops[0] < 0.5 * model.exit_flops[-1]


@pytest.mark.parametrize("backbone", ["efficientnet_b0", "convnext_atto"])
def test_cnn_exits_other_families(backbone):
    model = create_model("cnn_exits", backbone=backbone, num_classes=3, img_size=64).train()
    out = model(torch.randn(2, 3, 64, 64))
    assert len(out) == model.num_exits == 4
    assert all(o.shape == (2, 3) for o in out)
    sum(o.sum() for o in out).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_cnn_exits_chosen_stages_and_errors():
    model = create_model("cnn_exits", backbone="resnet18", exit_stages=[2, 4], num_classes=4, img_size=64)
    assert isinstance(model, CNNExits) and model.num_exits == 2
    assert [h.linear.in_features for h in model.exit_heads] == [128, 512]
    with pytest.raises(ValueError, match="0..4"):
        create_model("cnn_exits", backbone="resnet18", exit_stages=[1, 7])
    with pytest.raises(ValueError, match="unknown timm backbone"):
        create_model("cnn_exits", backbone="resnet_does_not_exist")


def test_cnn_exits_jvp_in_train_mode():
    torch.manual_seed(0)
    model = create_model("cnn_exits", backbone="resnet18", num_classes=3, img_size=32).double()
    _jvp_matches_reverse_mode(model, torch.randn(4, 3, 32, 32, dtype=torch.float64))


@pytest.mark.parametrize("backbone", ["vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_vit_exits_every_parameter_feeds_an_exit(backbone):
    options = {**TINY_VIT, "backbone": backbone}
    model = create_model("vit_exits", num_classes=4, exit_blocks=[1, 3], **options).train()
    assert len(model.backbone.blocks) == 3  # blocks after the last exit are dropped
    sum(o.sum() for o in model(torch.randn(2, 3, 32, 32))).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_cnn_exits_deepcopy_keeps_its_own_heads():
    """Exit heads run from forward hooks; a deep copy (EMA, checkpoints) must call its own."""
    model = create_model("cnn_exits", backbone="resnet18", num_classes=3, img_size=32).eval()
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for p in clone.exit_heads.parameters():
            p.add_(1.0)
        x = torch.randn(2, 3, 32, 32)
        original, copied = model(x), clone(x)
    assert all(not torch.allclose(a, b) for a, b in zip(original, copied))
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(original, model(x)))
