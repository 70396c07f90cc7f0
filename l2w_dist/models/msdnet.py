"""MSDNet (Huang et al., "Multi-Scale Dense Networks for Resource Efficient Image
Classification", ICLR 2018) as a :class:`MultiExitModel`.

The network is the one built by the official MSDNet-PyTorch code (kalviny/MSDNet-PyTorch,
also used unchanged by L2W-DEN): the same layers in the same order, the same channel
arithmetic, and the same module attribute names, so that ``state_dict()`` keys are the
released keys (``blocks.0.0.layers.0.net.0.weight``, ``classifier.3.linear.bias``, ...)
and released checkpoints load by stripping a ``module.`` prefix
(:func:`load_official_state_dict`).

Structure, in words (the official argument names in brackets):

* ``num_blocks`` [nBlocks] blocks, one exit after each. Block i has ``steps[i]`` MSDNet
  layers: ``steps[0] = base``; then ``step`` each (``step_mode="even"``) or
  ``step * i + 1`` (``"lin_grow"``).
* ``num_scales`` [nScales] resolutions. Scale s carries ``c * growth_factor[s]`` channels
  when the finest carries ``c``. The first layer makes every scale from the image (CIFAR:
  3x3 conv; ImageNet: 7x7/2 conv with bias + 3x3/2 max-pool), each coarser scale by a
  3x3/2 conv of the finer one.
* An MSDNet layer adds ``growth_rate * growth_factor[s]`` channels to scale s: half from a
  strided conv of scale s-1, half from a conv of scale s (all of it at the finest kept
  scale), each optionally behind a 1x1 bottleneck of width
  ``min(c_in, bottleneck_factor[s] * c_out)``; outputs are concatenated to the input
  (dense connectivity).
* Pruning (``prune="max"``) drops the finest scale after every
  ``ceil(total_layers / num_scales)`` layers; the layer where a scale is dropped is
  followed by a transition (1x1 conv per scale) that keeps ``floor(reduction * c)``
  channels. ``prune="min"`` keeps scales until the last layers and places transitions
  at 1/3 and 2/3 of the depth.
* Every exit classifies the coarsest scale: two 3x3/2 conv-BN-ReLU (128 channels on
  CIFAR, the input width on ImageNet), a 2x2 average pool and a linear layer.

Weight initialisation: the official code calls an initialiser on the *children* of each
block (MSDNet layers, never a ``Conv2d`` itself), so in effect it keeps PyTorch's default
initialisation. This module does the same, on purpose, to train the published network.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .base import MultiExitModel
from .layers import bottleneck_conv, conv_bn_relu, conv_pool_trunk, downsampling_stem
from .registry import register_model

__all__ = ["MSDNet", "load_official_state_dict", "msdnet_cifar", "msdnet_imagenet"]

STEP_MODES = ("even", "lin_grow")
PRUNE_MODES = ("min", "max")
DATA_KINDS = ("cifar", "imagenet")
IMAGENET_STEPS = (4, 6, 7)


# --------------------------------------------------------------------------------------
# Building blocks. Attribute names (net, layers, conv_down, conv_normal, m, linear) are the
# official ones: they are the parameter names of released checkpoints.
# --------------------------------------------------------------------------------------


class ConvBNReLU(nn.Module):
    """Conv (no bias) -> BatchNorm -> ReLU, held in ``self.net`` (official ``ConvBasic``)."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: int = 1, padding: int = 1):
        super().__init__()
        self.net = conv_bn_relu(c_in, c_out, kernel, stride, padding)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class DenseConv(nn.Module):
    """Optional 1x1 bottleneck, then a 3x3 conv (stride 1 or 2), each with BN-ReLU, held in
    ``self.net`` (official ``ConvBN``). The bottleneck width is ``min(c_in, bottleneck_factor * c_out)``."""

    def __init__(self, c_in: int, c_out: int, stride: int, bottleneck: bool, bottleneck_factor: int):
        super().__init__()
        self.net = bottleneck_conv(c_in, c_out, stride, bottleneck_factor, bottleneck=bottleneck)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class SameScaleUnit(nn.Module):
    """Finest kept scale: ``cat(x, conv(x))`` (official ``ConvNormal``)."""

    def __init__(self, c_in: int, c_out: int, bottleneck: bool, bottleneck_factor: int):
        super().__init__()
        self.conv_normal = DenseConv(c_in, c_out, 1, bottleneck, bottleneck_factor)

    def forward(self, inputs: list[Tensor]) -> Tensor:
        (x,) = inputs
        return torch.cat([x, self.conv_normal(x)], dim=1)


class CrossScaleUnit(nn.Module):
    """Coarser scale: ``cat(x, strided_conv(finer), conv(x))``, each conv producing half of
    the new channels (official ``ConvDownNormal``)."""

    def __init__(self, c_in_finer: int, c_in: int, c_out: int, bottleneck: bool, bn_finer: int, bn_same: int):
        super().__init__()
        self.conv_down = DenseConv(c_in_finer, c_out // 2, 2, bottleneck, bn_finer)
        self.conv_normal = DenseConv(c_in, c_out // 2, 1, bottleneck, bn_same)

    def forward(self, inputs: list[Tensor]) -> Tensor:
        finer, x = inputs
        return torch.cat([x, self.conv_down(finer), self.conv_normal(x)], dim=1)


class FirstLayer(nn.Module):
    """Makes every scale from the image (official ``MSDNFirstLayer``); returns the list of
    scale tensors, finest first."""

    def __init__(self, channels: int, growth_factor: Sequence[int], data: str):
        super().__init__()
        self.layers = nn.ModuleList()
        c0 = channels * growth_factor[0]
        if data == "cifar":
            self.layers.append(ConvBNReLU(3, c0, kernel=3, stride=1, padding=1))
        else:
            self.layers.append(downsampling_stem(c0))
        c_prev = c0
        for factor in growth_factor[1:]:
            self.layers.append(ConvBNReLU(c_prev, channels * factor, kernel=3, stride=2, padding=1))
            c_prev = channels * factor

    def forward(self, x: Tensor) -> list[Tensor]:
        scales = []
        for layer in self.layers:
            x = layer(x)
            scales.append(x)
        return scales


class MSDLayer(nn.Module):
    """One MSDNet layer over the kept scales (official ``MSDNLayer``).

    ``in_scales``/``out_scales`` count the scales kept before/after this layer (coarsest
    ones); when a scale is dropped here, the new finest kept scale still takes the strided
    conv of the dropped one.
    """

    def __init__(
        self,
        c_in: int,
        growth: int,
        num_scales: int,
        in_scales: int,
        out_scales: int,
        growth_factor: Sequence[int],
        bottleneck: bool,
        bottleneck_factor: Sequence[int],
    ):
        super().__init__()
        self.in_scales, self.out_scales = in_scales, out_scales
        self.discard = in_scales - out_scales
        offset = num_scales - out_scales
        gf, bf = growth_factor, bottleneck_factor
        self.layers = nn.ModuleList()
        if self.discard > 0:
            self.layers.append(
                CrossScaleUnit(
                    c_in * gf[offset - 1],
                    c_in * gf[offset],
                    growth * gf[offset],
                    bottleneck,
                    bf[offset - 1],
                    bf[offset],
                )
            )
        else:
            self.layers.append(SameScaleUnit(c_in * gf[offset], growth * gf[offset], bottleneck, bf[offset]))
        for s in range(offset + 1, num_scales):
            self.layers.append(
                CrossScaleUnit(c_in * gf[s - 1], c_in * gf[s], growth * gf[s], bottleneck, bf[s - 1], bf[s])
            )

    def forward(self, scales: list[Tensor]) -> list[Tensor]:
        if self.discard > 0:  # the dropped finest input only feeds the strided conv
            pairs = [[scales[i - 1], scales[i]] for i in range(1, self.out_scales + 1)]
        else:
            pairs = [[scales[0]]] + [[scales[i - 1], scales[i]] for i in range(1, self.out_scales)]
        return [unit(pair) for unit, pair in zip(self.layers, pairs)]


class PerScale(nn.Module):
    """Applies one module per scale (official ``ParallelModule``; used for transitions)."""

    def __init__(self, modules: Sequence[nn.Module]):
        super().__init__()
        self.m = nn.ModuleList(modules)

    def forward(self, scales: list[Tensor]) -> list[Tensor]:
        return [mod(x) for mod, x in zip(self.m, scales)]


class ExitHead(nn.Module):
    """Classifier on the coarsest scale (official ``ClassifierModule``)."""

    def __init__(self, features: nn.Module, channels: int, num_classes: int):
        super().__init__()
        self.m = features
        self.linear = nn.Linear(channels, num_classes)

    def forward(self, scales: list[Tensor]) -> Tensor:
        h = self.m(scales[-1])
        return self.linear(h.view(h.size(0), -1))


# --------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------


def _check_choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise ValueError(f"MSDNet option {name}={value!r} is not allowed; allowed values: {list(allowed)}")


def block_steps(num_blocks: int, step_mode: str, step: int, base: int) -> list[int]:
    """Layers per block: ``[base, step, step, ...]`` (even) or ``[base, step*1+1, step*2+1, ...]``."""
    _check_choice("step_mode", step_mode, STEP_MODES)
    return [base] + [step if step_mode == "even" else step * i + 1 for i in range(1, num_blocks)]


class MSDNet(MultiExitModel):
    """Multi-scale dense network; ``forward(x)`` returns one logit tensor per block.

    Every option of the official code is a keyword (official name in brackets):
    ``num_blocks`` [nBlocks], ``step_mode`` [stepmode: "even" | "lin_grow"], ``step``,
    ``base``, ``channels`` [nChannels], ``growth_rate`` [growthRate], ``growth_factor``
    [grFactor, one entry per scale], ``bottleneck_factor`` [bnFactor], ``bottleneck``,
    ``prune`` ["min" | "max"], ``reduction``, ``num_scales`` [nScales, defaults to
    ``len(growth_factor)`` as in the official code], ``data`` ["cifar" | "imagenet":
    stem, exit width, default input size]. ``input_size`` is only used to count FLOPs.

    ``exit_flops`` follows the official ``op_counter.py`` (conv and linear multiply-adds
    plus ReLU, pooling and linear-bias operations): that is how the published MSDNet and
    L2W-DEN FLOPs were counted. Pure multiply-adds are 0.3-1.6 % lower.
    """

    flop_convention = "op_counter"

    def __init__(
        self,
        num_blocks: int = 5,
        step_mode: str = "lin_grow",
        step: int = 1,
        base: int = 1,
        channels: int = 16,
        growth_rate: int = 6,
        growth_factor: Sequence[int] = (1, 2, 4),
        bottleneck_factor: Sequence[int] = (1, 2, 4),
        bottleneck: bool = True,
        prune: str = "max",
        reduction: float = 0.5,
        num_scales: int | None = None,
        data: str = "cifar",
        num_classes: int = 100,
        input_size: tuple[int, int, int] | None = None,
    ):
        super().__init__()
        _check_choice("step_mode", step_mode, STEP_MODES)
        _check_choice("prune", prune, PRUNE_MODES)
        _check_choice("data", data, DATA_KINDS)
        growth_factor, bottleneck_factor = tuple(growth_factor), tuple(bottleneck_factor)
        num_scales = len(growth_factor) if num_scales is None else num_scales
        if num_scales < 1 or len(growth_factor) != num_scales or len(bottleneck_factor) != num_scales:
            raise ValueError(
                "MSDNet needs one growth_factor and one bottleneck_factor per scale: "
                f"num_scales={num_scales}, "
                f"growth_factor={list(growth_factor)}, bottleneck_factor={list(bottleneck_factor)}"
            )
        positive = dict(
            num_blocks=num_blocks,
            step=step,
            base=base,
            channels=channels,
            growth_rate=growth_rate,
            num_classes=num_classes,
        )
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"MSDNet option {name}={value!r} must be a positive integer")
        if not 0 <= reduction <= 1:
            raise ValueError(f"MSDNet option reduction={reduction!r} must lie in [0, 1] (0 = no transitions)")

        self.num_exits = num_blocks
        self.num_classes = num_classes
        self.input_size = input_size or ((3, 32, 32) if data == "cifar" else (3, 224, 224))
        self.options = dict(
            num_blocks=num_blocks,
            step_mode=step_mode,
            step=step,
            base=base,
            channels=channels,
            growth_rate=growth_rate,
            growth_factor=growth_factor,
            bottleneck_factor=bottleneck_factor,
            bottleneck=bottleneck,
            prune=prune,
            reduction=reduction,
            num_scales=num_scales,
            data=data,
            num_classes=num_classes,
        )
        self.steps = block_steps(num_blocks, step_mode, step, base)
        total_layers = sum(self.steps)

        self.blocks = nn.ModuleList()
        self.classifier = nn.ModuleList()
        c = channels
        done = 0  # MSDNet layers built so far
        for block_index, n_layers in enumerate(self.steps):
            layers: list[nn.Module] = []
            if block_index == 0:
                layers.append(FirstLayer(channels, growth_factor, data))
            for _ in range(n_layers):
                done += 1
                in_scales, out_scales = self._kept_scales(prune, num_scales, total_layers, done)
                layers.append(
                    MSDLayer(
                        c, growth_rate, num_scales, in_scales, out_scales, growth_factor, bottleneck, bottleneck_factor
                    )
                )
                c += growth_rate
                if reduction > 0 and self._transition_here(prune, in_scales, out_scales, total_layers, done):
                    offset = num_scales - out_scales
                    c_new = math.floor(reduction * c)
                    factors = growth_factor[offset:]
                    layers.append(PerScale([ConvBNReLU(c * f, c_new * f, 1, 1, 0) for f in factors]))
                    c = c_new
            self.blocks.append(nn.Sequential(*layers))
            self.classifier.append(self._exit_head(c * growth_factor[-1], num_classes, data))

    @property
    def exit_heads(self) -> nn.ModuleList:  # type: ignore[override]
        """The classifiers, in exit order (an alias: registering them twice would duplicate
        their keys in ``state_dict``)."""
        return self.classifier

    @staticmethod
    def _kept_scales(prune: str, num_scales: int, total_layers: int, n: int) -> tuple[int, int]:
        """Scales kept at the input and output of the n-th layer (1-based), coarsest ones."""
        if prune == "min":
            return min(num_scales, total_layers - n + 2), min(num_scales, total_layers - n + 1)
        interval = math.ceil(total_layers / num_scales)
        return num_scales - max(0, n - 2) // interval, num_scales - (n - 1) // interval

    @staticmethod
    def _transition_here(prune: str, in_scales: int, out_scales: int, total_layers: int, n: int) -> bool:
        if prune == "max":
            return in_scales > out_scales
        return n in (math.floor(total_layers / 3), math.floor(2 * total_layers / 3))

    @staticmethod
    def _exit_head(c_in: int, num_classes: int, data: str) -> ExitHead:
        width = 128 if data == "cifar" else c_in
        return ExitHead(conv_pool_trunk(c_in, width, conv=ConvBNReLU), width, num_classes)

    # Stepwise forward: stage k is block k and its classifier; the state is the list of
    # kept scale tensors (the image before block 0). ``forward`` is the base class's loop.
    def _begin(self, x: Tensor) -> Any:
        return x

    def _step(self, k: int, h: Any) -> tuple[Tensor, Any]:
        h = self.blocks[k](h)
        return self.classifier[k](h), h


# --------------------------------------------------------------------------------------
# Registered presets
# --------------------------------------------------------------------------------------


@register_model
def msdnet_cifar(
    num_classes: int = 100,
    num_blocks: int = 5,
    step_mode: str = "lin_grow",
    step: int = 1,
    base: int = 1,
    channels: int = 16,
    growth_rate: int = 6,
    growth_factor: Sequence[int] = (1, 2, 4),
    bottleneck_factor: Sequence[int] = (1, 2, 4),
    bottleneck: bool = True,
    prune: str = "max",
    reduction: float = 0.5,
    num_scales: int | None = None,
) -> MSDNet:
    """MSDNet on 32x32 images; defaults are the paper's CIFAR-100 budgeted-batch network
    (``--nBlocks 5 --stepmode lin_grow --step 1 --base 1 --nChannels 16``, growth 6,
    factors 1-2-4, bottleneck, prune max, reduction 0.5). The anytime CIFAR network of the
    official README is ``num_blocks=7, step_mode="even", step=2, base=4``."""
    return MSDNet(
        num_blocks=num_blocks,
        step_mode=step_mode,
        step=step,
        base=base,
        channels=channels,
        growth_rate=growth_rate,
        growth_factor=growth_factor,
        bottleneck_factor=bottleneck_factor,
        bottleneck=bottleneck,
        prune=prune,
        reduction=reduction,
        num_scales=num_scales,
        data="cifar",
        num_classes=num_classes,
    )


@register_model
def msdnet_imagenet(
    step: int = 4,
    num_classes: int = 1000,
    num_blocks: int = 5,
    step_mode: str = "even",
    base: int = 4,
    channels: int = 32,
    growth_rate: int = 16,
    growth_factor: Sequence[int] = (1, 2, 4, 4),
    bottleneck_factor: Sequence[int] = (1, 2, 4, 4),
    bottleneck: bool = True,
    prune: str = "max",
    reduction: float = 0.5,
    num_scales: int | None = None,
) -> MSDNet:
    """MSDNet on 224x224 images, 4 scales: the ImageNet networks of the MSDNet paper and of
    the L2W-DEN checkpoints (``--nBlocks 5 --stepmode even --step {4,6,7} --base 4
    --nChannels 32 --growthRate 16 --grFactor 1-2-4-4 --bnFactor 1-2-4-4``). ``step``
    picks the preset (4, 6 or 7); for other depths build :class:`MSDNet` directly."""
    _check_choice("step", step, IMAGENET_STEPS)
    return MSDNet(
        num_blocks=num_blocks,
        step_mode=step_mode,
        step=step,
        base=base,
        channels=channels,
        growth_rate=growth_rate,
        growth_factor=growth_factor,
        bottleneck_factor=bottleneck_factor,
        bottleneck=bottleneck,
        prune=prune,
        reduction=reduction,
        num_scales=num_scales,
        data="imagenet",
        num_classes=num_classes,
    )


# --------------------------------------------------------------------------------------
# Released checkpoints
# --------------------------------------------------------------------------------------


def _unwrap_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Tensor]:
    """Accept a raw state dict or a checkpoint holding one under ``state_dict``/``model``;
    strip a ``module.`` prefix (DataParallel / DDP) from every key that has it."""
    for key in ("state_dict", "model"):
        inner = state_dict.get(key) if isinstance(state_dict, Mapping) else None
        if isinstance(inner, Mapping):
            state_dict = inner
            break
    if not isinstance(state_dict, Mapping):
        kind = type(state_dict).__name__
        raise TypeError(f"expected a state dict (a mapping of names to tensors), got {kind}")
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in state_dict.items()}


def load_official_state_dict(model: MSDNet, state_dict: Mapping[str, Any]) -> None:
    """Load a checkpoint released with MSDNet-PyTorch or L2W-DEN into ``model``, strictly.

    ``state_dict`` may be the raw state dict, or the saved checkpoint dict that holds it
    under ``"state_dict"`` (both official repos save ``{"state_dict": ..., "epoch": ...}``);
    keys may carry the ``module.`` prefix of (Distributed)DataParallel. The parameter names
    of :class:`MSDNet` are the official ones, so the mapping is the prefix strip; every
    name and shape is then verified. BatchNorm ``num_batches_tracked`` counters may be
    absent (checkpoints saved by PyTorch < 0.4.1 have none); they are then left as they
    are. Raises ``ValueError`` listing missing keys, unexpected keys and shape mismatches
    (nothing is loaded in that case).
    """
    incoming = _unwrap_state_dict(state_dict)
    expected = model.state_dict()
    missing = [k for k in expected if k not in incoming and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in incoming if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in incoming.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        opts = getattr(model, "options", {})
        parts = [f"checkpoint does not match this MSDNet ({opts}):"]
        for title, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        ):
            if items:
                shown = ", ".join(items[:10]) + (f", ... ({len(items)} in all)" if len(items) > 10 else "")
                parts.append(f"{len(items)} {title}: {shown}")
        parts.append("check step/base/num_blocks/num_classes against the checkpoint's training command")
        raise ValueError("\n".join(parts))
    for k, v in expected.items():
        if k not in incoming:  # a missing num_batches_tracked: keep the model's own
            incoming[k] = v
    model.load_state_dict(incoming, strict=True)
