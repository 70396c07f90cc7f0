"""TEST DOUBLE of ``l2w_dist.train.run_training`` for the launcher tests.

It keeps the trainer's contract — torchrun-style rank variables, gloo when WORLD_SIZE > 1,
automatic resume from OUTPUT/checkpoints/last.pt (a dict with "model"), ``stop_requested``
polled at iteration boundaries and agreed by all ranks, {"status": "preempted"|"finished"} —
with a tiny linear model whose every step is a deterministic function of the step index, so
an interrupted and resumed run must end with bit-identical parameters. Each step sleeps
L2W_STAND_IN_STEP_S seconds (default 0.05) so that signals land mid-training.
It is fast and independent of the real trainer: the tests of the launcher's signal and
requeue logic use it; the end-to-end tests use the real trainer.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist


def _max_steps(overrides) -> int:
    for item in overrides:
        key, _, value = item.partition("=")
        if key == "train.max_steps":
            return int(value)
    return 20


def _init_model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = torch.nn.Linear(4, 3)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def _batch(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(8 * world, 4, generator=g)[rank * 8 : (rank + 1) * 8]
    y = torch.randn(8 * world, 3, generator=g)[rank * 8 : (rank + 1) * 8]
    return x, y


def reference_model(max_steps: int, world: int) -> dict[str, torch.Tensor]:
    """The uninterrupted run's final parameters, all ranks simulated in this process.

    Gradients are averaged as gloo does it (the sum over ranks, then / world), so the result
    is bit-identical to a real run with ``world`` ranks.
    """
    torch.set_num_threads(1)
    model, opt = _init_model()
    for step in range(max_steps):
        grads = []
        for rank in range(world):
            x, y = _batch(step, rank, world)
            model.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        for i, p in enumerate(model.parameters()):
            total = grads[0][i]
            for g in grads[1:]:
                total = total + g[i]
            p.grad = total / world
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def run_training(config, output, overrides=(), stop_requested=None) -> dict:
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    out = Path(output)
    ckpt = out / "checkpoints" / "last.pt"
    model, opt = _init_model()
    step = 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step = int(state["step"])
    seen = {
        k: os.environ.get(k)
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "WANDB_RUN_ID")
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"env_rank{rank}.json").write_text(json.dumps(seen))
    max_steps = _max_steps(overrides)
    step_s = float(os.environ.get("L2W_STAND_IN_STEP_S", "0.05"))
    trace = out / f"trace_rank{rank}.txt"

    def save() -> None:
        if rank == 0:
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            tmp = ckpt.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step}, tmp)
            os.replace(tmp, ckpt)
        if world > 1:
            dist.barrier()

    def finish(result: dict) -> dict:
        if world > 1:
            dist.destroy_process_group()
        return result

    while step < max_steps:
        stop = torch.tensor([1.0 if stop_requested is not None and stop_requested() else 0.0])
        if world > 1:
            dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        if stop.item() > 0:
            save()
            return finish({"status": "preempted", "step": step})
        x, y = _batch(step, rank, world)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        if world > 1:
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world
        opt.step()
        step += 1
        with trace.open("a") as f:
            f.write(f"{step}\n")
        time.sleep(step_s)
    save()
    (out / f"done_rank{rank}").touch()  # the tests signal the job after this point
    if rank == 0:
        (out / "eval.json").write_text(
            '{"anytime": [{"exit": 1, "flops": 1.0, "top1": 50.0, "top5": 90.0}], "budgeted": []}'
        )
    return finish(
        {
            "status": "finished",
            "step": step,
            "eval": {"anytime": [{"exit": 1, "flops": 1.0, "top1": 50.0, "top5": 90.0}]},
        }
    )


def failing_training(config, output, overrides=(), stop_requested=None) -> dict:
    """A trainer that fails: the launcher must report the failure, not a result."""
    raise RuntimeError("the stand-in trainer failed on purpose")
