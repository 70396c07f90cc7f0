"""One forward pass over a split, keeping every exit's logits (and gathering across ranks)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from ..utils import autocast


def _split_batch(batch) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, dict):
        for xk, yk in (("image", "label"), ("input", "target"), ("x", "y")):
            if xk in batch and yk in batch:
                return batch[xk], batch[yk]
        raise ValueError(f"a dict batch needs keys image/label, input/target or x/y; got {sorted(batch)}")
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise ValueError(f"a batch must be (inputs, labels, ...) or a dict; got {type(batch).__name__}")


@torch.no_grad()
def collect_logits(
    model: nn.Module,
    loader: Iterable,
    device: torch.device | str,
    precision: str = "fp32",
    gather: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` over ``loader`` in eval mode; return ``(logits [K, N, C] float32 cpu, labels [N])``.

    ``model`` returns a list of K logit tensors (a single tensor counts as K = 1).
    ``precision="bf16"`` runs the forward under bf16 autocast; the logits are stored in
    float32 either way. The model's train/eval mode is restored afterwards.

    With ``gather`` and an initialised process group of more than one rank, every rank's
    part (disjoint in exact mode) is all-gathered and concatenated in rank order, so every
    rank returns the same full tensors, deterministically ordered.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    parts: list[list[torch.Tensor]] = []
    labels: list[torch.Tensor] = []
    try:
        for batch in loader:
            x, y = _split_batch(batch)
            with autocast(device, precision):
                out = model(x.to(device, non_blocking=True))
            outs = [out] if isinstance(out, torch.Tensor) else list(out)
            if parts and len(outs) != len(parts):
                raise ValueError(f"the model returned {len(outs)} exits, earlier batches {len(parts)}")
            if not parts:
                parts = [[] for _ in outs]
            for k, o in enumerate(outs):
                parts[k].append(o.detach().float().cpu())
            labels.append(torch.as_tensor(y).detach().long().cpu().reshape(-1))
    finally:
        model.train(was_training)
    if parts:
        logits = torch.stack([torch.cat(p) for p in parts])
        targets = torch.cat(labels)
    else:  # an empty local part is legal on a rank in distributed mode
        logits, targets = None, torch.zeros(0, dtype=torch.long)
    if gather and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        logits, targets = _gather(logits, targets)
    if logits is None:
        raise ValueError("the loader yielded no batches")
    if logits.shape[1] != targets.numel():
        raise ValueError(f"{logits.shape[1]} samples of logits but {targets.numel()} labels")
    return logits, targets


def _gather(logits: torch.Tensor | None, labels: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """All-gather per-rank parts of different lengths with padded tensor collectives.

    Tensor all_gather (not all_gather_object) keeps the volume at the raw logits and works
    with NCCL (tensors on the current CUDA device) and Gloo (CPU). One exit at a time to
    bound the peak memory. Result: rank 0's samples, then rank 1's, ...
    """
    world = dist.get_world_size()
    comm_device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    comm_device = comm_device or torch.device("cpu")
    # shapes: (n_local, K, C); K and C are -1 on a rank that saw nothing
    shape = torch.tensor([labels.numel(), *(logits.shape[::2] if logits is not None else (-1, -1))], device=comm_device)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape)
    shapes = [s.tolist() for s in shapes]
    kc = {tuple(s[1:]) for s in shapes if s[1] >= 0}
    if len(kc) > 1:
        raise ValueError(f"ranks disagree on (exits, classes): {sorted(kc)}")
    if not kc:
        return None, labels
    num_exits, num_classes = kc.pop()
    sizes = [s[0] for s in shapes]
    width = max(sizes)

    def gather_padded(local: torch.Tensor) -> torch.Tensor:
        padded = torch.zeros((width, *local.shape[1:]), dtype=local.dtype, device=comm_device)
        padded[: local.shape[0]] = local.to(comm_device)
        out = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(out, padded)
        return torch.cat([o[:n].cpu() for o, n in zip(out, sizes)])

    if logits is None:
        logits = torch.zeros(num_exits, 0, num_classes)
    gathered = torch.stack([gather_padded(logits[k]) for k in range(num_exits)])
    return gathered, gather_padded(labels)
