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
from ..distributed.utils import any_rank
from ..evaluate import anytime, collect_logits, evaluate_run
from ..meta import WeightNet, l2w_iteration, max_confidence, normalize_weights, per_sample_ce, wpn_features
from ..models import create_model
from ..utils import autocast
from .checkpoint import CheckpointManager, load_checkpoint, rng_state, set_rng_state
from .logging import RunLogger, finite


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss."""


class TrainingJob:
    def __init__(self, cfg: Config, run_dir: Path, env: DistEnv):
        self.cfg, self.run_dir, self.env = cfg, run_dir, env
        tc = cfg.train
        if tc.threads:
            torch.set_num_threads(tc.threads)
        self.device = env.device
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
        self.ckpt = CheckpointManager(run_dir / "checkpoints", keep_best=tc.keep_best)
        resume_id = self._maybe_resume()
        self.logger = RunLogger(run_dir, rank=env.rank, wandb_cfg=cfg.wandb, config=cfg.to_dict(), resume_id=resume_id)
        if self.logger.url and env.rank == 0:
            print(f"W&B run: {self.logger.url}", flush=True)

    # ------------------------------------------------------------------------------------
    def fit(self, stop_requested: Callable[[], bool] | None = None) -> str:
        """Train until ``stop_step``; returns "finished" or "preempted"."""
        bar = tqdm(
            total=self.stop_step,
            initial=self.step,
            disable=self.env.rank != 0,
            dynamic_ncols=True,
            desc="train",
            unit="it",
        )
        tic, seen = time.perf_counter(), 0
        while self.step < self.stop_step:
            epoch, offset = divmod(self.step, self.steps_per_epoch)
            self.train_loader.set_epoch(epoch, start_batch=offset)  # resume mid-epoch exactly
            for x, y in self.train_loader:
                stats = self.train_step(x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True))
                self.step += 1
                self.scheduler.step_update(self.step)
                self.meta_scheduler.step_update(self.step)
                if not finite(stats["loss"]):
                    raise NonFiniteLossError(
                        f"loss is {stats['loss']} at step {self.step}; stopping. The last good checkpoint is "
                        f"{self.ckpt.last} (lower optim.lr or enable optim.grad_clip)"
                    )
                seen += x.shape[0] * self.env.world_size
                if self.step % self.cfg.train.log_every == 0 or self.step == self.stop_step:
                    rate = seen / (time.perf_counter() - tic)
                    self.logger.log({**stats, "lr": self.optimizer.param_groups[0]["lr"], "img_per_s": rate}, self.step)
                    if self.logger.wandb is not None and self.cfg.meta.enabled:
                        self.logger.log_weight_histograms(self.sample_weights(x, y), self.step)
                    bar.set_postfix(loss=f"{stats['loss']:.3f}", img_s=f"{rate:.0f}")
                    tic, seen = time.perf_counter(), 0
                bar.update(1)
                if self.cfg.train.ckpt_every and self.step % self.cfg.train.ckpt_every == 0:
                    self.save(periodic=True)
                if self.step >= self.stop_step or self.step % self.steps_per_epoch == 0:
                    break
                # any rank's request stops every rank at this iteration, so all checkpoint together
                if stop_requested is not None and any_rank(stop_requested(), self.device):
                    self.save()
                    bar.close()
                    return "preempted"
            self._log_bad_data()
            if (
                self.step % self.steps_per_epoch == 0
                and self.cfg.eval.enabled
                and self.cfg.eval.every_epochs
                and (self.step // self.steps_per_epoch) % self.cfg.eval.every_epochs == 0
            ):
                self.epoch_eval()
        bar.close()
        self.save()
        return "finished"

    def _log_bad_data(self) -> None:
        """After an epoch's batches: the corrupt samples this rank's loader skipped (all workers;
        each worker also warned per sample), as metrics and one line, once there are any."""
        bad, read = self.train_loader.bad_data()
        if bad:
            self.logger.log({"data/bad": bad, "data/read": read}, self.step)
            print(
                f"rank {self.env.rank}: {bad} bad samples/shards skipped of {read} read so far "
                f"(stops above data.max_bad_fraction={self.cfg.data.max_bad_fraction} per worker)",
                flush=True,
            )

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """One loader batch: an L2W iteration (two half steps), or one plain step for the baseline."""
        if self.cfg.train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
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
        if self.ema is not None:
            self.ema.update(self.backend.module, step=self.step)
        return stats

    def plain_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
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
        values = per_exit.detach().cpu().tolist()
        return {"loss": sum(values), **{f"ce/{k}": v for k, v in enumerate(values)}}

    @torch.no_grad()
    def sample_weights(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The weights [B, K] the current weight net gives this batch (for W&B histograms)."""
        module = self.backend.module
        was_training = module.training
        module.eval()
        with self._autocast():
            logits = module(x)
        module.train(was_training)
        ce = per_sample_ce(logits, y)
        features = wpn_features(ce, max_confidence(logits), self.cfg.meta.input)
        return normalize_weights(self.weight_net(features.float()), self.cfg.meta.epsilon, self.cfg.meta.constraint)

    # Evaluation ---------------------------------------------------------------------------
    def eval_module(self) -> torch.nn.Module:
        """The network evaluated: the EMA copy when the run keeps one."""
        return self.ema.module if self.ema is not None else self.backend.module

    def epoch_eval(self) -> None:
        """Held-out anytime accuracy at an epoch end; keeps the best-k checkpoints by the last exit."""
        model = self.eval_module()
        model = torch.compile(model) if self.cfg.train.compile else model
        loader = eval_loader(self.cfg, self.env, self.data_spec, "holdout")
        logits, labels = collect_logits(model, loader, self.device, self.cfg.train.precision)
        rows = anytime(logits, labels, self.exit_flops)
        self.logger.log({f"holdout/top1_exit{r['exit']}": r["top1"] for r in rows}, self.step)
        state = self.state_dict()  # on every rank: gathering a sharded optimizer state is collective
        if self.env.rank == 0:
            self.ckpt.consider_best(state, rows[-1]["top1"], self.step)

    def evaluate(self) -> dict[str, Any]:
        """The run's final evaluation (:func:`~l2w_dist.evaluate.evaluate_run`, as l2w-eval does
        it), written to the run folder and logged."""
        result = evaluate_run(self.eval_module(), self.cfg, self.env, self.data_spec, self.run_dir)
        if self.env.rank == 0:
            self.logger.log_eval(result, self.step)
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
            "wandb_id": getattr(self, "logger", None) and self.logger.run_id,
            "exit_flops": list(self.exit_flops),
            "config": self.cfg.to_dict(),
        }

    def save(self, periodic: bool = False) -> None:
        state = self.state_dict()  # collective for sharded optimizers: every rank takes part
        if self.env.rank == 0:
            self.ckpt.save_last(state)
            if periodic:
                self.ckpt.save_periodic(state, self.step)

    def _maybe_resume(self) -> str | None:
        if not self.ckpt.last.is_file():
            return None
        state = load_checkpoint(self.ckpt.last, map_location=self.device)
        if state["world_size"] != self.env.world_size and self.cfg.dist.zero_stage:
            raise ValueError(
                f"{self.ckpt.last} was written by {state['world_size']} ranks; ZeRO state cannot be "
                f"resumed on {self.env.world_size}"
            )
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
        if self.env.rank == 0:
            print(f"resumed from {self.ckpt.last} at step {self.step}", flush=True)
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
        return autocast(self.device, self.cfg.train.precision)

    def close(self) -> None:
        self.logger.close()
