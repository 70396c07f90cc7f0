"""Who am I in the job? Rank, world size and node layout from torchrun or Slurm, then the process group.

The same training command runs under ``torchrun`` (one or many nodes), under Slurm's
``srun`` (one task per GPU, as submitit launches it) or as a plain single process. This
module reads whichever launcher's variables are present, checks they are consistent,
and initialises ``torch.distributed`` (gloo on CPU, NCCL on CUDA). With a world size of
one no process group is created at all, so single-process runs pay nothing and the
algorithm sees ``torch.distributed.is_initialized() == False``.

:func:`read_launch_env` is pure (takes a mapping) so it is unit-tested with fake
environments; :func:`init_distributed` applies it.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from l2w_dist.distributed.utils import process_group_ready

BACKENDS = ("auto", "gloo", "nccl")


class DistEnvError(RuntimeError):
    """The launcher's variables are missing, malformed or contradict each other."""


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job, and the device it computes on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    num_nodes: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None  # the process group's backend; None when single-process
    launcher: str = "none"  # "torchrun" | "slurm" | "none"
    master_addr: str | None = None
    master_port: int | None = None

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int_var(env: Mapping[str, str], name: str) -> int:
    value = env.get(name)
    if value is None:
        raise DistEnvError(f"environment variable {name} is not set")
    try:
        return int(value)
    except ValueError:
        raise DistEnvError(f"environment variable {name}={value!r} is not an integer") from None


def _slurm_tasks_on_node(tasks_per_node: str, node_id: int) -> int:
    """Tasks on node ``node_id`` from SLURM_TASKS_PER_NODE, e.g. ``"4(x2),3"`` → [4, 4, 3]."""
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise DistEnvError(f"cannot parse SLURM_TASKS_PER_NODE={tasks_per_node!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    if not 0 <= node_id < len(counts):
        raise DistEnvError(
            f"SLURM_NODEID={node_id} is outside SLURM_TASKS_PER_NODE={tasks_per_node!r} ({len(counts)} nodes)"
        )
    return counts[node_id]


def first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm node list (``"gpu[001-004]"`` → ``"gpu001"``).

    Asks ``scontrol show hostnames`` (the authoritative expansion); falls back to a
    small parser for the common forms when scontrol is not on PATH.
    """
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    first = re.split(r",(?![^\[]*\])", nodelist.strip())[0]  # first comma-item outside brackets
    m = re.fullmatch(r"([^\[]*)\[([^\],\-]+)[^\]]*\](.*)", first)
    return f"{m.group(1)}{m.group(2)}{m.group(3)}" if m else first


def read_launch_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """The job layout from torchrun's or Slurm's variables (torchrun wins when both are set).

    torchrun: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK (node rank),
    MASTER_ADDR, MASTER_PORT. Slurm: SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID,
    SLURM_NODEID, SLURM_JOB_NUM_NODES, SLURM_TASKS_PER_NODE, SLURM_JOB_NODELIST; the
    master is MASTER_ADDR if set, else the first host of the node list, and the port
    MASTER_PORT if set, else one derived from SLURM_JOB_ID (same on every task).
    The returned device is always CPU; :func:`init_distributed` picks the GPU.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env or "WORLD_SIZE" in env:
        missing = [v for v in ("RANK", "WORLD_SIZE") if v not in env]
        if missing:
            raise DistEnvError(
                f"torchrun-style launch with {', '.join(missing)} unset (both RANK and WORLD_SIZE needed)"
            )
        launcher = "torchrun"
        rank, world = _int_var(env, "RANK"), _int_var(env, "WORLD_SIZE")
        local_rank = _int_var(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
        local_world = _int_var(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else world
        if local_world < 1 or world % local_world:
            raise DistEnvError(f"WORLD_SIZE={world} is not a multiple of LOCAL_WORLD_SIZE={local_world}")
        node_rank = _int_var(env, "GROUP_RANK") if "GROUP_RANK" in env else rank // local_world
        num_nodes = world // local_world
        master_addr = env.get("MASTER_ADDR")
        master_port = _int_var(env, "MASTER_PORT") if "MASTER_PORT" in env else None
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        launcher = "slurm"
        rank, world = _int_var(env, "SLURM_PROCID"), _int_var(env, "SLURM_NTASKS")
        local_rank = _int_var(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        node_rank = _int_var(env, "SLURM_NODEID") if "SLURM_NODEID" in env else 0
        num_nodes = _int_var(env, "SLURM_JOB_NUM_NODES") if "SLURM_JOB_NUM_NODES" in env else 1
        if "SLURM_TASKS_PER_NODE" in env:
            local_world = _slurm_tasks_on_node(env["SLURM_TASKS_PER_NODE"], node_rank)
        else:
            local_world = world // num_nodes if num_nodes and world % num_nodes == 0 else world
        master_addr = env.get("MASTER_ADDR")
        if master_addr is None and world > 1:
            if "SLURM_JOB_NODELIST" not in env:
                raise DistEnvError("Slurm launch with MASTER_ADDR and SLURM_JOB_NODELIST both unset")
            master_addr = first_slurm_host(env["SLURM_JOB_NODELIST"])
        if "MASTER_PORT" in env:
            master_port = _int_var(env, "MASTER_PORT")
        else:  # every task of a job derives the same port; different jobs rarely collide
            master_port = 15000 + _int_var(env, "SLURM_JOB_ID") % 20000 if "SLURM_JOB_ID" in env else 29500
    else:
        return DistEnv()

    problems = []
    if world < 1:
        problems.append(f"world size {world} < 1")
    if not 0 <= rank < world:
        problems.append(f"rank {rank} not in [0, {world})")
    if not 0 <= local_rank < local_world:
        problems.append(f"local rank {local_rank} not in [0, {local_world})")
    if not 0 <= node_rank < num_nodes:
        problems.append(f"node rank {node_rank} not in [0, {num_nodes})")
    if local_world > world:
        problems.append(f"local world size {local_world} > world size {world}")
    if world > 1 and not master_addr:
        problems.append("MASTER_ADDR unset")
    if problems:
        raise DistEnvError(f"inconsistent {launcher} variables: " + "; ".join(problems))
    return DistEnv(
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        local_world_size=local_world,
        node_rank=node_rank,
        num_nodes=num_nodes,
        launcher=launcher,
        master_addr=master_addr,
        master_port=master_port,
    )


def init_distributed(backend: str = "auto", timeout_s: float = 600.0) -> DistEnv:
    """Read the launcher's variables and join the process group (none when world size is 1).

    ``backend``: "auto" (NCCL when CUDA is available, else gloo), "gloo" or "nccl".
    Exports RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT (Slurm launches
    lack them) so that libraries reading them (DeepSpeed) agree with us. Calling it
    again once the group exists returns the same layout.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; expected one of {BACKENDS}")
    info = read_launch_env()
    cuda = torch.cuda.is_available()
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    if backend == "nccl" and not cuda:
        raise DistEnvError("backend='nccl' needs CUDA, which is not available here; use 'gloo' or 'auto'")
    device = torch.device("cuda", info.local_rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if info.world_size == 1:
        return DistEnv(launcher=info.launcher, device=device, node_rank=info.node_rank)

    os.environ.update(
        RANK=str(info.rank),
        WORLD_SIZE=str(info.world_size),
        LOCAL_RANK=str(info.local_rank),
        LOCAL_WORLD_SIZE=str(info.local_world_size),
        MASTER_ADDR=str(info.master_addr),
        MASTER_PORT=str(info.master_port or 29500),
    )
    if dist.is_initialized():
        if dist.get_world_size() != info.world_size or dist.get_rank() != info.rank:
            raise DistEnvError(
                f"a process group already exists with rank {dist.get_rank()}/{dist.get_world_size()}, "
                f"but the environment says {info.rank}/{info.world_size}"
            )
        backend = dist.get_backend()
    else:
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            rank=info.rank,
            world_size=info.world_size,
            timeout=timedelta(seconds=timeout_s),
            **kwargs,
        )
    return DistEnv(
        rank=info.rank,
        world_size=info.world_size,
        local_rank=info.local_rank,
        local_world_size=info.local_world_size,
        node_rank=info.node_rank,
        num_nodes=info.num_nodes,
        device=device,
        backend=backend,
        launcher=info.launcher,
        master_addr=info.master_addr,
        master_port=int(os.environ["MASTER_PORT"]),
    )


def cleanup() -> None:
    """Leave the process group (a no-op when none exists)."""
    if process_group_ready():
        dist.destroy_process_group()
