"""Launch-variable parsing: torchrun, Slurm (monkeypatched environments), and clear errors."""

from __future__ import annotations

import pytest

from l2w_dist.distributed import env as envmod
from l2w_dist.distributed.env import DistEnvError, first_slurm_host, init_distributed, read_launch_env

SLURM_VARS = (
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_LOCALID",
    "SLURM_NODEID",
    "SLURM_JOB_NUM_NODES",
    "SLURM_TASKS_PER_NODE",
    "SLURM_JOB_NODELIST",
    "SLURM_JOB_ID",
)
TORCHRUN_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
)


@pytest.fixture
def clean_env(monkeypatch):
    for v in SLURM_VARS + TORCHRUN_VARS:
        monkeypatch.delenv(v, raising=False)
    return monkeypatch


def test_no_launcher_is_single_process(clean_env):
    e = read_launch_env()
    assert (e.rank, e.world_size, e.local_rank, e.num_nodes, e.launcher) == (0, 1, 0, 1, "none")
    e = init_distributed()
    assert not e.is_distributed and e.backend is None and e.device.type in ("cpu", "cuda")


def test_torchrun_two_nodes():
    e = read_launch_env(
        {
            "RANK": "3",
            "WORLD_SIZE": "4",
            "LOCAL_RANK": "1",
            "LOCAL_WORLD_SIZE": "2",
            "GROUP_RANK": "1",
            "MASTER_ADDR": "10.0.0.1",
            "MASTER_PORT": "29400",
        }
    )
    assert (e.rank, e.world_size, e.local_rank, e.local_world_size, e.node_rank, e.num_nodes) == (
        3,
        4,
        1,
        2,
        1,
        2,
    )
    assert (e.master_addr, e.master_port, e.launcher) == ("10.0.0.1", 29400, "torchrun")


def test_slurm_variables_with_nodelist(clean_env):
    """srun with 2 nodes × 4 tasks: the master is the first host of the node list (scontrol)."""
    for k, v in {
        "SLURM_PROCID": "6",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "2",
        "SLURM_NODEID": "1",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_TASKS_PER_NODE": "4(x2)",
        "SLURM_JOB_NODELIST": "gpu[017-018]",
        "SLURM_JOB_ID": "123456",
    }.items():
        clean_env.setenv(k, v)
    e = read_launch_env()
    assert (e.rank, e.world_size, e.local_rank, e.local_world_size, e.node_rank, e.num_nodes) == (
        6,
        8,
        2,
        4,
        1,
        2,
    )
    assert e.launcher == "slurm"
    assert e.master_addr == "gpu017"
    assert e.master_port == 15000 + 123456 % 20000
    clean_env.setenv("MASTER_ADDR", "head")
    clean_env.setenv("MASTER_PORT", "1234")
    e = read_launch_env()
    assert (e.master_addr, e.master_port) == ("head", 1234)


def test_torchrun_variables_win_over_slurm(clean_env):
    # torchrun started inside an sbatch allocation: RANK etc. describe the real workers
    for k, v in {
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "1",
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "127.0.0.1",
    }.items():
        clean_env.setenv(k, v)
    e = read_launch_env()
    assert (e.launcher, e.rank, e.world_size) == ("torchrun", 1, 2)


def test_first_slurm_host_without_scontrol(monkeypatch):
    monkeypatch.setattr(envmod.subprocess, "run", _raise_oserror)
    assert first_slurm_host("node[003-007,012],login1") == "node003"
    assert first_slurm_host("a1,a2") == "a1"
    assert first_slurm_host("gpu-[10-11]-x") == "gpu-10-x"


def _raise_oserror(*args, **kwargs):
    raise OSError("no scontrol")


@pytest.mark.parametrize(
    "env, message",
    [
        ({"RANK": "0"}, "WORLD_SIZE unset"),
        ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "x"}, r"rank 2 not in \[0, 2\)"),
        ({"RANK": "a", "WORLD_SIZE": "2"}, "RANK='a' is not an integer"),
        ({"RANK": "0", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "3", "MASTER_ADDR": "x"}, "not a multiple"),
        ({"RANK": "0", "WORLD_SIZE": "2"}, "MASTER_ADDR unset"),
        (
            {
                "SLURM_PROCID": "0",
                "SLURM_NTASKS": "2",
                "SLURM_NODEID": "3",
                "SLURM_JOB_NUM_NODES": "2",
                "MASTER_ADDR": "x",
            },
            r"node rank 3 not in \[0, 2\)",
        ),
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}, "SLURM_JOB_NODELIST both unset"),
        (
            {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_TASKS_PER_NODE": "2(y3)", "MASTER_ADDR": "x"},
            "cannot parse SLURM_TASKS_PER_NODE",
        ),
    ],
)
def test_inconsistent_variables_are_named(env, message):
    with pytest.raises(DistEnvError, match=message):
        read_launch_env(env)


def test_bad_backend_name():
    with pytest.raises(ValueError, match=r"backend='mpi'.*'auto', 'gloo', 'nccl'"):
        init_distributed("mpi")
