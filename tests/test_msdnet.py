"""MSDNet: the published network (shapes, FLOPs, released parameter names) and the
properties the L2W step relies on (backward, functional_call, forward-mode AD)."""

import functools
import json
from pathlib import Path

import pytest
import torch
from torch.func import functional_call, jvp, vjp

from l2w_dist.models import create_model, list_models
from l2w_dist.models.msdnet import MSDNet, load_official_state_dict

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "msdnet_official_keys.json").read_text())

# Per-exit cumulative MFLOPs of the official op_counter (the published figures).
REFERENCE_MFLOPS = {
    ("msdnet_imagenet", 4): [339.9, 685.5, 1008.2, 1254.5, 1360.5],
    ("msdnet_imagenet", 6): [339.9, 924.2, 1517.4, 1991.6, 2194.4],
    ("msdnet_imagenet", 7): [339.9, 1058.3, 1811.9, 2422.2, 2684.4],
    ("msdnet_cifar", None): [6.9, 14.4, 27.5, 41.7, 58.5],
}


def _from_fixture_config(cfg: dict) -> MSDNet:
    """The model for one fixture configuration, written with the official argument names."""
    return MSDNet(
        num_blocks=cfg["nBlocks"],
        step_mode=cfg["stepmode"],
        step=cfg["step"],
        base=cfg["base"],
        channels=cfg["nChannels"],
        growth_rate=cfg["growthRate"],
        growth_factor=cfg["grFactor"],
        bottleneck_factor=cfg["bnFactor"],
        data=cfg["data"],
        num_classes=cfg["num_classes"],
    )


def _create(name: str, step: int | None) -> MSDNet:
    return create_model(name) if step is None else create_model(name, step=step)


@functools.cache
def _preset(name: str, step: int | None) -> MSDNet:
    """One shared instance per preset (the ImageNet ones are big for 2 CPU cores); tests
    may load weights into it but must not change its structure."""
    return _create(name, step)


def test_registered():
    assert {"msdnet_cifar", "msdnet_imagenet"} <= set(list_models())


def test_cifar_outputs_and_backward():
    model = create_model("msdnet_cifar").train()
    assert model.num_exits == 5 and model.num_classes == 100 and len(model.exit_heads) == 5
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 100, (4,))
    logits = model(x)
    assert isinstance(logits, list) and len(logits) == 5
    assert all(t.shape == (4, 100) for t in logits)
    sum(torch.nn.functional.cross_entropy(t, y) for t in logits).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, f"parameters without a finite gradient: {no_grad[:5]}"


def test_imagenet_outputs():
    model = _preset("msdnet_imagenet", 4).eval()
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 224, 224))
    assert [tuple(t.shape) for t in logits] == [(1, 1000)] * 5


@pytest.mark.parametrize("name,step", list(REFERENCE_MFLOPS))
def test_exit_flops_match_reference(name, step):
    flops = [f / 1e6 for f in _preset(name, step).exit_flops]
    ref = REFERENCE_MFLOPS[(name, step)]
    assert len(flops) == len(ref)
    for k, (got, want) in enumerate(zip(flops, ref)):
        assert abs(got - want) / want < 0.01, f"exit {k + 1}: {got:.2f} MFLOPs vs reference {want}"
    assert flops == sorted(flops)


def test_param_count_matches_official_log():
    # kalviny/MSDNet-PyTorch check_msdnet/log.txt prints "# of params: 4839544" for this network
    model = _from_fixture_config(FIXTURE["configs"]["cifar10_official_log"])
    assert sum(p.numel() for p in model.parameters()) == 4_839_544


def test_seeded_determinism():
    x = torch.randn(2, 3, 32, 32)
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        model = create_model("msdnet_cifar", num_blocks=2).eval()
        with torch.no_grad():
            outs.append(model(x))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("config", sorted(FIXTURE["configs"]))
def test_state_dict_names_and_shapes_are_the_released_ones(config):
    model = _from_fixture_config(FIXTURE["configs"][config])
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    released = FIXTURE["keys"][config]
    assert sorted(set(ours) ^ set(released)) == []
    assert {k: s for k, s in ours.items() if released[k] != s} == {}


def _random_release(config: str, prefix: str = "module.") -> dict:
    """A checkpoint as the official scripts save it: {"state_dict": {module.<name>: tensor}}."""
    g = torch.Generator().manual_seed(7)
    sd = {}
    for name, shape in FIXTURE["keys"][config].items():
        if name.endswith("num_batches_tracked"):
            sd[prefix + name] = torch.tensor(11)
        elif name.endswith("running_var"):
            sd[prefix + name] = torch.rand(shape, generator=g) + 0.5
        else:
            sd[prefix + name] = torch.randn(shape, generator=g) * 0.1
    return {"state_dict": sd, "epoch": 90}


@pytest.mark.parametrize(
    "name,step,config",
    [
        ("msdnet_cifar", None, "cifar100"),
        ("msdnet_imagenet", 4, "imagenet_step4"),
        ("msdnet_imagenet", 7, "imagenet_step7"),
    ],
)
def test_load_official_checkpoint(name, step, config):
    ckpt = _random_release(config)
    model = _preset(name, step)
    load_official_state_dict(model, ckpt)
    ours = model.state_dict()
    for key, value in ckpt["state_dict"].items():
        assert torch.equal(ours[key[len("module.") :]], value), key


def test_loaded_model_computes_the_same_function():
    src = create_model("msdnet_cifar", num_blocks=3).eval()
    dst = create_model("msdnet_cifar", num_blocks=3).eval()
    load_official_state_dict(dst, {"module." + k: v for k, v in src.state_dict().items()})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(src(x), dst(x)):
            assert torch.equal(a, b)


def test_load_without_prefix_and_without_num_batches_tracked():
    sd = {
        k[len("module.") :]: v
        for k, v in _random_release("cifar100")["state_dict"].items()
        if not k.endswith("num_batches_tracked")
    }
    model = create_model("msdnet_cifar")
    load_official_state_dict(model, sd)
    assert torch.equal(model.state_dict()["classifier.4.linear.bias"], sd["classifier.4.linear.bias"])


def test_load_errors_name_the_bad_keys():
    model = create_model("msdnet_cifar")
    sd = _random_release("cifar100")["state_dict"]
    missing = dict(sd)
    del missing["module.classifier.2.linear.weight"]
    with pytest.raises(ValueError, match=r"1 missing keys: classifier\.2\.linear\.weight"):
        load_official_state_dict(model, missing)
    extra = dict(sd, **{"module.classifier.5.linear.bias": torch.zeros(100)})
    with pytest.raises(ValueError, match=r"unexpected keys: classifier\.5\.linear\.bias"):
        load_official_state_dict(model, extra)
    # a CIFAR-10 head in a CIFAR-100 model
    wrong = dict(sd, **{"module.classifier.0.linear.bias": torch.zeros(10)})
    shape_msg = r"classifier\.0\.linear\.bias: checkpoint \(10,\) vs model \(100,\)"
    with pytest.raises(ValueError, match=shape_msg):
        load_official_state_dict(model, wrong)
    # an ImageNet checkpoint into the CIFAR model: many mismatches, reported, nothing loaded
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="missing keys"):
        load_official_state_dict(model, _random_release("imagenet_step4"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "options,match",
    [
        (dict(step=5), r"step=5 .*allowed values: \[4, 6, 7\]"),
        (dict(step_mode="foo"), r"step_mode='foo' .*allowed values: \['even', 'lin_grow'\]"),
        (dict(prune="none"), r"prune='none' .*allowed values: \['min', 'max'\]"),
        (dict(growth_factor=(1, 2)), r"one growth_factor and one bottleneck_factor per scale"),
        (dict(num_blocks=0), r"num_blocks=0 must be a positive integer"),
        (dict(nBlocks=5), r"unknown option\(s\) \['nBlocks'\].*allowed options: step, num_classes, num_blocks"),
    ],
)
def test_bad_options_name_allowed_values(options, match):
    with pytest.raises(ValueError, match=match):
        create_model("msdnet_imagenet", **options)


@pytest.mark.parametrize(
    "options",
    [
        dict(prune="min"),
        dict(bottleneck=False),
        dict(reduction=0.0, num_blocks=3),
        dict(num_blocks=7, step_mode="even", step=2, base=4),  # the README's anytime CIFAR network
    ],
)
def test_other_knobs_build_and_run(options):
    model = create_model("msdnet_cifar", num_classes=10, **options).eval()
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 32, 32))
    assert len(logits) == model.num_exits == len(model.exit_flops)
    assert all(t.shape == (1, 10) for t in logits)


def test_functional_call_and_jvp_in_train_mode():
    """The L2W forward-mode hypergradient: one JVP of the training forward (BatchNorm in
    batch-statistics mode) along a parameter tangent. Checked exactly against reverse mode
    through the adjoint identity <c, J v> = <J^T c, v> (a finite difference is too coarse
    a check through batch-of-3 BatchNorm and ReLU kinks)."""
    model = create_model("msdnet_cifar", num_blocks=2, num_classes=10).double().train()
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    tangent = {k: torch.randn_like(v) for k, v in params.items()}

    def f(p):
        # scratch copies made inside the transform: BatchNorm may update them in place,
        # the model's running statistics stay untouched
        scratch = {k: v.clone() for k, v in buffers.items()}
        return tuple(functional_call(model, (p, scratch), (x,)))

    running_before = buffers["blocks.0.0.layers.0.net.1.running_mean"].clone()
    outs, touts = jvp(f, (params,), (tangent,))
    assert len(touts) == 2 and all(t.shape == (3, 10) and torch.isfinite(t).all() for t in touts)
    assert torch.equal(buffers["blocks.0.0.layers.0.net.1.running_mean"], running_before)
    cotangent = tuple(torch.randn_like(o) for o in outs)
    _, pullback = vjp(f, params)
    (grads,) = pullback(cotangent)
    forward = sum((c * t).sum() for c, t in zip(cotangent, touts))
    reverse = sum((grads[k] * tangent[k]).sum() for k in params)
    torch.testing.assert_close(forward, reverse, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    "path,name,step",
    [
        ("configs/cifar100/msdnet.yaml", "msdnet_cifar", None),
        ("configs/imagenet/msdnet_step4.yaml", "msdnet_imagenet", 4),
        ("configs/imagenet/msdnet_step6.yaml", "msdnet_imagenet", 6),
        ("configs/imagenet/msdnet_step7.yaml", "msdnet_imagenet", 7),
    ],
)
def test_config_model_sections(path, name, step):
    import yaml

    section = yaml.safe_load((Path(__file__).parents[1] / path).read_text())["model"]
    expected_options = {"num_classes": 100} if step is None else {"step": step}
    assert section == {"name": name, "options": expected_options}
    model = create_model(section["name"], **section["options"], num_blocks=1)  # cheap: options apply
    assert model.options["step"] == (step or 1)
    assert model.options["num_classes"] == (100 if step is None else 1000)
    assert model.options["data"] == ("cifar" if step is None else "imagenet")
