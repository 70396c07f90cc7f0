"""The dynamic model saved so that it runs without the model code: one ``torch.export``
program per stage, plus the operating point.

    DIR/stage_0.pt2 ... stage_{K-1}.pt2   stage k: (state leaves) -> (exit k logits, next state leaves)
    DIR/meta.json                         exits, FLOPs per exit, thresholds and point, the run's config

Stage 0 takes the input batch (the model's input pre-hooks, e.g. uint8 normalisation, are
traced into it); the state between stages is the flat list of the stepwise forward's
carried tensors. Every input has a dynamic batch dimension, so the programs run on any
batch size, including the compacted batches of early exit. :class:`ExportedModel` loads a
folder and offers ``begin``/``step``/``num_exits``/``exit_flops``, which is what
:class:`~l2w_dist.infer.DynamicPredictor` runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import TreeSpec, tree_flatten, tree_unflatten

from ..models.base import StageState
from ..utils import atomic_write, atomic_write_json

FORMAT = 1


class ExportError(RuntimeError):
    """A model (family) whose stages torch.export cannot capture; the message says why."""


class _Stage(nn.Module):
    """Stage k of ``model`` as a function of flat tensors (what torch.export traces)."""

    def __init__(self, model: nn.Module, k: int, spec: TreeSpec | None) -> None:
        super().__init__()
        self.model, self.k, self.spec = model, k, spec

    def forward(self, *leaves: Tensor) -> tuple[Tensor, ...]:
        tensors = self.model.begin(leaves[0]).tensors if self.k == 0 else tree_unflatten(list(leaves), self.spec)
        logits, out = self.model._step(self.k, tensors)
        if self.k == self.model.num_exits - 1:
            return (logits,)
        return (logits, *tree_flatten(out)[0])


def export_stages(model: nn.Module, example: Tensor, folder: str | Path, point: dict[str, Any], config: dict) -> Path:
    """Export every stage of ``model`` (eval mode) traced on ``example`` (a batch of at least 2
    inputs of the dtype the data gives) into ``folder``, with ``point`` (``thresholds``,
    ``point``, ``mflops_expected``, ``top1_expected``) and the run's ``config`` in meta.json."""
    folder = Path(folder)
    model = model.eval()
    if example.shape[0] < 2:
        example = torch.cat([example, example])  # a batch of 1 would be specialised to 1
    leaves, spec = [example], None
    with torch.no_grad():
        try:
            model.begin(example)
        except NotImplementedError as err:
            raise ExportError(f"{type(model).__name__} cannot be exported: {err}") from None
        exit_flops = list(model.exit_flops)
        for k in range(model.num_exits):
            stage = _Stage(model, k, spec)
            dims = (tuple({0: torch.export.Dim.DYNAMIC} for _ in leaves),)
            try:
                program = torch.export.export(stage, tuple(leaves), dynamic_shapes=dims)
            except Exception as err:  # torch.export raises many kinds; the first line says what
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise ExportError(
                    f"stage {k} of {type(model).__name__} cannot be captured by torch.export: {first}"
                ) from err
            with atomic_write(folder / f"stage_{k}.pt2") as f:
                torch.export.save(program, f)
            if k < model.num_exits - 1:
                tensors = model.begin(example).tensors if k == 0 else tree_unflatten(leaves, spec)
                _, out = model._step(k, tensors)
                leaves, spec = tree_flatten(out)
    meta = {
        "format": FORMAT,
        "model": type(model).__name__,
        "num_exits": model.num_exits,
        "num_classes": model.num_classes,
        "input_size": list(model.input_size),
        "exit_flops": exit_flops,
        **point,
        "config": config,
    }
    atomic_write_json(folder / "meta.json", meta)
    return folder


class ExportedModel(nn.Module):
    """The exported stages of a folder written by :func:`export_stages`, run as a model."""

    def __init__(self, folder: str | Path) -> None:
        super().__init__()
        folder = Path(folder)
        meta_path = folder / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"no exported model at {folder} (meta.json missing); write one with --export")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path}: format {self.meta.get('format')!r}, this version reads {FORMAT}")
        self.num_exits = int(self.meta["num_exits"])
        self.num_classes = int(self.meta["num_classes"])
        self.input_size = tuple(self.meta["input_size"])
        self.exit_flops = [float(f) for f in self.meta["exit_flops"]]
        self.stages_ = nn.ModuleList(
            torch.export.load(folder / f"stage_{k}.pt2").module() for k in range(self.num_exits)
        )

    def train(self, mode: bool = True) -> ExportedModel:
        # the programs are traced in eval mode; exported graph modules refuse train()/eval()
        self.training = mode
        return self

    def stages(self) -> int:
        return self.num_exits

    def begin(self, x: Tensor) -> StageState:
        return StageState([x])

    def step(self, k: int, state: StageState) -> tuple[Tensor, StageState]:
        out = self.stages_[k](*state.tensors)
        return out[0], StageState(list(out[1:]))

    def forward(self, x: Tensor) -> list[Tensor]:
        state, logits = self.begin(x), []
        for k in range(self.num_exits):
            out, state = self.step(k, state)
            logits.append(out)
        return logits
