"""Convolution building blocks shared by MSDNet and RANet.

Both networks come from the same family of released code and use the same pieces: a
conv-BN-ReLU, a DenseNet-style bottleneck conv, a strided ImageNet stem and a
conv-conv-pool exit trunk. Each function returns a plain ``nn.Sequential`` (or builds one
from the caller's conv module), so the caller decides under which attribute name it is
stored: the names are the parameter names of released checkpoints and must not change.
The modules are created in the released order (conv, BatchNorm, ReLU), which keeps the
default initialisation draws of a seeded build unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

__all__ = ["bottleneck_conv", "conv_bn_relu", "conv_pool_trunk", "downsampling_stem"]


def _conv_bn_relu_layers(c_in: int, c_out: int, kernel: int, stride: int, padding: int) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, kernel_size=kernel, stride=stride, padding=padding, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]


def conv_bn_relu(c_in: int, c_out: int, kernel: int, stride: int, padding: int) -> nn.Sequential:
    """Conv (no bias) -> BatchNorm -> ReLU (the released ``ConvBasic``)."""
    return nn.Sequential(*_conv_bn_relu_layers(c_in, c_out, kernel, stride, padding))


def bottleneck_conv(
    c_in: int, c_out: int, stride: int, bottleneck_factor: int, bottleneck: bool = True
) -> nn.Sequential:
    """Optional 1x1 bottleneck of width ``min(c_in, bottleneck_factor * c_out)``, then a 3x3
    conv of the given stride; each is conv-BN-ReLU (MSDNet's ``ConvBN``, RANet's dense layer)."""
    layers: list[nn.Module] = []
    c_inner = c_in
    if bottleneck:
        c_inner = min(c_in, bottleneck_factor * c_out)
        layers += _conv_bn_relu_layers(c_in, c_inner, 1, 1, 0)
    layers += _conv_bn_relu_layers(c_inner, c_out, 3, stride, 1)
    return nn.Sequential(*layers)


def downsampling_stem(c_out: int) -> nn.Sequential:
    """7x7/2 conv (with bias, as released) -> BN -> ReLU -> 3x3/2 max-pool: a 4x downsampling."""
    return nn.Sequential(
        nn.Conv2d(3, c_out, kernel_size=7, stride=2, padding=3),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1),
    )


def conv_pool_trunk(
    c_in: int, width: int, conv: Callable[[int, int, int, int, int], nn.Module] = conv_bn_relu
) -> nn.Sequential:
    """The feature part of an exit: two 3x3/2 ``conv(c_in, c_out, kernel, stride, padding)``
    layers of ``width`` channels and a 2x2 average pool. ``conv`` lets MSDNet pass its
    wrapped conv-BN-ReLU, whose extra attribute level is part of its checkpoint keys."""
    return nn.Sequential(conv(c_in, width, 3, 2, 1), conv(width, width, 3, 2, 1), nn.AvgPool2d(2))
