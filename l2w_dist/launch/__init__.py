"""Launch a training run through submitit: on Slurm, as local processes, or in-process.

    python launch/imagenet.py --cluster slurm --nodes 4 --gpus-per-node 8 --partition gpu \\
        --output runs/msdnet4 optim.lr=0.8
    python launch/cifar.py --cluster local --gpus-per-node 0 --tasks-per-node 2 \\
        --config configs/demo.yaml --output runs/demo train.max_steps=20

The modules, by where their code runs (docs/slurm.md describes the behaviour):

- :mod:`~l2w_dist.launch.cli`: the launcher's command line in the submitting process
  (:class:`Preset`, :func:`main`, :func:`launch`, :func:`make_executor`, :func:`wait_and_report`);
- :mod:`~l2w_dist.launch.preflight`: the checks before anything is submitted (options, time
  limits, arrays, configs, the Slurm controller and partition); they raise :class:`LaunchError`;
- :mod:`~l2w_dist.launch.task`: what runs on every Slurm task (:class:`TrainingRun`,
  :class:`SlurmStopSignals`, :class:`RequeueLog`): the rank environment, the trainer, and
  checkpoint-then-requeue after a preemption or time-limit warning;
- :mod:`~l2w_dist.launch.submitit_internals`: the one place that reads private submitit
  attributes, with the submitit versions it was written for.
"""

from l2w_dist.launch.cli import (
    CIFAR,
    IMAGENET,
    Preset,
    Submitted,
    build_parser,
    launch,
    main,
    make_executor,
    wait_and_report,
)
from l2w_dist.launch.preflight import CLUSTERS, LaunchError, check_slurm, expand_array, parse_time, validate_configs
from l2w_dist.launch.task import (
    DEFAULT_TRAINER,
    REQUEUE_LOG,
    RequeueLog,
    SlurmStopSignals,
    TrainingRun,
    resolve_trainer,
)

__all__ = [
    "CIFAR",
    "CLUSTERS",
    "DEFAULT_TRAINER",
    "IMAGENET",
    "LaunchError",
    "Preset",
    "REQUEUE_LOG",
    "RequeueLog",
    "SlurmStopSignals",
    "Submitted",
    "TrainingRun",
    "build_parser",
    "check_slurm",
    "expand_array",
    "launch",
    "main",
    "make_executor",
    "parse_time",
    "resolve_trainer",
    "validate_configs",
    "wait_and_report",
]
