"""Small multi-exit models and a literal released-style L2W reference for the meta tests.

The reference is written the way the released code does it (a deep copy of the model,
``create_graph=True``, a Python loop for the exit allocation), independently of l2w_dist.meta,
so that the engines can be checked against it. ``reference_half_step`` is the one reference
half step: in one process, or per rank with ``average_gradients=mean_gradients_over_ranks``
(the per-rank, ``sync="local"`` semantics: local data and statistics, gradients averaged).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from l2w_dist.meta import target_counts


class TinyMSDNetLike(nn.Module):
    """Conv stages with BatchNorm and an exit (conv-BN-pool-linear) after each stage."""

    def __init__(self, num_exits: int = 3, num_classes: int = 5, width: int = 4, in_ch: int = 3):
        super().__init__()
        self.stages = nn.ModuleList()
        self.exit_heads = nn.ModuleList()
        ch = in_ch
        for k in range(num_exits):
            out = width * (k + 1)
            self.stages.append(
                nn.Sequential(nn.Conv2d(ch, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU())
            )
            self.exit_heads.append(
                nn.Sequential(
                    nn.Conv2d(out, out, 3, padding=1, bias=False),
                    nn.BatchNorm2d(out),
                    nn.ReLU(),
                    nn.AdaptiveAvgPool2d(1),
                    nn.Flatten(),
                    nn.Linear(out, num_classes),
                )
            )
            ch = out

    def forward(self, x: Tensor) -> list[Tensor]:
        outs = []
        for stage, head in zip(self.stages, self.exit_heads):
            x = stage(x)
            outs.append(head(x))
        return outs


class TinyExitMLP(nn.Module):
    """BatchNorm-free multi-exit MLP (tanh trunk, linear exits)."""

    def __init__(self, num_exits: int = 3, num_classes: int = 5, in_features: int = 12, hidden: int = 10):
        super().__init__()
        self.blocks = nn.ModuleList()
        self.exit_heads = nn.ModuleList()
        d = in_features
        for _ in range(num_exits):
            self.blocks.append(nn.Sequential(nn.Linear(d, hidden), nn.Tanh()))
            self.exit_heads.append(nn.Linear(hidden, num_classes))
            d = hidden

    def forward(self, x: Tensor) -> list[Tensor]:
        outs = []
        x = x.flatten(1)
        for block, head in zip(self.blocks, self.exit_heads):
            x = block(x)
            outs.append(head(x))
        return outs


def make_optimizer(kind: str, params, lr: float = 0.1) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=1e-3)
    if kind == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, dampening=0.1, weight_decay=1e-3)
    if kind == "nesterov":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=1e-3)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr * 0.1, betas=(0.8, 0.9), weight_decay=1e-2)
    raise ValueError(kind)


def loop_allocate(conf: Tensor, counts: list[int]) -> list[int]:
    """The released greedy allocation written literally: a Python loop over samples.

    ``counts[k]`` samples leave at exit k < K (the released ``floor(n * q[k])``), the rest last.
    """
    n, k_exits = conf.shape
    rows = conf.tolist()
    exit_of = [-1] * n
    for k in range(k_exits - 1):
        quota = counts[k]
        order = sorted(range(n), key=lambda i: -rows[i][k])  # stable: ties by lower index
        taken = 0
        for i in order:
            if taken == quota:
                break
            if exit_of[i] == -1:
                exit_of[i] = k
                taken += 1
    return [k_exits - 1 if e == -1 else e for e in exit_of]


def _hand_step(params, grads, optimizer):
    """Hand-written SGD(momentum, nesterov) / AdamW step reading the real optimizer's state."""
    group = optimizer.param_groups[0]
    out = {}
    for (name, p), g in zip(params.items(), grads):
        st = optimizer.state.get(p, {})
        if isinstance(optimizer, torch.optim.SGD):
            d = g + group["weight_decay"] * p
            mom = group["momentum"]
            if mom:
                buf = st.get("momentum_buffer")
                buf = d if buf is None else mom * buf + (1 - group["dampening"]) * d
                d = d + mom * buf if group["nesterov"] else buf
            out[name] = p - group["lr"] * d
        else:
            b1, b2 = group["betas"]
            t = int(st["step"]) + 1 if st else 1
            m = b1 * st["exp_avg"] + (1 - b1) * g if st else (1 - b1) * g
            v = b2 * st["exp_avg_sq"] + (1 - b2) * g * g if st else (1 - b2) * g * g
            mhat, vhat = m / (1 - b1**t), v / (1 - b2**t)
            out[name] = p * (1 - group["lr"] * group["weight_decay"]) - group["lr"] * mhat / (
                _safe_sqrt(vhat) + group["eps"]
            )
    return out


def _safe_sqrt(v):
    """sqrt with derivative 0 at 0 (where g = 0 = m, the exact derivative of the Adam step)."""
    return torch.where(v > 0, v.clamp_min(1e-300).sqrt(), torch.zeros_like(v))


def _normalize(t, eps, constraint):
    if constraint == "mat":
        return 1 + eps * (t - t.mean())
    if constraint == "col":
        return 1 + eps * (t - t.mean(1, keepdim=True))
    return 1 + eps * (t - t.mean(0, keepdim=True))


def _ces(logits, y, ls=0.0):
    return torch.stack([F.cross_entropy(z, y, reduction="none", label_smoothing=ls) for z in logits], 1)


def reference_meta_loss(model, wnet, optimizer, train, meta, cfg, create_graph=True):
    """Meta loss at θ'(φ) the released way: a copy of the model, create_graph, a loop allocation."""
    pseudo = copy.deepcopy(model)
    params = dict(pseudo.named_parameters())
    # the copy shares no state with the real model; read the real optimizer's state by position
    real_params = list(model.parameters())
    logits = pseudo(train[0])
    ce = _ces(logits, train[1], cfg.label_smoothing)
    feats = ce.detach() if cfg.input == "loss" else None
    w = _normalize(wnet(feats), cfg.epsilon, cfg.constraint)
    loss = (w * ce).sum() / ce.shape[0]
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)
    # hand step needs the real optimizer's state keyed by the real parameters
    theta = _hand_step(dict(zip(params, real_params)), grads, optimizer)
    # θ' as a function of the copy's parameters only through grads; θ itself is the real value
    meta_logits = functional_call(pseudo, theta, (meta[0],))
    mce = _ces(meta_logits, meta[1])
    conf = torch.stack([F.softmax(z, 1).amax(1) for z in meta_logits], 1).detach()
    exit_of = loop_allocate(conf, target_counts(mce.shape[0], mce.shape[1], cfg.p))
    total = 0
    for k in range(mce.shape[1]):
        members = [i for i, e in enumerate(exit_of) if e == k]
        if members:
            total = total + mce[members, k].mean()
    return total


def mean_gradients_over_ranks(params: Iterable[nn.Parameter]) -> None:
    """Average each parameter's gradient over the ranks of the default process group, by hand."""
    world = dist.get_world_size()
    for p in params:
        dist.all_reduce(p.grad)
        p.grad /= world


def reference_half_step(
    model,
    wnet,
    optimizer,
    meta_optimizer,
    train,
    meta,
    cfg,
    average_gradients: Callable[[Iterable[nn.Parameter]], None] | None = None,
) -> float:
    """Released-style half step: copy + create_graph meta step, then a real forward/backward/step.

    ``average_gradients`` (e.g. :func:`mean_gradients_over_ranks`) is applied to the weight net's
    gradient before its step and to the model's gradient before the real step.
    """
    meta_loss = reference_meta_loss(model, wnet, optimizer, train, meta, cfg)
    meta_optimizer.zero_grad()
    meta_loss.backward()
    if average_gradients is not None:
        average_gradients(wnet.parameters())
    meta_optimizer.step()
    logits = model(train[0])
    ce = _ces(logits, train[1], cfg.label_smoothing)
    with torch.no_grad():
        w = _normalize(wnet(ce.detach()), cfg.epsilon, cfg.constraint)
    loss = (w * ce).sum() / ce.shape[0]
    optimizer.zero_grad()
    loss.backward()
    if average_gradients is not None:
        average_gradients(model.parameters())
    optimizer.step()
    return float(meta_loss.detach())


def max_rel_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    worst = 0.0
    for k in a:
        scale = b[k].abs().max().item()
        worst = max(worst, (a[k] - b[k]).abs().max().item() / max(scale, 1e-300))
    return worst
