"""RANet: Resolution Adaptive Networks (Yang, Han, Chen et al., CVPR 2020).

RANet runs several DenseNet-like *scale flows*, from the lowest input resolution to the
highest. The lowest-resolution flow is a plain dense network with exits after its blocks;
every higher-resolution flow first fuses the features of the flow below it layer by
layer ("up-normal" blocks, which also downsample in a few places until the flow reaches
the lowest resolution), then continues with plain dense blocks, each followed by an exit.
Test-time exiting therefore walks the exits in flow order: cheap low-resolution exits
first, expensive high-resolution ones last.

The architecture follows the released code (github.com/yangle15/RANet-pytorch,
``models/RANet.py``) module for module, so that the parameter shapes, the channel
arithmetic (``floor`` for compression and reduction) and the per-exit cost are the
published network's. The code here is our own.

Presets (the released run scripts):

* ``ranet_cifar``: ``train_cifar.sh``: nBlocks 2, block_step 2, step 4, stepmode even,
  scale_list 1-2-3-3, grFactor 4-2-1-1, bnFactor 4-2-1-1, nChannels 16, growthRate 6,
  compress_factor 0.25, reduction 0.5 (8 exits; 32×32 input).
* ``ranet_imagenet``: ``train_imagenet.sh``: growthRate 16, step 8, stepmode even,
  scale_list 1-2-3-4, grFactor 4-2-1-1, bnFactor 4-2-1-1, other knobs at the defaults of
  ``args.py`` (nChannels 16, nBlocks 2, block_step 2, compress 0.25, reduction 0.5);
  8 exits; 224×224 input. The README's alternative ImageNet command (nChannels 32,
  grFactor/bnFactor 4-2-2-1) is ``create_model("ranet_imagenet", n_channels=32,
  gr_factor=(4, 2, 2, 1), bn_factor=(4, 2, 2, 1))``.

FLOPs: the released counter (``op_counter.py``) counts convolution and linear
multiply-adds plus one op per ReLU output element, per pooling-window element and per
linear bias. ``exit_flops_official`` applies that rule; it reproduces the released
counter run on the released model exactly (docs/models_zoo.md). RANet declares
``flop_convention = "op_counter"`` so that ``exit_flops`` follows the same rule as MSDNet's
where ``count_exit_flops`` supports conventions; with plain multiply-adds the figures are
0.15-0.75 % lower.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import MultiExitModel, count_exit_flops
from .layers import bottleneck_conv, conv_bn_relu, conv_pool_trunk, downsampling_stem
from .registry import register_model

_STEP_MODES = ("even", "lg")


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize with ``align_corners=True`` (identity when the size already matches)."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


class _DenseLayer(nn.Module):
    """One layer of a plain dense block: concatenates ``growth`` new channels to its input."""

    def __init__(self, c_in: int, growth: int, bn_width: int) -> None:
        super().__init__()
        self.conv = bottleneck_conv(c_in, growth, 1, bn_width)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, self.conv(x)], dim=1)


class _FusionLayer(nn.Module):
    """One layer of an up-normal block: own features, upsampled low-resolution features, new ones.

    ``growth`` new channels: ``floor(growth*compress)`` come from a 3×3 conv on the matching
    layer's features of the lower-resolution flow (then upsampled), the rest from the own
    input. With ``down`` the own conv has stride 2 and the own input is resized to match,
    halving this flow's resolution.
    """

    def __init__(
        self, c_in: int, c_low: int, growth: int, bn_own: int, bn_low: int, compress: float, down: bool
    ) -> None:
        super().__init__()
        n_low = math.floor(growth * compress)
        self.conv_low = bottleneck_conv(c_low, n_low, 1, bn_low)
        self.conv_own = bottleneck_conv(c_in, growth - n_low, 2 if down else 1, bn_own)

    def forward(self, x: Tensor, low: Tensor) -> Tensor:
        new = self.conv_own(x)
        size = (new.shape[2], new.shape[3])
        return torch.cat([_resize(x, size), _resize(self.conv_low(low), size), new], dim=1)


class _Block(nn.Module):
    """A dense block (plain, or fused with the lower-resolution flow), optionally with a transition.

    ``forward`` returns the block output and the list of its per-layer features (input
    first, pre-transition output last), which the next-higher flow fuses.
    """

    def __init__(
        self,
        c_in: int,
        n_layers: int,
        growth: int,
        bn_own: int,
        reduction: float,
        transition: bool,
        low_channels: Sequence[int] | None = None,
        bn_low: int = 1,
        compress: float = 0.25,
        down: bool = False,
    ) -> None:
        super().__init__()
        self.fused = low_channels is not None
        self.layers = nn.ModuleList()
        for i in range(n_layers):
            c = c_in + i * growth
            if self.fused:
                last = i == n_layers - 1
                self.layers.append(_FusionLayer(c, low_channels[i], growth, bn_own, bn_low, compress, down and last))
            else:
                self.layers.append(_DenseLayer(c, growth, bn_own))
        c_out = c_in + n_layers * growth
        self.layer_channels = [c_in + i * growth for i in range(n_layers + 1)]
        if self.fused:
            n_last = math.floor(c_out * compress)
            self.conv_last = conv_bn_relu(low_channels[n_layers], n_last, 1, 1, 0)
            c_out += n_last
        self.transition = conv_bn_relu(c_out, math.floor(reduction * c_out), 1, 1, 0) if transition else None
        self.out_channels = math.floor(reduction * c_out) if transition else c_out

    def forward(self, x: Tensor, low: list[Tensor] | None = None) -> tuple[Tensor, list[Tensor]]:
        feats = [x]
        for i, layer in enumerate(self.layers):
            x = layer(x, low[i]) if self.fused else layer(x)
            feats.append(x)
        if self.fused:
            size = (x.shape[2], x.shape[3])
            x = torch.cat([x, _resize(self.conv_last(low[len(self.layers)]), size)], dim=1)
        if self.transition is not None:
            x = self.transition(x)
        return x, feats


class _ExitHead(nn.Module):
    """Two stride-2 3×3 conv layers, 2×2 average pooling, linear: the released classifier."""

    def __init__(self, c_in: int, inner: int, num_classes: int) -> None:
        super().__init__()
        self.features = conv_pool_trunk(c_in, inner)
        self.linear = nn.Linear(inner, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.features(x).flatten(1))


class RANet(MultiExitModel):
    """Resolution Adaptive Network; ``forward(x)`` returns the logits of every exit in exit order.

    Argument names follow the released ``args.py`` (snake_case). ``gr_factor``, ``bn_factor``
    and ``scale_list`` are given from the lowest resolution to the highest; ``scale_list``
    holds each flow's resolution level (1 = lowest; equal neighbours share a resolution).
    Flow i has ``n_blocks + i*block_step`` blocks; its first blocks (as many as flow i-1
    has) fuse flow i-1's features, the remaining ones are plain blocks with an exit each.
    """

    flop_convention = "op_counter"  # the released counter's rule, as for MSDNet

    def __init__(
        self,
        num_classes: int,
        input_size: tuple[int, int, int],
        imagenet_stem: bool,
        n_blocks: int = 2,
        block_step: int = 2,
        step: int = 4,
        step_mode: str = "even",
        scale_list: Sequence[int] = (1, 2, 3),
        gr_factor: Sequence[int] = (4, 2, 1),
        bn_factor: Sequence[int] = (4, 2, 1),
        n_channels: int = 16,
        growth_rate: int = 6,
        compress_factor: float = 0.25,
        reduction: float = 0.5,
        head_channels: int | None = 128,
    ) -> None:
        super().__init__()
        if step_mode not in _STEP_MODES:
            raise ValueError(f"step_mode must be one of {_STEP_MODES}, got {step_mode!r}")
        n_scales = len(scale_list)
        if len(gr_factor) != n_scales or len(bn_factor) != n_scales:
            raise ValueError(
                f"scale_list, gr_factor and bn_factor need one entry per scale; got lengths "
                f"{len(scale_list)}, {len(gr_factor)}, {len(bn_factor)}"
            )
        if list(scale_list) != sorted(scale_list) or scale_list[0] != 1:
            raise ValueError(f"scale_list must start at 1 and not decrease, got {list(scale_list)}")
        if n_blocks < 1 or block_step < 0 or step < 1:
            raise ValueError(f"need n_blocks >= 1, block_step >= 0, step >= 1; got {n_blocks}, {block_step}, {step}")
        self.num_classes = num_classes
        self.input_size = tuple(input_size)
        scale_list = list(scale_list)

        # Stem: builds the base features of every flow, highest resolution first, halving the
        # resolution whenever the scale level changes; stored lowest resolution first.
        stem: list[nn.Module] = []
        c_prev = n_channels * gr_factor[-1]
        if imagenet_stem:
            stem.append(downsampling_stem(c_prev))
        else:
            stem.append(conv_bn_relu(3, c_prev, 3, 1, 1))
        for j in range(n_scales - 2, -1, -1):
            c = n_channels * gr_factor[j]
            stride = 1 if scale_list[j] == scale_list[j + 1] else 2
            stem.append(conv_bn_relu(c_prev, c, 3, stride, 1))
            c_prev = c
        self.stem = nn.ModuleList(stem)  # stem[0] makes the highest resolution

        # Number of blocks per flow: [0, n, n+s, n+2s, ...]; the layers in block j (1-based)
        # are step (even) or step*j (lg) in every flow, so fused layers line up.
        blocks_upto = [0] + [n_blocks + block_step * i for i in range(n_scales)]
        self.flows = nn.ModuleList()
        self.exit_heads = nn.ModuleList()
        self._exit_after: list[list[bool]] = []
        low_layer_channels: list[list[int]] = []
        for s in range(n_scales):
            flow = nn.ModuleList()
            exits_here: list[bool] = []
            c_in = n_channels * gr_factor[s]
            growth = growth_rate * gr_factor[s]
            level = scale_list[s]
            transition_at = {math.floor((i + 1) * blocks_upto[s + 1] / level) for i in range(level - 1)}
            # Fused blocks downsample (level-1 times) at the last block counts of the lower
            # flows, so every flow ends at the lowest resolution. (The released code slices
            # ``[-(level-1):]``, which for a level-1 flow above the first would take the whole
            # list; no released configuration has one, and here such a flow never downsamples.)
            down_at = set(blocks_upto[: s + 1][-(level - 1) :]) if level > 1 else set()
            this_layer_channels: list[list[int]] = []
            for b in range(1, blocks_upto[s + 1] + 1):
                n_layers = step if step_mode == "even" else step * b
                plain = b > blocks_upto[s]
                block = _Block(
                    c_in,
                    n_layers,
                    growth,
                    bn_factor[s],
                    reduction,
                    transition=b in transition_at,
                    low_channels=None if plain else low_layer_channels[b - 1],
                    bn_low=bn_factor[s - 1] if s > 0 else 1,
                    compress=compress_factor,
                    down=b in down_at,
                )
                flow.append(block)
                this_layer_channels.append(block.layer_channels)
                c_in = block.out_channels
                exits_here.append(plain)
                if plain:
                    inner = head_channels if head_channels is not None else c_in
                    self.exit_heads.append(_ExitHead(c_in, inner, num_classes))
            low_layer_channels = this_layer_channels
            self.flows.append(flow)
            self._exit_after.append(exits_here)
        self.num_exits = len(self.exit_heads)
        self._starts = self._stage_starts()
        self._init_weights()

    def _init_weights(self) -> None:
        """He-normal (fan-out) convs, unit BN, zero linear bias: the released initialisation."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    # Stepwise forward. Stage k runs from the block after exit k-1 to exit k, crossing into
    # the next flow where the current one ends. The state between stages holds the stem
    # outputs of the flows not started yet (``rest``), the current flow's output ``h`` and
    # the per-layer features of its blocks (``feats``, which the next flow's fused blocks
    # read; empty in the last flow). The lower flow's features are not carried: exits sit
    # after plain blocks only, and a flow's plain blocks all come after its fused ones.
    def _begin(self, x: Tensor) -> dict:
        base = []
        for layer in self.stem:
            x = layer(x)
            base.append(x)
        base = base[::-1]  # lowest resolution first
        return {"rest": base[1:], "h": base[0], "feats": [], "low": []}

    def _stage_starts(self) -> list[tuple[int, int]]:
        """(flow, block) where each stage starts; a block index past the flow's end means the next flow."""
        starts, start = [], (0, 0)
        for s, exits in enumerate(self._exit_after):
            for b, has_exit in enumerate(exits):
                if has_exit:
                    starts.append(start)
                    start = (s, b + 1)
        return starts

    def _step(self, k: int, state: dict) -> tuple[Tensor, dict]:
        s, b = self._starts[k]
        rest, h, feats, low = state["rest"], state["h"], state["feats"], state["low"]
        while True:
            if b == len(self.flows[s]):  # the flow ended: the next one fuses its features
                s, b, low, feats, h, rest = s + 1, 0, feats, [], rest[0], rest[1:]
            block = self.flows[s][b]
            h, layer_feats = block(h, low[b] if block.fused else None)
            feats = [*feats, layer_feats]
            if self._exit_after[s][b]:
                break
            b += 1
        last_flow = s == len(self.flows) - 1
        return self.exit_heads[k](h), {"rest": rest, "h": h, "feats": [] if last_flow else feats, "low": []}

    @property
    def exit_flops_official(self) -> list[float]:
        """Per-exit cumulative ops by the released counter's rule (``op_counter.py``).

        Conv and linear multiply-adds plus one op per ReLU output element, per pooling
        window element and per linear bias; bilinear resizes and BN count nothing.
        """
        return count_exit_ops_official(self, self.input_size)


def count_exit_ops_official(model: MultiExitModel, input_size: tuple[int, ...]) -> list[float]:
    """Cumulative ops at each exit head, counted like MSDNet/RANet's ``op_counter.py``
    (whatever ``model.flop_convention`` says)."""
    return count_exit_flops(model, input_size, convention="op_counter")


def _check_tuple(name: str, value: Sequence[int] | str) -> tuple[int, ...]:
    """Accept ``(4, 2, 1)`` or the released dash form ``"4-2-1"``; positive integers only."""
    try:
        items = value.split("-") if isinstance(value, str) else list(value)
        out = tuple(int(v) for v in items)
    except (TypeError, ValueError):
        out = ()
    if not out or any(v < 1 for v in out):
        raise ValueError(f"{name} must be positive integers like (4, 2, 1) or '4-2-1', got {value!r}")
    return out


@register_model
def ranet_cifar(
    num_classes: int = 100,
    n_blocks: int = 2,
    block_step: int = 2,
    step: int = 4,
    step_mode: str = "even",
    scale_list: Sequence[int] | str = (1, 2, 3, 3),
    gr_factor: Sequence[int] | str = (4, 2, 1, 1),
    bn_factor: Sequence[int] | str = (4, 2, 1, 1),
    n_channels: int = 16,
    growth_rate: int = 6,
    compress_factor: float = 0.25,
    reduction: float = 0.5,
    image_size: int = 32,
) -> RANet:
    """RANet for CIFAR (32×32) as in the released ``train_cifar.sh``: 8 exits.

    Sequences may also be given in the released dash form (``"4-2-1-1"``).
    """
    return RANet(
        num_classes=num_classes,
        input_size=(3, image_size, image_size),
        imagenet_stem=False,
        n_blocks=n_blocks,
        block_step=block_step,
        step=step,
        step_mode=step_mode,
        scale_list=_check_tuple("scale_list", scale_list),
        gr_factor=_check_tuple("gr_factor", gr_factor),
        bn_factor=_check_tuple("bn_factor", bn_factor),
        n_channels=n_channels,
        growth_rate=growth_rate,
        compress_factor=compress_factor,
        reduction=reduction,
        head_channels=128,
    )


@register_model
def ranet_imagenet(
    num_classes: int = 1000,
    n_blocks: int = 2,
    block_step: int = 2,
    step: int = 8,
    step_mode: str = "even",
    scale_list: Sequence[int] | str = (1, 2, 3, 4),
    gr_factor: Sequence[int] | str = (4, 2, 1, 1),
    bn_factor: Sequence[int] | str = (4, 2, 1, 1),
    n_channels: int = 16,
    growth_rate: int = 16,
    compress_factor: float = 0.25,
    reduction: float = 0.5,
    image_size: int = 224,
) -> RANet:
    """RANet for ImageNet (224×224) as in the released ``train_imagenet.sh``: 8 exits.

    The exit heads keep the width of their input (the released ImageNet classifier).
    """
    return RANet(
        num_classes=num_classes,
        input_size=(3, image_size, image_size),
        imagenet_stem=True,
        n_blocks=n_blocks,
        block_step=block_step,
        step=step,
        step_mode=step_mode,
        scale_list=_check_tuple("scale_list", scale_list),
        gr_factor=_check_tuple("gr_factor", gr_factor),
        bn_factor=_check_tuple("bn_factor", bn_factor),
        n_channels=n_channels,
        growth_rate=growth_rate,
        compress_factor=compress_factor,
        reduction=reduction,
        head_channels=None,
    )
