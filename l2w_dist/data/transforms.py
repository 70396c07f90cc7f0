"""Train / eval transforms per dataset kind (PIL RGB image -> float tensor [C, H, W]).

- ``imagenet``: timm's ``create_transform`` — train: RandomResizedCrop(img_size) + horizontal
  flip (no colour jitter, as in the MSDNet / L2W recipe); eval: resize to img_size/0.875 and
  centre crop. ImageNet mean/std.
- ``cifar``: torchvision — train: 4-pixel zero-pad random crop + flip; eval: none. CIFAR mean/std.
- ``fashion-mnist``: 28×28 grayscale photographs. Default ``in_chans=3``, ``img_size=32``: the
  image is zero-padded to 32×32 (the background is black, so padding adds no edge) and the
  gray channel is replicated to 3 channels, so CIFAR-shaped models (msdnet_cifar on 32×32
  RGB) run unchanged; train adds a 4-pixel pad random crop + flip. ``in_chans=1`` keeps one
  channel. Sizes below 28 resize instead of pad.

``normalize=False`` ends every recipe with a uint8 tensor instead (timm's "prefetcher" form):
4× fewer bytes through shared memory, pinning and the host-to-device copy, and no float
conversion on the loader's cores; :func:`attach_input_normalizer` then normalises on the
model's device, as the model's first operation.

The loader decodes every image to RGB (``decode("pilrgb")``), so a grayscale JPEG in
ImageNet and the gray PNGs of Fashion-MNIST reach the transform as 3-channel images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from torchvision import transforms as T


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset kind: default input size, channels, stats."""

    img_size: int
    in_chans: int
    num_classes: int | None
    mean: tuple[float, ...]
    std: tuple[float, ...]


DATASET_INFO: dict[str, DatasetInfo] = {
    "imagenet": DatasetInfo(224, 3, 1000, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar": DatasetInfo(32, 3, None, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "fashion-mnist": DatasetInfo(32, 3, 10, (0.2860,) * 3, (0.3530,) * 3),
}


def dataset_info(dataset_kind: str) -> DatasetInfo:
    """``DATASET_INFO[dataset_kind]``, or an error naming the kind and the allowed ones."""
    if dataset_kind not in DATASET_INFO:
        raise ValueError(f"unknown dataset_kind {dataset_kind!r}; allowed: {', '.join(DATASET_INFO)}")
    return DATASET_INFO[dataset_kind]


def uint8_normalization(mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    """``(shift, scale)`` as ``[C, 1, 1]`` float32 tensors with ``(x - shift) * scale =
    (x/255 - mean) / std`` for uint8 images ``x``: what ToTensor + Normalize compute, in one
    subtraction and one multiplication (the loader's batch assembly and the device hook)."""
    mean, std = (torch.tensor(v, dtype=torch.float32).view(-1, 1, 1) for v in (mean, std))
    return mean * 255, 1 / (std * 255)


def build_transforms(
    dataset_kind: str,
    train: bool,
    img_size: int | None = None,
    *,
    in_chans: int | None = None,
    normalize: bool = True,
    **timm_kwargs,
):
    """A callable PIL RGB image -> normalised float tensor [in_chans, img_size, img_size]
    (``normalize=False``: the same image as a uint8 tensor, to normalise on the device).

    ``img_size``/``in_chans`` default to ``DATASET_INFO[dataset_kind]``; for ``imagenet``
    extra keyword arguments go to ``timm.data.create_transform`` (e.g. ``auto_augment``,
    ``color_jitter``, ``crop_pct``).
    """
    info = dataset_info(dataset_kind)
    img_size = img_size or info.img_size
    in_chans = in_chans or info.in_chans
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
    mean, std = info.mean[:in_chans], info.std[:in_chans]
    gray = [T.Grayscale(num_output_channels=1)] if in_chans == 1 else []

    if dataset_kind == "imagenet":
        from timm.data import create_transform

        kw = {
            "color_jitter": None,
            "interpolation": "bilinear",
            "mean": mean,
            "std": std,
            "use_prefetcher": not normalize,
        }
        kw.update(timm_kwargs)
        tf = create_transform(input_size=img_size, is_training=train, **kw)
        return T.Compose([*gray, tf]) if gray else tf
    if timm_kwargs:
        raise ValueError(f"transform options {sorted(timm_kwargs)} only apply to dataset_kind 'imagenet'")

    if dataset_kind == "cifar":
        size = [] if img_size == 32 else [T.Resize(img_size)]
    else:  # fashion-mnist: zero-pad 28 -> img_size (CenterCrop pads when the crop is larger)
        size = [T.CenterCrop(img_size)] if img_size >= 28 else [T.Resize(img_size)]
    aug = [T.RandomCrop(img_size, padding=img_size // 8), T.RandomHorizontalFlip()] if train else []
    to_tensor = [T.ToTensor(), T.Normalize(mean, std)] if normalize else [T.PILToTensor()]
    return T.Compose([*size, *aug, *gray, *to_tensor])


def attach_input_normalizer(model: nn.Module, dataset_kind: str, in_chans: int | None = None) -> RemovableHandle:
    """Make ``model`` accept the uint8 images of ``build_transforms(..., normalize=False)``: a
    forward pre-hook turns a uint8 input into ``(x/255 - mean) / std`` in float32 on the input's
    device (autocast casts it further). Float inputs pass unchanged. A hook, not a wrapper
    module, so state dicts, ``functional_call`` (the L2W step) and DDP see the model as it is."""
    info = dataset_info(dataset_kind)
    chans = in_chans or info.in_chans
    mean, inv_std = uint8_normalization(info.mean[:chans], info.std[:chans])
    cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def normalize_uint8(_module: nn.Module, args: tuple) -> tuple | None:
        x = args[0]
        if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8:
            return None
        if x.device not in cache:
            cache[x.device] = (mean.to(x.device), inv_std.to(x.device))
        m, s = cache[x.device]
        return ((x.float() - m) * s, *args[1:])  # keeps channels_last (elementwise ops)

    return model.register_forward_pre_hook(normalize_uint8)
