"""Plumbing over dicts of named tensors (parameters, gradients, buffers), kept out of the algorithm.

The L2W step handles θ, g, θ' and u as ``{name: tensor}`` dicts in the order of
``module.named_parameters()``. These helpers scale, differentiate, flatten, all-reduce and
copy such dicts, using multi-tensor (``torch._foreach_*``) ops or one flat tensor where that
replaces one kernel per parameter (MSDNet has hundreds of small parameter and buffer tensors).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .collectives import Collectives


def flatten(tensors: dict[str, Tensor]) -> Tensor:
    """All tensors as one flat tensor, in dict order (the inverse of :func:`unflatten`)."""
    return torch.cat([t.reshape(-1) for t in tensors.values()])


def unflatten(flat: Tensor, like: dict[str, Tensor]) -> dict[str, Tensor]:
    """Views of ``flat`` shaped and named as ``like`` (in dict order)."""
    out, offset = {}, 0
    for name, t in like.items():
        out[name] = flat[offset : offset + t.numel()].view_as(t)
        offset += t.numel()
    return out


def scale(factor: dict[str, Tensor | float], tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """``factor[n] * tensors[n]``; equal float factors, or one shared 0-dim tensor factor
    (SGD with a device lr), by one multi-tensor op."""
    out: dict[str, Tensor] = {}
    shared: dict[object, tuple[float | Tensor, list[str]]] = {}  # tensors keyed by identity, never by value
    for name, f in factor.items():
        if isinstance(f, Tensor) and f.dim() > 0:
            out[name] = f * tensors[name]
        else:
            shared.setdefault(("tensor", id(f)) if isinstance(f, Tensor) else f, (f, []))[1].append(name)
    for f, names in shared.values():
        out.update(zip(names, torch._foreach_mul([tensors[n] for n in names], f)))
    return {name: out[name] for name in factor}


def grad(loss: Tensor, wrt: dict[str, Tensor], **kwargs) -> dict[str, Tensor]:
    """``torch.autograd.grad`` by name; tensors the loss does not reach get zeros."""
    grads = torch.autograd.grad(loss, list(wrt.values()), allow_unused=True, **kwargs)
    return {n: torch.zeros_like(t) if g is None else g for (n, t), g in zip(wrt.items(), grads)}


def all_reduce_mean(tensors: dict[str, Tensor], collectives: Collectives) -> dict[str, Tensor]:
    """The mean over ranks of every tensor (detached), by one all-reduce of one flat tensor."""
    flat = collectives.all_reduce_sum_(flatten({n: t.detach() for n, t in tensors.items()}))
    return unflatten(flat / collectives.world_size, tensors)


def copy_(targets: dict[str, Tensor], sources: dict[str, Tensor]) -> None:
    """``targets[n].copy_(sources[n])`` for every name of ``targets``, in one multi-tensor copy."""
    if targets:  # (a BatchNorm-free model has no buffers)
        torch._foreach_copy_(list(targets.values()), [sources[n] for n in targets])


def scratch_buffers(module: nn.Module) -> dict[str, Tensor]:
    """Copies of the module's buffers: virtual forwards in train mode update these, never the model's.

    Copied as one flat tensor per (dtype, device) and viewed back (a few kernels, not one per
    buffer: MSDNet has 330-560 BatchNorm buffers); non-contiguous buffers are cloned.
    """
    out: dict[str, Tensor] = {}
    groups: dict[tuple, list[tuple[str, Tensor]]] = {}
    for name, b in module.named_buffers():
        if b.is_contiguous():
            groups.setdefault((b.dtype, b.device), []).append((name, b))
        else:
            out[name] = b.clone()
    for members in groups.values():
        flat = torch.cat([b.reshape(-1) for _, b in members])
        pieces = flat.split([b.numel() for _, b in members])
        out.update((name, piece.view(b.shape)) for (name, b), piece in zip(members, pieces))
    return out
