"""One L2W-DEN iteration (docs/algorithm.md §2) — read this file to understand the algorithm.

An iteration splits the loader batch into halves X1, X2 and runs two *half steps*,
(train, meta) = (X1, X2) then (X2, X1). A half step:

1. **Shared train forward** at θ through the (possibly DDP / DeepSpeed) model: per-sample
   per-exit cross-entropy ``l[i,k]`` (label smoothing applied) and confidences.
2. **Meta step** (when ``do_meta``): weights ``w = 1 + ε(g_φ(l) - mean)``; pseudo-gradient
   ``g = ∇θ Σ_k mean_i w[i,k] l[i,k]``; virtual step ``θ' = step(θ, g)`` of the *real*
   optimizer (its lr, momentum / Adam moments); meta loss on the meta half at θ' with the
   test-time-like exit allocation; gradient to φ through θ'; ``meta_optimizer.step()``.
   Two engines compute that gradient:
   - ``jvp`` (default): ``∂meta/∂w[i,k] = ⟨D·u, ∇θ l[i,k]⟩ / B`` with ``u = ∇θ' meta`` and
     ``D = ∂θ'/∂g`` (diagonal): ONE forward-mode JVP of the train-half forward along D·u
     gives all B×K products; then one backward through the weight net. No double backward.
   - ``autograd``: the reference: ``create_graph=True`` through the virtual step.
3. **Real update**: weights from the *updated* weight net (``real_weights="updated"``) on the
   same train forward (re-used: θ did not change), backward through the wrapper (so DDP /
   DeepSpeed synchronise), ``optimizer.step()``. ``"pre_update"`` instead steps with the
   pseudo-step gradient (weights before the meta step): one backward fewer. That real step
   *is* the virtual step, so θ becomes θ' and the second half step's train forward (the meta
   half at θ') is the first half step's meta forward: ``l2w_iteration`` runs it once.

Distributed (``sync="global"``, the default when a process group has >1 rank): the
pseudo-gradient is the global-batch mean, ``mat``/``row`` means are global, the exit
allocation is decided on the gathered meta-batch confidences, the meta loss is normalised by
global counts, u is all-reduced before the JVP and the weight-net gradient is summed over
ranks — N ranks compute what one process computes on the concatenated batch.
``sync="local"`` is the released per-GPU behaviour (weight-net gradient averaged over ranks).
The virtual forwards use ``functional_call`` on the one model with scratch copies of its
buffers, so BatchNorm running statistics change exactly as in one plain step.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import forward_ad as fwAD
from torch.func import functional_call

from . import param_dicts
from .allocation import allocate_exits, constant, meta_loss_from_allocation, target_counts
from .collectives import Collectives, default_collectives
from .forward_mode import FusedBatchNormJVP
from .settings import L2WConfig
from .update import RealUpdate, TorchOptimizerUpdate
from .virtual_step import step_derivative, virtual_step
from .weight_net import normalize_weights, wpn_features


def l2w_iteration(
    model: nn.Module,
    weight_net: nn.Module,
    optimizer: torch.optim.Optimizer | RealUpdate,
    meta_optimizer: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    cfg: L2WConfig,
    step: int = 0,
    meta_interval: int = 1,
    collectives: Collectives | None = None,
) -> dict[str, Tensor]:
    """Both half steps of one loader batch: (X1, X2) then (X2, X1); stats averaged over the two.

    ``model`` is what forward is called on (DDP / DeepSpeed wrapper, or the plain module);
    ``optimizer`` a :class:`RealUpdate` (whose ``module`` is the plain module behind the
    wrapper) or a bare ``torch.optim`` optimizer of a plain ``model``.

    Capture-safe: nothing in the iteration reads a device value back to the host (no
    ``.item()``, no data-dependent shapes), so it can be queued without waiting for the
    device and captured as a CUDA graph; the stats are 0-dim device tensors (see
    :func:`l2w_half_step`), for the caller to copy to the host when it logs.
    """
    if meta_interval < 1:
        raise ValueError(f"meta_interval={meta_interval} must be >= 1")
    half = x.shape[0] // 2
    if half == 0 or x.shape[0] != 2 * half:
        raise ValueError(f"l2w_iteration needs an even batch size >= 2, got {x.shape[0]}")
    first, second = (x[:half], y[:half]), (x[half:], y[half:])
    do_meta = step % meta_interval == 0
    ctx = _HalfStepContext.build(model, weight_net, optimizer, cfg, collectives)
    # pre_update: the real step of half step a is its virtual step, so a's meta forward (second
    # half at θ') is b's train forward (second half at θ): run once, one forward of ~17 fewer.
    chain = do_meta and _reuses_meta_forward(ctx.real, cfg, ctx.coll)
    a, carried = _half_step(ctx, meta_optimizer, first, second, do_meta, keep_meta_forward=chain)
    b, _ = _half_step(ctx, meta_optimizer, second, first, do_meta, reuse=carried)
    return _stats_by_name((a + b) / 2)


def l2w_half_step(
    model: nn.Module,
    weight_net: nn.Module,
    optimizer: torch.optim.Optimizer | RealUpdate,
    meta_optimizer: torch.optim.Optimizer,
    train: tuple[Tensor, Tensor],
    meta: tuple[Tensor, Tensor],
    cfg: L2WConfig,
    do_meta: bool = True,
    collectives: Collectives | None = None,
) -> dict[str, Tensor]:
    """Steps 1-3 of docs/algorithm.md §2 for one (train, meta) pair; returns 0-dim device
    tensors (views of one flat tensor: one copy brings them all to the host).

    Keys: ``loss`` (weighted train loss of the real update), ``meta_loss`` (global under
    global sync; NaN when ``do_meta`` is False), ``ce/k``, ``w_mean/k``, ``w_std/k``,
    ``w_min/k``, ``w_max/k`` (weights of the real update) and ``alloc/k`` (meta-batch
    allocation counts, global under global sync), k = 0..K-1.
    """
    ctx = _HalfStepContext.build(model, weight_net, optimizer, cfg, collectives)
    stats, _ = _half_step(ctx, meta_optimizer, train, meta, do_meta)
    return _stats_by_name(stats)


@dataclass
class _HalfStepContext:
    """What every part of a half step reads; the same for both half steps of an iteration."""

    model: nn.Module  # forward through it sets up the real update's gradient sync (DDP, DeepSpeed)
    module: nn.Module  # the plain module under it: the virtual forwards' functional_call
    params: dict[str, Tensor]  # θ: the module's trainable parameters, by name
    real: RealUpdate
    weight_net: nn.Module
    coll: Collectives
    cfg: L2WConfig
    global_sync: bool  # sync="global" across more than one rank

    @classmethod
    def build(cls, model, weight_net, optimizer, cfg, collectives) -> _HalfStepContext:
        real = _as_real_update(optimizer)
        coll = collectives if collectives is not None else default_collectives()
        module = model if real.module is None else real.module
        params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        global_sync = cfg.sync == "global" and coll.world_size > 1
        return cls(model, module, params, real, weight_net, coll, cfg, global_sync)

    @property
    def mean_collectives(self) -> Collectives | None:
        """Collectives for the weights' global means (None: means over this rank's batch)."""
        return self.coll if self.global_sync else None


def _as_real_update(optimizer: torch.optim.Optimizer | RealUpdate) -> RealUpdate:
    """A bare torch optimizer steps a plain model; anything else must be a :class:`RealUpdate`."""
    if isinstance(optimizer, torch.optim.Optimizer):
        return TorchOptimizerUpdate(optimizer)
    if not isinstance(optimizer, RealUpdate):
        raise TypeError(
            f"{type(optimizer).__name__} is neither a torch.optim.Optimizer nor a RealUpdate (module, no_sync, "
            "virtual_state, zero_grad, backward, step)"
        )
    return optimizer


def _reuses_meta_forward(
    optimizer: torch.optim.Optimizer | RealUpdate, cfg: L2WConfig, collectives: Collectives | None
) -> bool:
    """Re-use a half step's meta forward as the next train forward? Only when asked to
    (``cfg.reuse_meta_forward``) and when the real update lands exactly on the virtual step's
    θ': with ``pre_update`` it steps the same optimizer from the same state with the same
    gradient, unless the gradient is clipped first, the update is a custom object (DeepSpeed:
    its own step and clipping), or under ``sync="local"`` across ranks (virtual step local,
    real step on the global mean)."""
    if not cfg.reuse_meta_forward or cfg.real_weights != "pre_update" or cfg.hypergrad == "autograd":
        return False
    real = _as_real_update(optimizer)
    if not isinstance(real, TorchOptimizerUpdate) or real.grad_clip_norm:
        return False
    world = (collectives if collectives is not None else default_collectives()).world_size
    return not (cfg.sync == "local" and world > 1)


@dataclass
class _MetaForward:
    """A half step's meta forward (meta half at θ', graph from the θ' leaves, scratch buffers
    after it). When the real step lands exactly on θ' (``pre_update``), it *is* the next half
    step's train forward: same images (the halves swap), same parameters, train mode."""

    logits: list[Tensor]
    theta: dict[str, Tensor]
    buffers: dict[str, Tensor]


def _half_step(
    ctx: _HalfStepContext,
    meta_optimizer: torch.optim.Optimizer,
    train: tuple[Tensor, Tensor],
    meta: tuple[Tensor, Tensor],
    do_meta: bool,
    reuse: _MetaForward | None = None,
    keep_meta_forward: bool = False,
) -> tuple[Tensor, _MetaForward | None]:
    """:func:`l2w_half_step`, its stats as one flat tensor (:func:`_stats`); ``reuse``: this half
    step's train forward, already run (see :class:`_MetaForward`); ``keep_meta_forward``: return
    this half step's meta forward, with θ set exactly to θ' (only valid when
    :func:`_reuses_meta_forward`)."""
    cfg, real = ctx.cfg, ctx.real
    x_tr, y_tr = train
    pre_update = do_meta and cfg.real_weights == "pre_update"
    if pre_update and not hasattr(real, "step_with_grads"):
        raise ValueError(
            f"real_weights='pre_update' needs a RealUpdate with step_with_grads(); {type(real).__name__} "
            "has none (use real_weights='updated')"
        )

    # 1. Shared train forward at θ, through the wrapper (DDP broadcasts buffers, hooks grads).
    logits, grad_wrt = _train_forward(ctx, x_tr, reuse, pre_update)
    ce, features = weight_net_input(logits, y_tr, cfg)
    num_exits = ce.shape[1]

    meta_forward = None
    meta_loss = torch.full((), float("nan"), dtype=ce.dtype, device=ce.device)
    alloc = torch.zeros(num_exits, dtype=ce.dtype, device=ce.device)
    if do_meta:
        # 2. Meta step: hypergradient to φ through the virtual step, then meta_optimizer.step().
        states = real.virtual_state(ctx.params)
        weights = normalize_weights(ctx.weight_net(features), cfg.epsilon, cfg.constraint, ctx.mean_collectives)
        meta_optimizer.zero_grad(set_to_none=True)
        if cfg.hypergrad == "autograd":
            pseudo_grads, meta_loss, alloc = _autograd_meta_grad(ctx, states, ce, weights, meta)
        else:
            pseudo_grads, meta_loss, alloc, meta_forward = _first_order_meta_grad(
                ctx, grad_wrt, states, ce, weights, train, meta, keep_meta_forward
            )
        _reduce_weight_net_grads(ctx)
        meta_optimizer.step()

    # 3. Real update with weights from the updated weight net, re-using the train forward.
    if pre_update:  # the pseudo-step gradient, weighted by the weight net before its step
        weights = weights.detach()
        grads = pseudo_grads
        if not ctx.global_sync and ctx.coll.world_size > 1:  # local sync: the real step still uses the global mean
            grads = param_dicts.all_reduce_mean(grads, ctx.coll)
        real.step_with_grads(grads, ctx.params)  # type: ignore[attr-defined]
        if keep_meta_forward:  # θ = θ' to the last bit (the two step formulas may round differently)
            with torch.no_grad():
                param_dicts.copy_(ctx.params, meta_forward.theta)
        loss = weighted_loss(ce.detach(), weights)
    else:
        with torch.no_grad():
            weights = normalize_weights(ctx.weight_net(features), cfg.epsilon, cfg.constraint, ctx.mean_collectives)
        loss = weighted_loss(ce, weights)
        real.zero_grad()
        real.backward(loss)
        real.step()
    # θ changed in place: drop autocast's cached bf16 copies of the parameters (and of θ'),
    # which it would otherwise keep re-using until the caller's autocast context exits.
    torch.clear_autocast_cache()
    stats = _stats(loss.detach(), meta_loss.detach(), ce.detach(), weights.detach(), alloc)
    return stats, meta_forward


def _train_forward(
    ctx: _HalfStepContext, x: Tensor, reuse: _MetaForward | None, pre_update: bool
) -> tuple[list[Tensor], dict[str, Tensor]]:
    """The train half's logits at θ, and the leaves they were computed from."""
    if reuse is not None:  # run by the previous half step as its meta forward, at θ' == θ
        with torch.no_grad():  # BatchNorm running statistics as this forward leaves them
            param_dicts.copy_(dict(ctx.module.named_buffers()), reuse.buffers)
        return reuse.logits, reuse.theta
    # pre_update never back-propagates this forward through the wrapper: DDP's reducer
    # would wait for that backward (and complain at the next forward) unless told not to.
    with ctx.real.no_sync() if pre_update else contextlib.nullcontext():
        return list(ctx.model(x)), ctx.params


# ----------------------------------------------------------------------------- engines


def _first_order_meta_grad(ctx: _HalfStepContext, grad_wrt, states, ce, weights, train, meta, keep_meta_forward):
    """``jvp`` (forward mode) or ``finite_difference`` hypergradient: first-order passes only.

    Leaves φ.grad holding this rank's share of ∂meta/∂φ. ``grad_wrt``: the leaves the train
    forward started from (θ, or the previous half step's θ' when its forward is re-used).
    Returns the pseudo-step gradient, the meta loss, the allocation counts, and the meta
    forward when ``keep_meta_forward``.
    """
    cfg, coll = ctx.cfg, ctx.coll
    batch = ce.shape[0] * (coll.world_size if ctx.global_sync else 1)
    loss = weighted_loss(ce, weights.detach())
    # "updated" back-propagates the train forward again in the real update; "pre_update" re-uses
    # these gradients, so its train-forward activations can be freed now (lower peak memory).
    grads = param_dicts.grad(loss, grad_wrt, retain_graph=cfg.real_weights != "pre_update")
    if ctx.global_sync:
        grads = param_dicts.all_reduce_mean(grads, coll)
    with torch.no_grad():
        theta = virtual_step({n: p.detach() for n, p in ctx.params.items()}, grads, states)
    theta = {n: t.requires_grad_() for n, t in theta.items()}
    meta_loss, alloc, logits, buffers = _meta_loss(ctx, theta, meta)
    u = param_dicts.grad(meta_loss, theta, retain_graph=keep_meta_forward)
    meta_forward = _MetaForward(logits, theta, buffers) if keep_meta_forward else None
    meta_loss = meta_loss.detach()
    if ctx.global_sync:  # u of the global meta loss; the meta loss value rides along in the same all-reduce
        flat = coll.all_reduce_sum_(torch.cat([*(t.reshape(-1) for t in u.values()), meta_loss.reshape(1)]))
        u, meta_loss = param_dicts.unflatten(flat[:-1], u), flat[-1]
    tangent = param_dicts.scale(step_derivative(grads, states), u)  # D·u
    x_tr, y_tr = train
    if cfg.hypergrad == "finite_difference":
        dots = _central_difference(ctx, tangent, x_tr, y_tr)
    else:
        dots = _forward_mode_dots(ctx, tangent, x_tr, y_tr, ce)
    torch.autograd.backward(weights, dots / batch)
    return grads, meta_loss, alloc, meta_forward


def _forward_mode_dots(ctx: _HalfStepContext, tangent, x_tr, y_tr, ce) -> Tensor:
    """``[B, K]`` directional derivatives ⟨tangent, ∇θ l[i,k]⟩: one forward-mode JVP."""
    buffers = param_dicts.scratch_buffers(ctx.module)
    try:  # plain forward-AD API: BatchNorm may update the scratch buffers in place
        with fwAD.dual_level(), FusedBatchNormJVP():  # BatchNorm's JVP as 2 fused kernels (forward_mode.py)
            duals = {n: fwAD.make_dual(p.detach(), tangent[n]) for n, p in ctx.params.items()}
            out = functional_call(ctx.module, (duals, buffers), (x_tr,))
            dots = fwAD.unpack_dual(per_sample_ce(list(out), y_tr, ctx.cfg.label_smoothing)).tangent
    except (RuntimeError, NotImplementedError) as err:
        raise _forward_ad_error(err) from err
    return torch.zeros_like(ce) if dots is None else dots  # None: no dependence along the tangent


def _central_difference(ctx: _HalfStepContext, tangent, x_tr, y_tr) -> Tensor:
    """The same directional derivatives by ``(l(θ + h v) - l(θ - h v)) / 2h``, ``‖h v‖ = fd_step``.

    Two train-mode forwards (scratch buffers), no AD through the model at all: for models
    that support neither forward mode nor double backward. Error O(h²) plus rounding.
    """
    norm = torch.sqrt(sum((t.float() ** 2).sum() for t in tangent.values()))
    h = ctx.cfg.fd_step / norm.clamp_min(1e-30)
    outs = []
    with torch.no_grad():
        for sign in (1.0, -1.0):
            shifted = {n: p.detach() + (sign * h).to(p.dtype) * tangent[n] for n, p in ctx.params.items()}
            logits = functional_call(ctx.module, (shifted, param_dicts.scratch_buffers(ctx.module)), (x_tr,))
            outs.append(per_sample_ce(list(logits), y_tr, ctx.cfg.label_smoothing))
    return (outs[0] - outs[1]) / (2 * h)


def _autograd_meta_grad(ctx: _HalfStepContext, states, ce, weights, meta):
    """Reference engine: double backward through the virtual step (autograd-aware all-reduces)."""
    coll = ctx.coll
    loss = weighted_loss(ce, weights)
    grads = param_dicts.grad(loss, ctx.params, create_graph=True)
    if ctx.global_sync:
        flat = coll.all_reduce_sum(param_dicts.flatten(grads)) / coll.world_size
        grads = param_dicts.unflatten(flat, grads)
    theta = virtual_step(ctx.params, grads, states)
    meta_loss, alloc, _, _ = _meta_loss(ctx, theta, meta)
    phi = [p for p in ctx.weight_net.parameters() if p.requires_grad]
    for p, g in zip(phi, torch.autograd.grad(meta_loss, phi, retain_graph=True)):
        p.grad = g
    meta_loss = meta_loss.detach()
    if ctx.global_sync:
        meta_loss = coll.all_reduce_sum_(meta_loss.clone())
    return {n: g.detach() for n, g in grads.items()}, meta_loss, alloc


def _meta_loss(ctx: _HalfStepContext, theta, meta):
    """This rank's share of the meta loss at θ' (global counts), the allocation counts, and the
    forward itself (logits, scratch buffers after it)."""
    x_me, y_me = meta
    buffers = param_dicts.scratch_buffers(ctx.module)
    logits = list(functional_call(ctx.module, (theta, buffers), (x_me,)))
    ce = per_sample_ce(logits, y_me, 0.0)
    conf = max_confidence(logits)
    num_exits = ce.shape[1]
    if ctx.global_sync:  # decide on the concatenated meta batch (confidences only), keep our slice
        all_conf = ctx.coll.all_gather_cat(conf)
        counts = target_counts(all_conf.shape[0], num_exits, ctx.cfg.p)
        start = ctx.coll.rank * conf.shape[0]
        exit_of = allocate_exits(all_conf, counts)[start : start + conf.shape[0]]
    else:
        counts = target_counts(conf.shape[0], num_exits, ctx.cfg.p)
        exit_of = allocate_exits(conf, counts)
    alloc = constant(tuple(float(c) for c in counts), ce)
    return meta_loss_from_allocation(ce, exit_of, counts), alloc, logits, buffers


def _reduce_weight_net_grads(ctx: _HalfStepContext) -> None:
    """Global sync: sum the ranks' shares of ∂meta/∂φ. Local: average (as a DDP weight net would)."""
    if ctx.coll.world_size == 1:
        return
    grads = {n: p.grad for n, p in ctx.weight_net.named_parameters() if p.grad is not None}
    if not grads:
        return
    flat = ctx.coll.all_reduce_sum_(param_dicts.flatten(grads))
    if not ctx.global_sync:
        flat /= ctx.coll.world_size
    param_dicts.copy_(grads, param_dicts.unflatten(flat, grads))


# ----------------------------------------------------------------------------- pieces


def per_sample_ce(logits: list[Tensor], targets: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """``[B, K]`` cross-entropy of every sample at every exit (computed in float32 at least)."""
    return torch.stack(
        [F.cross_entropy(_upcast(z), targets, reduction="none", label_smoothing=label_smoothing) for z in logits],
        dim=1,
    )


def weight_net_input(logits: list[Tensor], targets: Tensor, cfg: L2WConfig) -> tuple[Tensor, Tensor]:
    """The ``[B, K]`` per-sample losses (``cfg.label_smoothing`` applied) and the weight net's
    (detached) input for ``cfg.input``, as every L2W step computes them from a forward's logits."""
    ce = per_sample_ce(logits, targets, cfg.label_smoothing)
    confidences = max_confidence(logits) if cfg.input != "loss" else None  # only "conf" / "both" read them
    return ce, wpn_features(ce, confidences, cfg.input)


def max_confidence(logits: list[Tensor]) -> Tensor:
    """``[B, K]`` max-softmax confidence per exit (detached)."""
    return torch.stack([F.softmax(_upcast(z.detach()), dim=1).amax(dim=1) for z in logits], dim=1)


def weighted_loss(ce: Tensor, weights: Tensor) -> Tensor:
    """``L(θ, w) = Σ_k mean_i w[i,k] l[i,k]`` (this rank's batch)."""
    return (weights * ce).sum() / ce.shape[0]


def _upcast(z: Tensor) -> Tensor:
    return z.float() if z.dtype in (torch.float16, torch.bfloat16) else z


def _forward_ad_error(err: Exception) -> Exception:
    """Re-raise a forward-AD failure naming the op (aten op or custom Function) and the module."""
    text = str(err)
    if "forward" not in text.lower() and "jvp" not in text.lower():
        return err
    match = re.search(r"forward AD with (\S+)", text)
    op, module = (match.group(1) if match else None), None
    tb = err.__traceback__
    while tb is not None:  # innermost custom autograd.Function and nn.Module on the stack
        local = tb.tb_frame.f_locals
        cls = local.get("cls") or getattr(local.get("ctx"), "_forward_cls", None)
        if op is None and isinstance(cls, type) and issubclass(cls, torch.autograd.Function):
            op = f"custom autograd.Function {cls.__name__}"
        if isinstance(local.get("self"), nn.Module):
            module = type(local["self"]).__name__
        tb = tb.tb_next
    where = f" (in module {module})" if module else ""
    return NotImplementedError(
        f"hypergrad='jvp' needs forward-mode AD through the model, but {op or 'an op'}{where} does not "
        f"support it: {text.strip().splitlines()[0]} Use L2WConfig(hypergrad='autograd') for this model."
    )


def _stats(loss, meta_loss, ce, weights, alloc) -> Tensor:
    """The half step's stats as one flat device tensor, in the order :func:`_stats_by_name` names."""
    w = weights.to(ce.dtype)
    rows = [
        loss.reshape(1).to(ce.dtype),
        meta_loss.reshape(1).to(ce.dtype),
        ce.mean(0),
        w.mean(0),
        w.std(0, unbiased=False),
        w.amin(0),
        w.amax(0),
        alloc.to(ce.dtype),
    ]
    return torch.cat(rows)


def _stats_by_name(flat: Tensor) -> dict[str, Tensor]:
    """Name the entries of :func:`_stats` (0-dim views, no copy)."""
    k = (flat.shape[0] - 2) // 6
    out = {"loss": flat[0], "meta_loss": flat[1]}
    for j, name in enumerate(("ce", "w_mean", "w_std", "w_min", "w_max", "alloc")):
        for e in range(k):
            out[f"{name}/{e}"] = flat[2 + j * k + e]
    return out
