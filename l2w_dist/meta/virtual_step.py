"""The virtual (pseudo) optimizer step θ' = step(θ, g) read from the real optimizer's state,
and its derivative ∂θ'/∂g, which the forward-mode hypergradient folds into its tangent.

Both follow ``torch.optim.SGD`` and ``torch.optim.AdamW`` exactly (single-tensor
semantics), for one step taken *from* the current state without modifying it. The lr and
the step count are host numbers or the real optimizer's own 0-dim device tensors
(``update.DeviceHyperparameters``); with tensors nothing is read back to the host (the
bias corrections are computed on the device, in float64 as torch's fused kernels do).

SGD:   d = g + wd·θ;  buf' = d (no buffer yet) or m·buf + (1-damp)·d;
       θ' = θ - lr·(d + m·buf') (nesterov) or θ - lr·buf' (momentum) or θ - lr·d.
       ∂θ'/∂g = -lr·k, k = 1 before a buffer exists and (1-damp) after; nesterov -lr·(1+m·k);
       no momentum: -lr.
AdamW: t = step+1; m' = β1 m + (1-β1) g; v' = β2 v + (1-β2) g²;
       θ' = θ(1 - lr·wd) - (lr/bc1)·m'/den,  den = sqrt(v')/sqrt(bc2) + eps.
       ∂θ'/∂g = -(lr/bc1)·[(1-β1)/den - m'·(1-β2)·g / (den²·sqrt(v')·sqrt(bc2))]  (elementwise;
       the second term is 0 where v' = 0, i.e. where g = 0 and v = 0).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .update import ParamOptState


def virtual_step(
    params: dict[str, Tensor],
    grads: dict[str, Tensor],
    states: dict[str, ParamOptState],
    adamw_foreach: bool | None = None,
) -> dict[str, Tensor]:
    """θ' for every named parameter; differentiable in ``grads`` (and ``params``) when they carry graphs.

    Without a graph (the jvp engine) SGD parameters are stepped by multi-tensor ops, and
    AdamW parameters too when ``adamw_foreach`` (default: on accelerators, as torch.optim
    does: on a CPU, AdamW's dozen full passes run faster tensor by tensor, while the data is
    in cache; docs/benchmarks/meta.md).
    """
    out: dict[str, Tensor] = {}
    if not torch.is_grad_enabled():
        out = _sgd_foreach(params, grads, states)
        if _use_adamw_foreach(adamw_foreach, params):
            out |= _adamw_foreach(params, grads, states)
    for name, p in params.items():
        if name in out:
            continue
        s, g = states[name], grads[name]
        if s.kind == "sgd":
            d = g if s.weight_decay == 0 else g + s.weight_decay * p
            if s.momentum != 0:
                if s.momentum_buffer is None:
                    buf = d
                else:
                    buf = s.momentum * s.momentum_buffer + (1 - s.dampening) * d
                d = d + s.momentum * buf if s.nesterov else buf
            out[name] = p - s.lr * d
        elif s.kind == "adamw":
            m, v = _adam_moments(s, g)
            (step_size,), (bc2_sqrt,) = _adamw_scalars([s])
            den = safe_sqrt(v) / bc2_sqrt + s.eps
            out[name] = p * (1 - s.lr * s.weight_decay) - step_size * m / den
        else:
            raise ValueError(f"optimizer kind {s.kind!r} is not one of ('sgd', 'adamw')")
    return out


def _sgd_foreach(
    params: dict[str, Tensor], grads: dict[str, Tensor], states: dict[str, ParamOptState]
) -> dict[str, Tensor]:
    """The SGD branch of :func:`virtual_step` for all SGD parameters at once, without autograd.

    Parameters sharing hyper-parameters (and whether a momentum buffer exists) are stepped
    with ``torch._foreach_*`` ops, as ``torch.optim.SGD(foreach=True)`` does: a handful of
    kernels per group instead of ~7 per parameter (MSDNet has 340-570 parameter tensors,
    and on a GPU each small kernel costs a launch). Same formula as the loop.
    """
    groups: dict[tuple, list[str]] = {}
    for name, s in states.items():
        if s.kind == "sgd" and name in params:
            key = (_key(s.lr), s.weight_decay, s.momentum, s.dampening, s.nesterov, s.momentum_buffer is None)
            groups.setdefault(key, []).append(name)
    out: dict[str, Tensor] = {}
    for (_, wd, momentum, dampening, nesterov, no_buffer), names in groups.items():
        lr = states[names[0]].lr
        p = [params[n] for n in names]
        d = [grads[n] for n in names]
        if wd != 0:
            d = torch._foreach_add(d, p, alpha=wd)
        if momentum != 0:
            if no_buffer:
                buf = d
            else:
                buf = torch._foreach_mul([states[n].momentum_buffer for n in names], momentum)
                torch._foreach_add_(buf, d, alpha=1 - dampening)
            d = torch._foreach_add(d, buf, alpha=momentum) if nesterov else buf
        if isinstance(lr, Tensor):  # a tensor multiplier, never a host copy of it
            out.update(zip(names, torch._foreach_sub(p, torch._foreach_mul(d, lr))))
        else:
            out.update(zip(names, torch._foreach_add(p, d, alpha=-lr)))
    return out


def _adamw_groups(names, states: dict[str, ParamOptState]) -> dict[tuple, list[str]]:
    """AdamW parameters sharing hyper-parameters and whether moments exist (step counts may
    differ: the bias corrections are per parameter, :func:`_adamw_scalars`)."""
    groups: dict[tuple, list[str]] = {}
    for name in names:
        s = states[name]
        if s.kind == "adamw":
            key = (_key(s.lr), s.weight_decay, s.betas, s.eps, s.exp_avg is None, s.exp_avg_sq is None)
            groups.setdefault(key, []).append(name)
    return groups


def _adamw_scalars(group: list[ParamOptState]) -> tuple[list, list]:
    """Per parameter of one group: the step size ``lr / (1 - β1^t)`` and ``sqrt(1 - β2^t)``, t = step + 1.

    Host numbers from host lr and step counts (as torch's own single-tensor AdamW computes
    them); otherwise 0-dim float64 device tensors from one stacked computation (as torch's
    fused AdamW computes them from its device step counts), without a host sync.
    """
    s0 = group[0]
    b1, b2 = s0.betas
    steps = [s.step for s in group]
    device_values = [v for v in (s0.lr, *steps) if isinstance(v, Tensor)]
    if not device_values:
        return [s0.lr / (1 - b1 ** (t + 1)) for t in steps], [math.sqrt(1 - b2 ** (t + 1)) for t in steps]
    device = device_values[0].device
    t = torch.stack(
        [
            t.to(torch.float64) if isinstance(t, Tensor) else torch.full((), t, dtype=torch.float64, device=device)
            for t in steps
        ]
    )
    t = t + 1
    step_size = s0.lr / (1 - torch.pow(b1, t))
    return list(step_size.unbind()), list((1 - torch.pow(b2, t)).sqrt().unbind())


def _adam_moments_foreach(names: list[str], grads, states) -> tuple[list[Tensor], list[Tensor]]:
    """:func:`_adam_moments` (m', v') for a group of one ``_adamw_groups`` key, by multi-tensor ops."""
    s0 = states[names[0]]
    b1, b2 = s0.betas
    g = [grads[n] for n in names]
    if s0.exp_avg is None:  # no moments yet: m' = (1-β1) g, v' = (1-β2) g²
        m, v = torch._foreach_mul(g, 1 - b1), torch._foreach_mul(torch._foreach_mul(g, g), 1 - b2)
    else:
        m = torch._foreach_mul([states[n].exp_avg for n in names], b1)
        torch._foreach_add_(m, g, alpha=1 - b1)
        v = torch._foreach_mul([states[n].exp_avg_sq for n in names], b2)
        torch._foreach_addcmul_(v, g, g, value=1 - b2)
    return m, v


def _adamw_foreach(
    params: dict[str, Tensor], grads: dict[str, Tensor], states: dict[str, ParamOptState]
) -> dict[str, Tensor]:
    """The AdamW branch of :func:`virtual_step` for all AdamW parameters, without autograd: a
    few dozen kernels per group instead of ~12 per parameter (a ViT has ~150 tensors)."""
    out: dict[str, Tensor] = {}
    for (_, wd, _betas, eps, no_m, no_v), names in _adamw_groups(params, states).items():
        if no_m != no_v:  # one moment without the other: leave it to the per-parameter formula
            continue
        lr = states[names[0]].lr
        m, v = _adam_moments_foreach(names, grads, states)
        step_size, bc2_sqrt = _adamw_scalars([states[n] for n in names])
        den = torch._foreach_sqrt(v)  # v' >= 0: plain sqrt is exact here (no graph, no derivative)
        torch._foreach_div_(den, bc2_sqrt)
        torch._foreach_add_(den, eps)
        theta = torch._foreach_mul([params[n] for n in names], 1 - lr * wd)
        if isinstance(step_size[0], Tensor):  # device scalars: no addcdiv overload takes them
            update = torch._foreach_div(m, den)
            torch._foreach_mul_(update, step_size)
            torch._foreach_sub_(theta, update)
        else:
            torch._foreach_addcdiv_(theta, m, den, [-x for x in step_size])
        out.update(zip(names, theta))
    return out


def _adamw_derivative_foreach(grads: dict[str, Tensor], states: dict[str, ParamOptState]) -> dict[str, Tensor]:
    """The AdamW branch of :func:`step_derivative` by multi-tensor ops (same formula)."""
    out: dict[str, Tensor] = {}
    for (_lr, _wd, (b1, b2), eps, no_m, no_v), names in _adamw_groups(grads, states).items():
        if no_m != no_v:
            continue
        m, v = _adam_moments_foreach(names, grads, states)
        step_size, bc2_sqrt = _adamw_scalars([states[n] for n in names])
        sq = torch._foreach_sqrt(v)
        den = torch._foreach_div(sq, bc2_sqrt)
        torch._foreach_add_(den, eps)
        # second = m (1-β2) g / (den² sq sqrt(bc2)), 0 where sq = 0 (then m = g = 0 as well)
        second = torch._foreach_mul(m, [grads[n] for n in names])
        denom = torch._foreach_mul(den, den)
        torch._foreach_mul_(denom, torch._foreach_clamp_min(sq, torch.finfo(sq[0].dtype).tiny))
        torch._foreach_mul_(denom, bc2_sqrt)
        torch._foreach_div_(second, denom)
        torch._foreach_mul_(second, 1 - b2)
        first_term = torch._foreach_reciprocal(den)
        torch._foreach_mul_(first_term, 1 - b1)
        torch._foreach_sub_(first_term, second)
        torch._foreach_mul_(first_term, step_size)
        torch._foreach_neg_(first_term)
        for name, d, root, size in zip(names, first_term, sq, step_size):
            # where sq = 0: (1-β1)/den only (second term 0), as the per-parameter formula
            out[name] = torch.where(root > 0, d, -size * (1 - b1) / eps)
    return out


def _use_adamw_foreach(flag: bool | None, tensors: dict[str, Tensor]) -> bool:
    if flag is not None:
        return flag
    return any(t.device.type != "cpu" for t in tensors.values())


def step_derivative(
    grads: dict[str, Tensor], states: dict[str, ParamOptState], adamw_foreach: bool | None = None
) -> dict[str, Tensor | float]:
    """The diagonal ∂θ'/∂g per parameter: a float for SGD, a tensor for AdamW (no graph);
    ``adamw_foreach`` as in :func:`virtual_step`."""
    with torch.no_grad():
        out: dict[str, Tensor | float] = {}
        if _use_adamw_foreach(adamw_foreach, grads):
            out.update(_adamw_derivative_foreach(grads, states))
        shared: dict[tuple, Tensor | float] = {}  # one SGD factor per group: scaled by one multi-tensor op
        for name, g in grads.items():
            if name not in out:
                s = states[name]
                key = (s.kind, _key(s.lr), s.momentum, s.dampening, s.nesterov, s.momentum_buffer is None)
                if s.kind != "sgd":
                    out[name] = derivative_of_one(s, g)
                else:
                    out[name] = shared[key] if key in shared else shared.setdefault(key, derivative_of_one(s, g))
    return {name: out[name] for name in grads}


def derivative_of_one(s: ParamOptState, g: Tensor) -> Tensor | float:
    """∂θ'/∂g of one parameter (the formula the multi-tensor path follows)."""
    if s.kind == "sgd":
        if s.momentum == 0:
            return -s.lr
        k = 1.0 if s.momentum_buffer is None else 1.0 - s.dampening
        return -s.lr * (1.0 + s.momentum * k) if s.nesterov else -s.lr * k
    if s.kind == "adamw":
        b1, b2 = s.betas
        m, v = _adam_moments(s, g)
        (step_size,), (bc2_sqrt,) = _adamw_scalars([s])
        sq = v.sqrt()
        den = sq / bc2_sqrt + s.eps
        safe_sq = sq.clamp_min(torch.finfo(sq.dtype).tiny)
        second = m * (1 - b2) * g / (den * den * safe_sq * bc2_sqrt)
        second = torch.where(sq > 0, second, torch.zeros_like(second))
        return -step_size * ((1 - b1) / den - second)
    raise ValueError(f"optimizer kind {s.kind!r} is not one of ('sgd', 'adamw')")


def _key(value: float | Tensor) -> object:
    """A hashable stand-in for a host number or a device tensor (by identity: comparing
    tensors with ``==`` would read their values back to the host)."""
    return ("tensor", id(value)) if isinstance(value, Tensor) else value


def safe_sqrt(v: Tensor) -> Tensor:
    """sqrt whose derivative at 0 is 0 instead of inf.

    Where v' = 0 the gradient is 0 (and m' = 0), so the exact derivative of m'/den is
    (1-β1)/den; plain ``sqrt`` would give 0·inf = NaN in the double-backward engine.
    """
    positive = v > 0
    return torch.where(positive, v.clamp_min(torch.finfo(v.dtype).tiny).sqrt(), torch.zeros_like(v))


def _adam_moments(s: ParamOptState, g: Tensor) -> tuple[Tensor, Tensor]:
    b1, b2 = s.betas
    m = (1 - b1) * g if s.exp_avg is None else b1 * s.exp_avg + (1 - b1) * g
    v = (1 - b2) * g * g if s.exp_avg_sq is None else b2 * s.exp_avg_sq + (1 - b2) * g * g
    return m, v
