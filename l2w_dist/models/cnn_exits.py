"""Early-exit CNNs built from any timm CNN: one exit on each chosen feature stage.

The backbone is timm's ``features_only`` version of the model (truncated after the last
chosen stage). Each exit is global average pooling + Linear on a stage's feature map.

Exits must run *while* the backbone runs, not after it: the cumulative FLOPs of exit k
(counted by ``count_exit_flops`` when the head of exit k runs) are then the backbone up to
stage k plus the heads before it, which is what test-time early exiting pays. timm's
feature extractors differ by family (``FeatureListNet``, ``EfficientNetFeatures``,
hook-based ones), so the module that produces each stage's feature map is found once, by
a probe forward at construction (the last module to return that very tensor), and a
forward hook on it runs the exit head.

The stepwise forward (test-time early exit) needs the stages as separate pieces: it is
available when the feature extractor runs its direct children in order and every exit's
producer is one of them (timm's ``FeatureListNet``/``FeatureDictNet``: resnets, regnets,
convnexts, ...). Other extractors (``EfficientNetFeatures``, hook-based ones) train and
evaluate as usual; their stepwise forward raises an error naming the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import timm
import torch
from torch import Tensor, nn

from .base import MultiExitModel
from .registry import register_model


def default_exit_stages(reductions: Sequence[int]) -> list[int]:
    """Every feature level with stride >= 4 (resnet50: layer1..layer4; the stride-2 stem is left out)."""
    return [i for i, r in enumerate(reductions) if r >= 4]


class _PoolLinear(nn.Module):
    """Global average pooling + Linear."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x.mean(dim=(2, 3)))


def _find_feature_producers(
    features: nn.Module, input_size: tuple[int, int, int]
) -> tuple[list[nn.Module], list[tuple[int, ...]]]:
    """For each returned feature map: the last module whose output is that tensor, and its shape."""
    fired: list[tuple[nn.Module, Tensor]] = []
    handles = [
        m.register_forward_hook(lambda mod, _i, out: fired.append((mod, out)))
        for m in features.modules()
        if m is not features
    ]
    was_training = features.training
    features.eval()
    try:
        with torch.no_grad():
            outs = features(torch.zeros(1, *input_size))
    finally:
        for h in handles:
            h.remove()
        features.train(was_training)
    producers = []
    for j, feat in enumerate(outs):
        found = [mod for mod, out in fired if out is feat]
        if not found:
            raise ValueError(f"cannot find the module producing feature {j} of {type(features).__name__}")
        producer = found[-1]
        calls = sum(1 for mod, _ in fired if mod is producer)
        if calls != 1:
            raise ValueError(f"feature {j} comes from a module called {calls} times; cannot attach an exit")
        producers.append(producer)
    return producers, [tuple(o.shape) for o in outs]


def _sequential_segments(features: nn.Module, producers: Sequence[nn.Module]) -> list[list[str]] | str:
    """Child names of ``features`` per stage (children after the previous exit's producer up
    to this exit's), or the reason why the extractor cannot run stage by stage."""
    kind = type(features).__name__
    if not isinstance(features, nn.ModuleDict):
        return (
            f"cnn_exits: the stepwise forward needs a feature extractor that runs its children in order "
            f"(timm FeatureListNet/FeatureDictNet); this backbone gives {kind}"
        )
    names = list(features.keys())
    position = {id(mod): i for i, mod in enumerate(features.values())}
    if any(id(p) not in position for p in producers):
        return f"cnn_exits: an exit's feature map is produced inside a child of {kind}, not by a child itself"
    segments, start = [], 0
    for producer in producers:
        end = position[id(producer)] + 1
        segments.append(names[start:end])
        start = end
    return segments


class CNNExits(MultiExitModel):
    """A timm feature extractor with a pool + linear exit on each of its returned stages."""

    def __init__(self, features: nn.Module, num_classes: int, input_size: tuple[int, int, int]) -> None:
        super().__init__()
        self.features = features
        self.num_classes = num_classes
        self.input_size = tuple(input_size)
        producers, shapes = _find_feature_producers(features, self.input_size)
        channels = features.feature_info.channels()
        for j, shape in enumerate(shapes):
            if len(shape) != 4 or shape[1] != channels[j]:
                raise ValueError(
                    f"cnn_exits needs NCHW feature maps; stage {j} gives shape {shape} "
                    f"(feature_info says {channels[j]} channels)"
                )
        self.exit_heads = nn.ModuleList(_PoolLinear(c, num_classes) for c in channels)
        self.num_exits = len(self.exit_heads)
        self._pending: list[Tensor] | None = None
        for k, producer in enumerate(producers):
            producer.register_forward_hook(partial(self._run_exit, k))
        self._segments = _sequential_segments(features, producers)

    # Stepwise forward: the state is the feature map; stage k runs the extractor's children
    # after exit k-1's producer up to exit k's, then exit k's head. (The exit hooks stay
    # idle: they only collect inside ``forward``.)
    def _begin(self, x: Tensor) -> Tensor:
        if isinstance(self._segments, str):
            raise NotImplementedError(self._segments)
        return x

    def _step(self, k: int, x: Tensor) -> tuple[Tensor, Tensor]:
        for name in self._segments[k]:
            x = self.features[name](x)
        return self.exit_heads[k](x), x

    def _run_exit(self, k: int, _mod: nn.Module, _inp: Any, out: Tensor) -> None:
        if self._pending is not None:
            self._pending.append(self.exit_heads[k](out))

    def forward(self, x: Tensor) -> list[Tensor]:
        self._pending = []
        try:
            self.features(x)
            logits = self._pending
        finally:
            self._pending = None
        if len(logits) != self.num_exits:
            raise RuntimeError(f"expected {self.num_exits} exits to run, got {len(logits)}")
        return logits


@register_model
def cnn_exits(
    backbone: str = "resnet50",
    exit_stages: Sequence[int] | None = None,
    num_classes: int = 1000,
    pretrained: bool = False,
    img_size: int | None = None,
    **timm_kwargs: Any,
) -> CNNExits:
    """Early-exit CNN from the timm model ``backbone``: one exit per chosen feature stage.

    ``exit_stages`` index timm's ``feature_info`` levels (0-based; resnet50 has 5: the
    stride-2 stem, layer1..layer4); the default takes every level of stride >= 4.
    ``img_size`` only sets the input size at which ``exit_flops`` are counted (default:
    the model's pretrained config, 224 for most). ``timm_kwargs`` go to ``timm.create_model``.
    """
    if backbone not in timm.list_models() and backbone not in timm.list_models(pretrained=True):
        examples = ", ".join(["resnet18", "resnet50", "efficientnet_b0", "convnext_tiny", "regnety_016"])
        raise ValueError(f"unknown timm backbone {backbone!r}; e.g. {examples} (see timm.list_models())")
    try:
        probe = timm.create_model(backbone, pretrained=False, features_only=True, **timm_kwargs)
    except TypeError as err:
        raise ValueError(
            f"bad option(s) {sorted(timm_kwargs)} for cnn_exits(backbone={backbone!r}): {err}. "
            f"cnn_exits options: backbone, exit_stages, num_classes, pretrained, img_size; "
            "any other keyword goes to timm.create_model"
        ) from err
    reductions = probe.feature_info.reduction()
    n_levels = len(reductions)
    stages = default_exit_stages(reductions) if exit_stages is None else [int(s) for s in exit_stages]
    if not stages or sorted(set(stages)) != stages or stages[0] < 0 or stages[-1] >= n_levels:
        raise ValueError(
            f"exit_stages must be strictly increasing feature levels in 0..{n_levels - 1} "
            f"(strides {reductions}) for {backbone!r}, got {exit_stages}"
        )
    if pretrained or stages != list(range(n_levels)):
        features = timm.create_model(
            backbone, pretrained=pretrained, features_only=True, out_indices=tuple(stages), **timm_kwargs
        )
    else:
        features = probe
    in_chans = int(timm_kwargs.get("in_chans", 3))
    if img_size is not None:
        input_size = (in_chans, int(img_size), int(img_size))
    else:
        cfg = getattr(features, "pretrained_cfg", None) or {}
        size = cfg.get("input_size", (3, 224, 224))
        input_size = (in_chans, int(size[1]), int(size[2]))
    return CNNExits(features, num_classes, input_size)
