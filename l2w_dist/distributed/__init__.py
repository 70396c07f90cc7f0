"""Distribution, kept apart from the algorithm: process groups, backends, global BatchNorm.

``init_distributed()`` reads torchrun / Slurm variables and joins the process group;
``build_backend(kind, model, optimizer, env=...)`` wraps the model for DDP or DeepSpeed
and exposes the ``RealUpdate`` the L2W step uses. ``l2w_dist.meta`` never imports this.
"""

from .env import DistEnv, DistEnvError, cleanup, init_distributed, read_launch_env
from .sync_bn import GlobalBatchNorm, convert_sync_batchnorm

__all__ = [
    "DistEnv",
    "DistEnvError",
    "GlobalBatchNorm",
    "TrainBackend",
    "build_backend",
    "cleanup",
    "convert_sync_batchnorm",
    "init_distributed",
    "read_launch_env",
]


def __getattr__(name: str):
    # backends import l2w_dist.meta; load them on first use so env-only users stay light
    if name in ("TrainBackend", "build_backend"):
        from . import backends

        return getattr(backends, name)
    raise AttributeError(name)
