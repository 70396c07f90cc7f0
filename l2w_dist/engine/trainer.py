"""The training job: build everything from a Config, train with L2W (or the plain baseline),
checkpoint, resume, evaluate.

Read ``TrainingJob.fit`` first: it is the whole loop. ``TrainingJob.__init__`` wires the
parts (model, weight net, backend, data, schedules, logger) and restores the last
checkpoint of the run folder if there is one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.scheduler import CosineLRScheduler
from tqdm import tqdm

from ..config import Config
from ..data import attach_device_normalization, eval_loader, resolve_data_spec, train_loader
from ..distributed import DistEnv, build_backend
from ..distributed.utils import any_rank, any_rank_each
from ..evaluate import anytime, collect_logits, evaluate_run
from ..evaluate.weights import held_out_weights
from ..meta import WeightNet, l2w_iteration
from ..meta.update import DeviceHyperparameters
from ..models import create_model
from ..utils import autocast
from .checkpoint import (
    CheckpointManager,
    CheckpointWriteError,
    ResumeMismatchError,
    resume_changes,
    rng_state,
    set_rng_state,
)
from .cuda_graph import GraphedIteration, check_cuda_graph
from .logging import RunLogger, to_host


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss."""


class TrainingJob:
    def __init__(self, cfg: Config, run_dir: Path, env: DistEnv):
        self.cfg, self.run_dir, self.env = cfg, run_dir, env
        tc = cfg.train
        if tc.cuda_graph:  # refused before any work where it cannot work
            backend = cfg.dist.backend if cfg.dist.backend != "auto" else ("ddp" if env.world_size > 1 else "none")
            check_cuda_graph(env.device, backend, tc.compile)
        if tc.threads:
            torch.set_num_threads(tc.threads)
        self.device = env.device
        # The checkpoint to resume from, read and checked first: a bad or incompatible one is
        # refused before any data preparation or model construction.
        self.ckpt = CheckpointManager(run_dir / "checkpoints", keep_best=tc.keep_best)
        self._resume_from = self._resume_candidate()
        torch.manual_seed(tc.seed)  # same initial weights on every rank

        # Model, weight net, optimizers. -------------------------------------------------
        model = create_model(cfg.model.name, **cfg.model.options).to(self.device)
        attach_device_normalization(model, cfg)
        if tc.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.exit_flops = model.exit_flops
        self.num_exits = model.num_exits
        self.weight_net = WeightNet(
            model.num_exits, hidden=cfg.meta.hidden, layers=cfg.meta.layers, input=cfg.meta.input
        ).to(self.device)
        self.meta_optimizer = torch.optim.Adam(
            self.weight_net.parameters(), lr=cfg.meta.lr, weight_decay=cfg.meta.weight_decay
        )
        self.per_rank_batch = tc.batch_size // env.world_size
        if self.per_rank_batch * env.world_size != tc.batch_size or self.per_rank_batch % 2:
            raise ValueError(
                f"train.batch_size={tc.batch_size} must split into an even per-rank batch over {env.world_size} ranks"
            )
        optimizer = self._make_optimizer(model)
        backend_kind = cfg.dist.backend
        if backend_kind == "auto":
            backend_kind = "ddp" if env.world_size > 1 else "none"
        self.backend = build_backend(
            backend_kind,
            model,
            optimizer,
            env=env,
            zero_stage=cfg.dist.zero_stage,
            grad_clip=cfg.optim.grad_clip or None,
            precision=tc.precision,
            sync_batchnorm=cfg.dist.sync_batchnorm,
        )
        self.optimizer = optimizer
        self.plain_forward = torch.compile(self.backend.model) if tc.compile else self.backend.model
        self.ema = None
        if tc.ema_decay:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.backend.module, decay=tc.ema_decay)
        self.l2w_cfg = cfg.meta.l2w(label_smoothing=cfg.optim.label_smoothing)

        # Data. ----------------------------------------------------------------------------
        if env.rank == 0:  # the stages are data, training, calibration, evaluation: each says when it starts
            print(f"data: {cfg.data.spec or f'{cfg.data.dataset} under {cfg.data.root}'}", flush=True)
        self.data_spec = resolve_data_spec(cfg, env)
        self.train_loader = train_loader(cfg, env, self.data_spec, self.per_rank_batch, self.device)
        self.steps_per_epoch = len(self.train_loader)
        self.total_steps = max(1, math.ceil(tc.epochs * self.steps_per_epoch))  # the schedule's length
        self.stop_step = min(self.total_steps, tc.max_steps) if tc.max_steps else self.total_steps

        # Per-iteration schedules (timm), independent of max_steps so that resuming is exact.
        self.scheduler = CosineLRScheduler(
            optimizer,
            t_initial=self.total_steps,
            lr_min=cfg.optim.min_lr,
            warmup_t=cfg.optim.warmup_steps,
            warmup_lr_init=cfg.optim.min_lr,
            t_in_epochs=False,
        )
        self.meta_scheduler = CosineLRScheduler(self.meta_optimizer, t_initial=self.total_steps, t_in_epochs=False)

        # State, checkpoints, logging. -----------------------------------------------------
        self.step = 0
        self.epoch_end_pending = False  # stopped at an epoch end before its evaluation and checkpoint
        self._last_save = time.monotonic()
        resume_id = self._maybe_resume()
        self.logger = RunLogger(run_dir, rank=env.rank, wandb_cfg=cfg.wandb, config=cfg.to_dict(), resume_id=resume_id)
        if self.logger.url and env.rank == 0:
            print(f"W&B run: {self.logger.url}", flush=True)
        # The first non-finite loss (step, value), watched on the device and read when logging
        # or saving: the iteration itself never waits for the device.
        self._bad_step = torch.full((), -1.0, dtype=torch.float64, device=self.device)
        self._bad_loss = torch.zeros((), dtype=torch.float64, device=self.device)
        self.graphed: GraphedIteration | None = None
        if tc.cuda_graph:  # lr and step counts as device tensors, then a graph per iteration kind
            self.device_hparams = [DeviceHyperparameters(self.optimizer), DeviceHyperparameters(self.meta_optimizer)]
            self.graphed = GraphedIteration(self._iteration, log=lambda line: print(line, flush=True))

    # ------------------------------------------------------------------------------------
    def fit(self, stop_requested: Callable[[], bool] | None = None) -> str:
        """Train until ``stop_step``; returns "finished" or "preempted".

        ``stop_requested`` is polled at every iteration boundary (and before each epoch), on
        every rank: when it is True on any rank, every rank stops there and last.pt is written.
        """
        bar = tqdm(
            total=self.stop_step,
            initial=self.step,
            disable=self.env.rank != 0,
            dynamic_ncols=True,
            desc="training",
            unit="it",
        )
        tic, seen = time.perf_counter(), 0
        self._last_save = time.monotonic()
        if self.epoch_end_pending:  # resumed where a stop came before the epoch-end work: do it now
            self._end_epoch()
        while self.step < self.stop_step:
            if self._poll(stop_requested):  # a stop during data preparation or epoch-end work
                return self._preempt(bar)
            epoch, offset = divmod(self.step, self.steps_per_epoch)
            self.train_loader.set_epoch(epoch, start_batch=offset)  # resume mid-epoch exactly
            for x, y in self.train_loader:
                stats = self.train_step(x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True))
                self.step += 1
                self.scheduler.step_update(self.step)
                self.meta_scheduler.step_update(self.step)
                self._watch_loss(stats["loss"])
                seen += x.shape[0] * self.env.world_size
                if self.step % self.cfg.train.log_every == 0 or self.step == self.stop_step:
                    self._raise_if_nonfinite()
                    # the stats' one copy to the host
                    host = to_host({**stats, "lr": self.optimizer.param_groups[0]["lr"]})
                    rate = seen / (time.perf_counter() - tic)
                    self.logger.log({**host, "img_per_s": rate}, self.step)
                    if self.logger.wandb is not None and self.cfg.meta.enabled:
                        self.logger.log_weight_histograms(self.sample_weights(x, y), self.step)
                    bar.set_postfix(loss=f"{host['loss']:.3f}", img_s=f"{rate:.0f}")
                    tic, seen = time.perf_counter(), 0
                bar.update(1)
                if self.cfg.train.ckpt_every and self.step % self.cfg.train.ckpt_every == 0:
                    self.save(periodic=True)
                self.epoch_end_pending = self.step % self.steps_per_epoch == 0
                # before the epoch-end work, so a preemption warning's grace is not spent evaluating
                if self._poll(stop_requested):
                    return self._preempt(bar)
                if self.step >= self.stop_step or self.epoch_end_pending:
                    break
            self._end_epoch()
        bar.close()
        self.save()
        return "finished"

    def _poll(self, stop_requested: Callable[[], bool] | None) -> bool:
        """At an iteration boundary, on every rank: True when any rank was asked to stop. Also
        writes last.pt once ``train.ckpt_minutes`` have passed on any rank's clock (one
        all-reduce for both, so every rank makes the same choice)."""
        minutes = self.cfg.train.ckpt_minutes
        if stop_requested is None and not minutes:
            return False
        due = bool(minutes) and time.monotonic() - self._last_save >= 60 * minutes
        stop, due = any_rank_each([stop_requested is not None and stop_requested(), due], self.device)
        if due and not stop:
            self.save()
        return stop

    def _preempt(self, bar: tqdm) -> str:
        self.save()
        bar.close()
        return "preempted"

    def _end_epoch(self) -> None:
        """After an epoch's batches (or the run's last batch): the bad-data report; at an epoch
        end also the held-out evaluation (best-k) and last.pt, so a crash loses at most one epoch
        (less with ``train.ckpt_minutes``)."""
        self._log_bad_data()
        self._raise_if_nonfinite()
        at_end = self.step % self.steps_per_epoch == 0
        if (
            at_end
            and self.cfg.eval.enabled
            and self.cfg.eval.every_epochs
            and (self.step // self.steps_per_epoch) % self.cfg.eval.every_epochs == 0
        ):
            self.epoch_eval()
        self.epoch_end_pending = False
        if at_end and self.step < self.stop_step:  # the run's end has its own final save
            self.save()

    def _log_bad_data(self) -> None:
        """After an epoch's batches: the samples this rank's loader lost to bad data (all
        workers; each worker also warned per damage), as metrics and one line, once there are any."""
        lost, read = self.train_loader.bad_data()
        if lost:
            self.logger.log({"data/lost": lost, "data/read": read}, self.step)
            print(
                f"rank {self.env.rank}: {lost} samples lost to bad data of {read} so far "
                f"(stops above data.max_bad_fraction={self.cfg.data.max_bad_fraction} per worker)",
                flush=True,
            )

    def _watch_loss(self, loss: torch.Tensor) -> None:
        """Remember the first non-finite loss, on the device (no host read per iteration)."""
        new = ~torch.isfinite(loss) & (self._bad_step < 0)
        self._bad_step = torch.where(new, float(self.step), self._bad_step)
        self._bad_loss = torch.where(new, loss.to(torch.float64), self._bad_loss)

    def _raise_if_nonfinite(self) -> None:
        """Stop when :meth:`_watch_loss` saw a NaN / infinite loss (before anything is saved)."""
        bad = to_host({"step": self._bad_step, "loss": self._bad_loss})
        if bad["step"] >= 0:
            raise NonFiniteLossError(
                f"loss is {bad['loss']} at step {int(bad['step'])}; stopping. The last good checkpoint is "
                f"{self.ckpt.last} (lower optim.lr or enable optim.grad_clip)"
            )

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """One loader batch: an L2W iteration (two half steps), or one plain step for the baseline.

        The stats are device tensors (copied to the host only when logging); with
        ``train.cuda_graph`` they are the graph's output buffers, valid until the next step."""
        if self.cfg.train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.graphed is not None:
            for hparams in self.device_hparams:  # the schedules' new lr, into the tensors the graph reads
                hparams.refresh()
            stats = self.graphed(x, y, self.cfg.meta.enabled and self.step % self.cfg.meta.interval == 0)
        else:
            stats = self._iteration(x, y)
        if self.ema is not None:
            self.ema.update(self.backend.module, step=self.step)
        return stats

    def _iteration(self, x: torch.Tensor, y: torch.Tensor, kind: object = None) -> dict[str, torch.Tensor]:
        """:meth:`train_step`'s work (what a CUDA graph captures; ``kind``: the graph's key)."""
        with self._autocast():
            if self.cfg.meta.enabled:
                stats = l2w_iteration(
                    self.backend.model,
                    self.weight_net,
                    self.backend.update,
                    self.meta_optimizer,
                    x,
                    y,
                    cfg=self.l2w_cfg,
                    step=self.step,
                    meta_interval=self.cfg.meta.interval,
                )
            else:
                stats = self.plain_step(x, y)
        return stats

    def plain_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """The baseline: every exit's cross-entropy with uniform weights, one optimizer step."""
        logits = self.plain_forward(x)
        per_exit = torch.stack(
            [F.cross_entropy(lg.float(), y, label_smoothing=self.cfg.optim.label_smoothing) for lg in logits]
        )
        loss = per_exit.sum()
        update = self.backend.update
        update.zero_grad()
        update.backward(loss)
        update.step()
        values = per_exit.detach()
        return {"loss": values.sum(), **{f"ce/{k}": v for k, v in enumerate(values.unbind())}}

    @torch.no_grad()
    def sample_weights(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The weights [B, K] the current weight net gives this batch (for W&B histograms)."""
        module = self.backend.module
        was_training = module.training
        module.eval()
        with self._autocast():
            logits = module(x)
        module.train(was_training)
        return held_out_weights(self.weight_net, [z.float() for z in logits], y, self.l2w_cfg)

    # Evaluation ---------------------------------------------------------------------------
    def eval_module(self) -> torch.nn.Module:
        """The network evaluated: the EMA copy when the run keeps one."""
        return self.ema.module if self.ema is not None else self.backend.module

    def epoch_eval(self) -> None:
        """Held-out anytime accuracy at an epoch end; keeps the best-k checkpoints by the last exit."""
        rng = rng_state()  # evaluation leaves the training's random streams as they were
        model = self.eval_module()
        model = torch.compile(model) if self.cfg.train.compile else model
        loader = eval_loader(self.cfg, self.env, self.data_spec, "holdout")
        logits, labels = collect_logits(model, loader, self.device, self.cfg.train.precision)
        rows = anytime(logits, labels, self.exit_flops)
        self.logger.log({f"holdout/top1_exit{r['exit']}": r["top1"] for r in rows}, self.step)
        set_rng_state(rng)
        state = self.state_dict()  # on every rank: gathering a sharded optimizer state is collective
        self._rank0_writes(lambda: self.ckpt.consider_best(state, rows[-1]["top1"], self.step))

    def evaluate(self) -> dict[str, Any]:
        """The run's final evaluation (:func:`~l2w_dist.evaluate.evaluate_run`, as l2w-eval does
        it), written to the run folder and logged."""
        result = evaluate_run(self.eval_module(), self.cfg, self.env, self.data_spec, self.run_dir, self.weight_net)
        if self.env.rank == 0:
            self.logger.log_eval(result, self.step, self.run_dir / "weights.png")
        return result

    # Checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.backend.module.state_dict(),
            "weight_net": self.weight_net.state_dict(),
            "optimizer": self.backend.optimizer_state_dict(),
            "meta_optimizer": self.meta_optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "meta_scheduler": self.meta_scheduler.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "rng": rng_state(),
            "step": self.step,
            "data_position": {"epoch": self.step // self.steps_per_epoch, "batch": self.step % self.steps_per_epoch},
            "world_size": self.env.world_size,
            "epoch_end_pending": self.epoch_end_pending,
            "wandb_id": getattr(self, "logger", None) and self.logger.run_id,
            "exit_flops": list(self.exit_flops),
            "config": self.cfg.to_dict(),
        }

    def save(self, periodic: bool = False) -> None:
        self._raise_if_nonfinite()  # a NaN state is never saved
        state = self.state_dict()  # collective for sharded optimizers: every rank takes part

        def write() -> None:
            self.ckpt.save_last(state)
            if periodic:
                self.ckpt.save_periodic(state, self.step)

        self._rank0_writes(write)
        self._last_save = time.monotonic()

    def _rank0_writes(self, write: Callable[[], Any]) -> None:
        """``write()`` on rank 0. A failed write (:class:`CheckpointWriteError`: what and why, the
        previous file intact) stops every rank here, rather than leaving them in a collective."""
        error = None
        if self.env.rank == 0:
            try:
                write()
            except CheckpointWriteError as err:
                error = err
        if any_rank(error is not None, self.device):
            raise error or CheckpointWriteError("rank 0 could not write a checkpoint (its error says why)")

    def _resume_candidate(self) -> tuple[Path, dict[str, Any]] | None:
        """The checkpoint to resume from (None: a fresh run): last.pt, or the newest good periodic
        one if last.pt does not load; refused when its config differs in a key that changes the
        training (:data:`~l2w_dist.engine.checkpoint.RESUME_MAY_CHANGE` lists those that may change)."""
        found = self.ckpt.load_latest(map_location=self.device)
        if found is None:
            return None
        path, state, note = found
        changes = resume_changes(state["config"], self.cfg.to_dict())
        old_world, world = int(state["world_size"]), self.env.world_size
        if old_world != world and (self.cfg.dist.zero_stage or state["config"].get("dist", {}).get("zero_stage")):
            changes.append(f"world size: {old_world} → {world} (ZeRO state is sharded over the ranks)")
        if changes:
            raise ResumeMismatchError(
                f"cannot resume {path}: {'; '.join(changes)}. These change the training (docs/reliability.md "
                "lists what may change); use the checkpoint's values or another --output"
            )
        if self.env.rank == 0:
            if note:
                print(note, flush=True)
            if old_world != world:
                print(
                    f"{path} was written by {old_world} ranks; on {world} the data order differs from here", flush=True
                )
        return path, state

    def _maybe_resume(self) -> str | None:
        if self._resume_from is None:
            return None
        path, state = self._resume_from
        self._resume_from = None  # the tensors are copied into the model and optimizers below
        if self.env.rank == 0:
            self.ckpt.remove_stale_temporaries()  # a kill during a write leaves its temporary file
        self.backend.module.load_state_dict(state["model"])
        self.weight_net.load_state_dict(state["weight_net"])
        self.backend.load_optimizer_state_dict(state["optimizer"])
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.meta_scheduler.load_state_dict(state["meta_scheduler"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.module.load_state_dict(state["ema"])
        set_rng_state(state["rng"])
        self.ckpt.restore_best(state.get("best", []))
        self.step = int(state["step"])
        self.epoch_end_pending = bool(state.get("epoch_end_pending", False))
        if self.env.rank == 0:
            print(f"resumed from {path} at step {self.step}", flush=True)
        return state.get("wandb_id")

    # Helpers -------------------------------------------------------------------------------
    def _make_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        o = self.cfg.optim
        lr = o.lr * self.cfg.train.batch_size / o.lr_reference_batch if o.lr_reference_batch else o.lr
        if o.name == "sgd":
            return torch.optim.SGD(
                model.parameters(), lr=lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay
            )
        return torch.optim.AdamW(model.parameters(), lr=lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)

    def _autocast(self):
        # no cast cache under a CUDA graph: casts are captured, never kept across replays
        return autocast(self.device, self.cfg.train.precision, cache=not self.cfg.train.cuda_graph)

    def close(self) -> None:
        self.logger.close()
