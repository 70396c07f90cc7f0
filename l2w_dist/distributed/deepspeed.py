"""DeepSpeed ZeRO 0/1/2 as a training backend: the engine, its real update, its config.

Everything DeepSpeed-specific lives here and in :mod:`l2w_dist.distributed.zero_state`
(gathering ZeRO's sharded optimizer state into full per-parameter state); the algorithm
never imports either. ``deepspeed`` itself is imported only when a DeepSpeed backend is
built (it is slow to import).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from l2w_dist.distributed.backends import TrainBackend
from l2w_dist.distributed.env import DistEnv
from l2w_dist.distributed.utils import parameter_names
from l2w_dist.distributed.zero_state import ZeroStateView
from l2w_dist.meta.update import ParamOptState, optimizer_kind, param_state

ZERO_STAGES = (0, 1, 2)

ZERO3_REFUSAL = (
    "DeepSpeed ZeRO stage 3 is not supported with L2W: stage 3 partitions the parameters "
    "themselves and gathers them only inside each submodule's forward hooks, but the L2W "
    "pseudo step evaluates the model at θ′ = θ − lr·(optimizer step) with "
    "torch.func.functional_call / torch.func.jvp, which needs every full parameter, its full "
    "gradient and its full optimizer state at once, outside those hooks. Materialising them on "
    "each rank would hold the whole model and optimizer state per GPU — exactly what stage 3 "
    "exists to avoid — so it would be stage 2 with extra all-gathers. Use zero_stage=2 "
    "(optimizer state and gradients sharded) or 1."
)


class DeepSpeedUpdate:
    """:class:`RealUpdate` over a DeepSpeed engine (ZeRO stage 0, 1 or 2).

    ``virtual_state`` gathers the full optimizer state from the ZeRO partitions (one
    all-gather per param group and buffer: a collective, so every rank must call it,
    which the L2W step does). Gathering was chosen over "each rank steps its own shard
    and all-gathers θ′" because the L2W step needs more than θ′: the ``jvp`` engine
    scales its tangent by the optimizer's per-parameter derivative (for AdamW a
    diagonal built from ``exp_avg_sq``), and the algorithm is written once, for full
    tensors, with no knowledge of shards. The traffic is the same |θ| floats per buffer
    either way (comparable to the gradient all-reduce the pseudo step already does),
    and the gathered copy is freed after the step.
    """

    def __init__(self, engine, module: nn.Module, kind: str, param_groups: list[list[nn.Parameter]]):
        self.engine = engine
        self.module = module  # the plain module under the engine (RealUpdate.module)
        self.kind = kind
        self.steps = 0  # real steps taken (kept in the portable state dict)
        self._param_groups = param_groups  # the user's groups, before DeepSpeed flattened them
        zero = engine.optimizer
        self.view = ZeroStateView(zero, module, kind) if hasattr(zero, "single_partition_of_fp32_groups") else None

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The base torch optimizer: its param_groups carry lr etc. (under ZeRO, over flat shards)."""
        opt = self.engine.optimizer
        return opt.optimizer if self.view is not None else opt

    def _named_full_state(self, names: set[str] | None = None) -> dict[str, ParamOptState]:
        if self.view is not None:
            return self.view.full_state(names)
        # stage 0: the engine's optimizer is the torch optimizer over the real parameters
        name_of = parameter_names(self.module)
        out = {}
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                name = name_of[id(p)]
                if names is None or name in names:
                    out[name] = param_state(self.kind, group, self.optimizer.state.get(p, {}))
        return out

    def virtual_state(self, params: dict[str, Tensor]) -> dict[str, ParamOptState]:
        out = self._named_full_state(set(params))
        missing = sorted(set(params) - set(out))
        if missing:
            raise KeyError(f"DeepSpeed optimizes no parameter named {missing[:5]} (frozen or not in the engine?)")
        return out

    def no_sync(self) -> contextlib.AbstractContextManager:
        """Nothing to suppress: ZeRO reduces gradients in ``engine.backward`` only (see
        :func:`_only_engine_backward_is_real`), never in a plain forward."""
        return contextlib.nullcontext()

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    def backward(self, loss: Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()
        self.steps += 1

    def step_with_grads(self, grads: dict[str, Tensor], params: dict[str, Tensor]) -> None:
        """Real step from given (already globally averaged) gradients (``real_weights="pre_update"``).

        ZeRO only accepts gradients through its backward hooks (which reduce-scatter them
        into the owning rank's partition), so the gradients go in as the backward of the
        surrogate ``Σ ⟨p, g⟩``, whose gradient is ``g``; ZeRO's average of the identical
        ``g`` over ranks is ``g`` again. Cost: one gradient reduce-scatter, as a real backward.
        """
        surrogate = sum((p * grads[n].detach()).sum() for n, p in params.items())
        self.engine.backward(surrogate)
        self.step()

    # -- portable (torch-format) optimizer state dict -------------------------------------
    def _indexed_params(self) -> Iterator[tuple[int, int, nn.Parameter]]:
        idx = 0
        for gi, params in enumerate(self._param_groups):
            for p in params:
                yield gi, idx, p
                idx += 1

    def state_dict(self) -> dict:
        full = self._named_full_state()
        name_of = parameter_names(self.module)
        state: dict[int, dict[str, Tensor]] = {}
        group_params: list[list[int]] = [[] for _ in self._param_groups]
        for gi, idx, p in self._indexed_params():
            group_params[gi].append(idx)
            s = full.get(name_of.get(id(p), ""))
            if s is None:
                continue
            if self.kind == "sgd" and s.momentum_buffer is not None:
                state[idx] = {"momentum_buffer": s.momentum_buffer.detach().clone()}
            elif self.kind == "adamw" and s.exp_avg is not None:
                state[idx] = {
                    "step": torch.tensor(float(s.step)),
                    "exp_avg": s.exp_avg.detach().clone(),
                    "exp_avg_sq": s.exp_avg_sq.detach().clone(),
                }
        groups = []
        for gi, g in enumerate(self.optimizer.param_groups):
            hyper = {k: copy.deepcopy(v) for k, v in g.items() if k != "params"}
            groups.append({**hyper, "params": group_params[gi]})
        return {"state": state, "param_groups": groups, "l2w_real_steps": self.steps}

    def load_state_dict(self, sd: dict) -> None:
        if len(sd["param_groups"]) != len(self._param_groups):
            raise ValueError(
                f"optimizer state dict has {len(sd['param_groups'])} param groups, this optimizer "
                f"{len(self._param_groups)}"
            )
        for g, saved in zip(self.optimizer.param_groups, sd["param_groups"]):
            g.update({k: v for k, v in saved.items() if k != "params"})
        name_of = parameter_names(self.module)
        per_name: dict[str, dict[str, Tensor]] = {}
        step = 0
        for _gi, idx, p in self._indexed_params():
            st = sd["state"].get(idx, sd["state"].get(str(idx)))
            if st:
                per_name[name_of[id(p)]] = {k: v for k, v in st.items() if k != "step"}
                if "step" in st:
                    step = max(step, int(float(st["step"])))
        self.steps = int(sd.get("l2w_real_steps", step))
        if self.view is not None:
            self.view.load_full_state(per_name, step)
            return
        by_name = dict(self.module.named_parameters())
        for name, bufs in per_name.items():
            st = self.optimizer.state.setdefault(by_name[name], {})
            st.update({k: v.to(by_name[name]) for k, v in bufs.items()})
            if self.kind == "adamw":
                st["step"] = torch.tensor(float(step))


class DeepSpeedBackend(TrainBackend):
    kind = "deepspeed"

    def optimizer_state_dict(self) -> dict:
        return self.update.state_dict()  # type: ignore[attr-defined]

    def load_optimizer_state_dict(self, sd: dict) -> None:
        self.update.load_state_dict(sd)  # type: ignore[attr-defined]


def _only_engine_backward_is_real(engine) -> None:
    """Let ``torch.autograd.grad`` through an engine forward be just a gradient, not a training backward.

    DeepSpeed 0.19 hooks the outputs of ``engine(x)``: the first backward that reaches
    them starts ZeRO's backward prologue and queues its gradient-reduction epilogue. The
    L2W step differentiates the shared train forward twice — ``autograd.grad`` for the
    pseudo-step gradient, then ``engine.backward`` for the real update — and only the
    second is a training backward (the first must not reduce or clear anything; it
    accumulates no ``.grad``, so ZeRO's per-parameter hooks do not fire for it). We run
    the prologue only inside ``engine.backward``, which DeepSpeed flags with
    ``_running_engine_backward``.
    """
    for attr in ("_backward_prologue", "_running_engine_backward"):
        if not hasattr(engine, attr):
            raise RuntimeError(
                f"this DeepSpeed version's engine has no {attr}; the L2W DeepSpeed backend was written "
                "for DeepSpeed 0.19 (see l2w_dist/distributed/backends.py)"
            )
    prologue = engine._backward_prologue

    def guarded_prologue() -> None:
        if engine._running_engine_backward:
            prologue()

    engine._backward_prologue = guarded_prologue


def deepspeed_config(
    zero_stage: int,
    grad_clip: float | None,
    precision: str,
    micro_batch_size: int = 1,
    overrides: dict | None = None,
) -> dict:
    """The explicit DeepSpeed config we run with (every default that matters spelled out).

    ``gradient_clipping`` defaults to 1.0 in DeepSpeed; we set it to ``grad_clip`` or 0
    (off) so DeepSpeed and DDP apply the same update. ``zero_allow_untested_optimizer``
    lets a plain torch optimizer be sharded (DeepSpeed's own fused optimizers would
    compile C++ ops for minutes on first use). bf16 uses DeepSpeed's ``torch_autocast``,
    which keeps fp32 parameters and master state, as DDP + autocast does.
    """
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": float(grad_clip or 0.0),
        "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":
        cfg["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    if overrides:
        cfg.update(overrides)
    return cfg


def build_deepspeed_backend(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    env: DistEnv,
    zero_stage: int,
    grad_clip: float | None,
    precision: str,
    micro_batch_size: int = 1,
    overrides: dict | None = None,
) -> DeepSpeedBackend:
    """``deepspeed.initialize`` over ``model`` (already on its device) and ``optimizer``."""
    import deepspeed  # imported here: it is slow to import and only this backend needs it

    kind_opt = optimizer_kind(optimizer)
    grouped = [list(g["params"]) for g in optimizer.param_groups]
    cfg = deepspeed_config(zero_stage, grad_clip, precision, micro_batch_size, overrides)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=cfg, dist_init_required=False)
    _only_engine_backward_is_real(engine)
    update = DeepSpeedUpdate(engine, engine.module, kind_opt, grouped)
    return DeepSpeedBackend(engine, engine.module, update, env, precision)
