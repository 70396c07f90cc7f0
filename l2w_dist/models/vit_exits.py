"""Early-exit vision transformers built from any timm ViT/DeiT.

The backbone is the timm model (patch embedding, position embedding, blocks); its final
norm and classifier are replaced by exit heads after chosen blocks. Each exit is a
LayerNorm + Linear on the class token (the mean of the patch tokens when the model has no
class token). Blocks after the last exit are dropped, so every parameter feeds some exit.

Fused attention (``scaled_dot_product_attention``) has no forward-mode AD and no double
backward on CPU and in several GPU kernels, which the L2W meta step needs (docs/algorithm.md §3), so
it is OFF by default; ``set_fused_attn(True)`` turns it on for plain steps and
evaluation, ``set_fused_attn(False)`` before a meta step.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import timm
from torch import Tensor, nn

from .base import MultiExitModel
from .registry import register_model

DEFAULT_NUM_EXITS = 4


def default_exit_blocks(depth: int, num_exits: int = DEFAULT_NUM_EXITS) -> list[int]:
    """Evenly spaced 1-based block indices ending at the last block (12 -> 3, 6, 9, 12; 6 -> 2, 3, 5, 6)."""
    n = min(num_exits, depth)
    return sorted({math.ceil(depth * k / n) for k in range(1, n + 1)})


class ViTExits(MultiExitModel):
    """A timm VisionTransformer with exits after ``exit_blocks`` (1-based block indices)."""

    def __init__(
        self,
        backbone: nn.Module,
        exit_blocks: Sequence[int] | None,
        num_classes: int,
        fused_attn: bool = False,
    ) -> None:
        super().__init__()
        needed = ("patch_embed", "_pos_embed", "blocks", "num_prefix_tokens", "embed_dim")
        missing = [a for a in needed if not hasattr(backbone, a)]
        if missing:
            raise ValueError(
                f"vit_exits needs a timm VisionTransformer-like backbone; {type(backbone).__name__} lacks {missing}"
            )
        depth = len(backbone.blocks)
        blocks = default_exit_blocks(depth) if exit_blocks is None else [int(b) for b in exit_blocks]
        if not blocks or sorted(set(blocks)) != blocks or blocks[0] < 1 or blocks[-1] > depth:
            raise ValueError(
                f"exit_blocks must be strictly increasing 1-based block indices in 1..{depth}, got {exit_blocks}"
            )
        self.exit_blocks = blocks
        self.num_exits = len(blocks)
        self.num_classes = num_classes
        img_size = tuple(backbone.patch_embed.img_size)
        in_chans = backbone.patch_embed.proj.in_channels
        self.input_size = (in_chans, img_size[0], img_size[1])
        self.use_class_token = getattr(backbone, "cls_token", None) is not None
        self.num_prefix_tokens = int(backbone.num_prefix_tokens)

        final_norm = getattr(backbone, "norm", None)
        final_head = getattr(backbone, "head", None)
        heads = []
        for _ in blocks:
            if isinstance(final_norm, nn.LayerNorm):
                norm = copy.deepcopy(final_norm)  # same eps/affine; the last exit keeps its weights
            else:
                norm = nn.LayerNorm(backbone.embed_dim, eps=1e-6)
            linear = nn.Linear(backbone.embed_dim, num_classes)
            nn.init.trunc_normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)
            heads.append(nn.Sequential(norm, linear))
        # A pretrained classifier with the right shape initialises the last exit.
        if isinstance(final_head, nn.Linear) and final_head.weight.shape == heads[-1][1].weight.shape:
            heads[-1][1].load_state_dict(final_head.state_dict())
        self.exit_heads = nn.ModuleList(heads)

        # Keep only what the exits use.
        backbone.blocks = backbone.blocks[: blocks[-1]]
        for name in ("norm", "fc_norm", "head", "head_drop", "head_dist"):
            if hasattr(backbone, name):
                setattr(backbone, name, nn.Identity())
        if getattr(backbone, "attn_pool", None) is not None:
            backbone.attn_pool = None
        self.backbone = backbone
        self.set_fused_attn(fused_attn)

    def set_fused_attn(self, enabled: bool) -> None:
        """Switch timm's fused attention on every Attention module (off for jvp / double backward)."""
        for m in self.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = bool(enabled)
        self.fused_attn = bool(enabled)

    def _pool(self, x: Tensor) -> Tensor:
        if self.use_class_token:
            return x[:, 0]
        return x[:, self.num_prefix_tokens :].mean(dim=1)

    # Stepwise forward: the state is the token sequence; stage k runs the blocks after
    # exit k-1 up to the block of exit k, then exit k's head. ``forward`` is the base loop.
    def _begin(self, x: Tensor) -> Tensor:
        bb = self.backbone
        x = bb.patch_embed(x)
        x = bb._pos_embed(x)
        x = bb.patch_drop(x) if hasattr(bb, "patch_drop") else x
        return bb.norm_pre(x) if hasattr(bb, "norm_pre") else x

    def _step(self, k: int, x: Tensor) -> tuple[Tensor, Tensor]:
        first = self.exit_blocks[k - 1] if k > 0 else 0
        for block in self.backbone.blocks[first : self.exit_blocks[k]]:
            x = block(x)
        return self.exit_heads[k](self._pool(x)), x


@register_model
def vit_exits(
    backbone: str = "deit_small_patch16_224",
    exit_blocks: Sequence[int] | None = None,
    num_classes: int = 1000,
    img_size: int | None = None,
    fused_attn: bool = False,
    pretrained: bool = False,
    **timm_kwargs: Any,
) -> ViTExits:
    """Early-exit ViT from the timm model ``backbone``; exits after ``exit_blocks`` (1-based).

    Default exits: ``DEFAULT_NUM_EXITS`` (4) evenly spaced blocks ending at the last
    (``deit_small``: blocks 3, 6, 9, 12). ``timm_kwargs`` go to ``timm.create_model``
    (e.g. ``depth``, ``embed_dim``, ``patch_size``, ``drop_path_rate``).
    """
    if backbone not in timm.list_models() and backbone not in timm.list_models(pretrained=True):
        vits = ", ".join(timm.list_models("deit_*")[:6] + timm.list_models("vit_tiny*")[:3])
        raise ValueError(f"unknown timm backbone {backbone!r}; e.g. {vits} (see timm.list_models('vit*'))")
    kwargs = dict(timm_kwargs)
    if img_size is not None:
        kwargs["img_size"] = img_size
    try:
        model = timm.create_model(backbone, pretrained=pretrained, **kwargs)
    except TypeError as err:
        raise ValueError(
            f"bad option(s) {sorted(kwargs)} for vit_exits(backbone={backbone!r}): {err}. "
            f"vit_exits options: backbone, exit_blocks, num_classes, img_size, fused_attn, pretrained; "
            "any other keyword goes to timm.create_model"
        ) from err
    return ViTExits(model, exit_blocks, num_classes, fused_attn=fused_attn)
