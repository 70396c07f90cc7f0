"""Run a function on N local CPU processes over gloo — for tests and benchmarks.

``run_ranks(fn, world_size, *args)`` spawns ``world_size`` fresh processes (``spawn``
start method, one thread each), sets the torchrun variables on each, joins the process
group through :func:`~l2w_dist.distributed.env.init_distributed` (so the real code path is
exercised), calls ``fn(env, *args)`` and returns the per-rank results in rank order.
``fn`` must be importable (defined at module top level). Results travel through
``torch.save`` files, not pipes, so tensors survive the child's exit. A failure on any
rank raises with that rank's traceback; a hang is killed after ``timeout_s``.
"""

from __future__ import annotations

import os
import socket
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(
    rank: int, world_size: int, port: int, out_dir: str, fn: Callable, args: tuple, extra_env: dict[str, str]
) -> None:
    os.environ.update(extra_env)
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        GROUP_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    from l2w_dist.distributed.env import cleanup, init_distributed

    path = os.path.join(out_dir, f"rank{rank}.pt")
    try:
        env = init_distributed("gloo", timeout_s=120)
        result = fn(env, *args)
        torch.save({"ok": True, "result": result}, path)
    except BaseException:
        torch.save({"ok": False, "error": traceback.format_exc()}, path)
        raise
    finally:
        cleanup()


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout_s: float = 120.0,
    env: dict[str, str] | None = None,
) -> list[Any]:
    """``[fn(env_r, *args) for r in range(world_size)]``, each in its own gloo process."""
    extra_env = {"DS_ACCELERATOR": "cpu", **(env or {})}
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="l2w_ranks_") as out_dir:
        port = free_port()
        procs = [
            ctx.Process(target=_worker, args=(r, world_size, port, out_dir, fn, args, extra_env), daemon=False)
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout_s)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for r in hung:
            procs[r].kill()
            procs[r].join()
        results, errors = [], []
        for r in range(world_size):
            path = os.path.join(out_dir, f"rank{r}.pt")
            if not os.path.exists(path):
                errors.append(f"rank {r}: no result (exit code {procs[r].exitcode}{', hung' if r in hung else ''})")
                continue
            rec = torch.load(path, weights_only=False)
            if rec["ok"]:
                results.append(rec["result"])
            else:
                errors.append(f"rank {r} failed:\n{rec['error']}")
        if errors:
            raise RuntimeError("run_ranks: " + "\n".join(errors))
        return results
