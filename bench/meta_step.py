"""Cost of one L2W iteration vs a plain multi-exit training step.

Variants, all on the same model, batch and device, each in a fresh subprocess so that peak
memory is measured per variant:
  plain       one standard step on the whole batch (sum of per-exit CE, uniform weights)
  reference   the released loop: a second model (load_state_dict), create_graph pseudo
              gradient, hand-written SGD step, Python exit allocation, then the real step
  autograd    l2w_iteration, hypergrad="autograd" (double backward on the one model)
  jvp         l2w_iteration, hypergrad="jvp" (forward-mode, default)
  jvp_pre     jvp + real_weights="pre_update" (real step re-uses the pseudo gradient)
An L2W iteration on batch N is two half steps of N/2 (θ takes two steps); meta_interval 1.
Times: all variants built in one process and timed round-robin (iteration i of every
variant, then i+1, ...), so that a changing load on a shared machine hits all alike.

    PYTHONPATH=. python bench/meta_step.py --model msdnet_cifar --device cpu --batch 16 \\
        --iters 5 --json out.json
Peak memory, each variant alone in a fresh subprocess: CUDA max_memory_allocated (absolute,
includes weights and optimizer state); CPU the peak-RSS increase (VmHWM) over the RSS after
the model and data are built.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import json
import math
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from l2w_dist.utils import autocast

VARIANTS = ("plain", "reference", "autograd", "jvp", "jvp_pre")
# Also buildable (used by bench/gpu_suite.py): an L2W iteration whose step skips the meta step
# (what 99 of 100 iterations cost at meta_interval 100), and the plain step under torch.compile.
EXTRA_VARIANTS = ("jvp_nometa", "plain_compile", "jvp_pre_rerun", "jvp_adamw_loop")
# jvp_pre_rerun: jvp_pre with the second half step's train forward run again instead of taken
# from the first half step's meta forward (what jvp_pre cost before that re-use).
# jvp_adamw_loop: jvp with the AdamW virtual step per parameter instead of multi-tensor.
# CUDA only: "<variant>_graph" for plain, jvp, jvp_nometa, jvp_pre: the same iteration with
# lr / step counts as device tensors, captured once as a CUDA graph and replayed
# (l2w_dist/engine/cuda_graph.py, what train.cuda_graph runs).
GRAPH_VARIANTS = tuple(f"{v}_graph" for v in ("plain", "jvp", "jvp_nometa", "jvp_pre"))
GRAPH_WARMUP = 2  # eager iterations per kind before the capture
INPUT_SIZE = {"msdnet_cifar": (3, 32, 32), "msdnet_imagenet": (3, 224, 224)}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="msdnet_cifar", help="any registered model name")
    ap.add_argument("--model-arg", action="append", default=[], help="builder override key=value")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--batch", type=int, default=16, help="loader batch (two halves of batch/2)")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="bf16 = autocast")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument(
        "--optimizer",
        default="sgd",
        choices=("sgd", "adamw"),
        help="real optimizer (the released loop 'reference' is SGD-only: skipped with adamw)",
    )
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # internal: run one variant
    return ap.parse_args(argv)


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _ce_matrix(logits, y):
    return torch.stack([F.cross_entropy(z.float(), y, reduction="none") for z in logits], 1)


def _released_half_step(model, pseudo, wnet, opt, mopt, train, meta, q, eps):
    """The released L2W loop, literally (SGD momentum pseudo step, Python allocation loop)."""
    pseudo.load_state_dict(model.state_dict())
    params = dict(pseudo.named_parameters())
    ce = _ce_matrix(pseudo(train[0]), train[1])
    t = wnet(ce.detach())
    w = 1 + eps * (t - t.mean())
    grads = torch.autograd.grad((w * ce).sum() / ce.shape[0], list(params.values()), create_graph=True)
    group = opt.param_groups[0]
    theta = {}
    for (name, p), g, real_p in zip(params.items(), grads, model.parameters()):
        d = g + group["weight_decay"] * p
        buf = opt.state.get(real_p, {}).get("momentum_buffer")
        buf = d if buf is None else group["momentum"] * buf + d
        theta[name] = p - group["lr"] * buf
    logits = torch.func.functional_call(pseudo, theta, (meta[0],))
    mce = _ce_matrix(logits, meta[1])
    conf = torch.stack([F.softmax(z.float(), 1).amax(1) for z in logits], 1).detach().cpu().tolist()
    n, k_exits = mce.shape
    exit_of = [-1] * n
    for k in range(k_exits - 1):
        quota, taken = int(math.floor(n * q[k])), 0
        for i in sorted(range(n), key=lambda i: -conf[i][k]):
            if taken == quota:
                break
            if exit_of[i] == -1:
                exit_of[i], taken = k, taken + 1
    exit_of = [k_exits - 1 if e == -1 else e for e in exit_of]
    loss = 0
    for k in range(k_exits):
        members = [i for i, e in enumerate(exit_of) if e == k]
        if members:
            loss = loss + mce[members, k].mean()
    mopt.zero_grad()
    loss.backward()
    mopt.step()
    ce = _ce_matrix(model(train[0]), train[1])
    with torch.no_grad():
        t = wnet(ce.detach())
        w = 1 + eps * (t - t.mean())
    opt.zero_grad()
    ((w * ce).sum() / ce.shape[0]).backward()
    opt.step()


def build_variant(args: argparse.Namespace, v: str):
    """Model, data and optimizers for variant ``v``; returns its one-iteration callable
    (with a ``graphed`` attribute: the :class:`GraphedIteration` of a graph variant, or None)."""
    from l2w_dist.engine.cuda_graph import GraphedIteration
    from l2w_dist.meta import L2WConfig, WeightNet, l2w_iteration, target_proportions
    from l2w_dist.meta.update import DeviceHyperparameters
    from l2w_dist.models import create_model

    graph = v.endswith("_graph")
    if graph and args.device != "cuda":
        raise ValueError(f"variant {v} needs a CUDA device")
    v = v.removesuffix("_graph")

    torch.manual_seed(0)
    device = torch.device(args.device)
    overrides = dict(kv.split("=", 1) for kv in args.model_arg)
    model = create_model(args.model, **{k: _value(v) for k, v in overrides.items()}).to(device)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    size = getattr(model, "input_size", None) or INPUT_SIZE.get(args.model, (3, 32, 32))
    num_classes = getattr(model, "num_classes", 10)
    x = torch.randn(args.batch, *size, device=device).to(memory_format=fmt)
    y = torch.randint(0, num_classes, (args.batch,), device=device)
    with torch.no_grad():
        num_exits = len(model(x[:2]))
    wnet = WeightNet(num_exits).to(device)
    if args.optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    mopt = torch.optim.Adam(wnet.parameters(), lr=1e-4, weight_decay=1e-4)
    if graph:  # lr and step counts as device tensors, read in place by every replay
        DeviceHyperparameters(opt)
        DeviceHyperparameters(mopt)
    pseudo = copy.deepcopy(model) if v == "reference" else None
    q = target_proportions(num_exits, 0.75)
    cfg = L2WConfig(
        epsilon=0.3,
        constraint="mat",
        hypergrad="autograd" if v == "autograd" else "jvp",
        real_weights="pre_update" if v in ("jvp_pre", "jvp_pre_rerun") else "updated",
        reuse_meta_forward=v != "jvp_pre_rerun",
    )
    half = args.batch // 2

    forward = torch.compile(model) if v == "plain_compile" else model

    def one_iteration():
        # autocast per iteration, as the trainer does: autocast caches the bf16 copy of each
        # parameter until its outermost context exits, so one context around many optimizer
        # steps would keep re-using the first iteration's weights (stale, and no casts to pay).
        with _autocast(args):
            _one_iteration(x, y)

    def _one_iteration(x, y):
        if v in ("plain", "plain_compile"):
            loss = sum(F.cross_entropy(z.float(), y) for z in forward(x))
            opt.zero_grad()
            loss.backward()
            opt.step()
            return {"loss": loss.detach()}
        if v == "reference":
            a, b = (x[:half], y[:half]), (x[half:], y[half:])
            _released_half_step(model, pseudo, wnet, opt, mopt, a, b, q, 0.3)
            _released_half_step(model, pseudo, wnet, opt, mopt, b, a, q, 0.3)
            return {}
        if v == "jvp_nometa":
            return l2w_iteration(model, wnet, opt, mopt, x, y, cfg, step=1, meta_interval=100)
        if v == "jvp_adamw_loop":
            with _per_parameter_adamw():
                return l2w_iteration(model, wnet, opt, mopt, x, y, cfg)
        return l2w_iteration(model, wnet, opt, mopt, x, y, cfg)

    one_iteration.graphed = None
    if graph:

        def captured(xb, yb, kind):
            with autocast(args.device, args.dtype, cache=False):  # as the trainer under train.cuda_graph
                return _one_iteration(xb, yb)

        graphed = GraphedIteration(captured, warmup=GRAPH_WARMUP)

        def one_graph_iteration():
            graphed(x, y, v)  # x, y copied into the captured inputs, as every new batch is

        one_graph_iteration.graphed = graphed
        return one_graph_iteration
    return one_iteration


@contextlib.contextmanager
def _per_parameter_adamw():
    """The AdamW virtual step per parameter (the multi-tensor path off), for its comparison."""
    vs = importlib.import_module("l2w_dist.meta.virtual_step")  # the module, not the function of that name
    original = vs._use_adamw_foreach
    vs._use_adamw_foreach = lambda flag, tensors: False if flag is None else flag
    try:
        yield
    finally:
        vs._use_adamw_foreach = original


def _autocast(args: argparse.Namespace):
    return autocast(args.device, args.dtype)


def _timed(args: argparse.Namespace, fn) -> float:
    _sync(args.device)
    t0 = time.perf_counter()
    fn()
    _sync(args.device)
    return 1000 * (time.perf_counter() - t0)


def run_variant(args: argparse.Namespace) -> dict:
    """Subprocess mode: peak memory (and isolated time) of one variant."""
    torch.set_num_threads(args.threads)
    one_iteration = build_variant(args, args.variant)
    rss0 = _rss_kb("VmRSS") if args.device == "cpu" else 0
    for _ in range(args.warmup):
        one_iteration()
    _sync(args.device)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = sorted(_timed(args, one_iteration) for _ in range(max(1, min(args.iters, 2))))
    if args.device == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = (_rss_kb("VmHWM") - rss0) / 1024
    return {"variant": args.variant, "ms_isolated": times[0], "peak_mb": peak_mb}


def interleaved_times(args: argparse.Namespace, variants: list[str]) -> dict[str, list[float]]:
    """Time all variants round-robin in one process, so that load changes hit all alike."""
    torch.set_num_threads(args.threads)
    fns = {v: build_variant(args, v) for v in variants}
    times: dict[str, list[float]] = {v: [] for v in variants}
    for v in variants:
        for _ in range(args.warmup):
            fns[v]()
    for _ in range(args.iters):
        for v in variants:
            times[v].append(_timed(args, fns[v]))
    return times


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    variants = [v for v in args.variants.split(",") if v]
    known = VARIANTS + EXTRA_VARIANTS + GRAPH_VARIANTS
    bad = [v for v in variants if v not in known]
    if bad:
        raise SystemExit(f"unknown variant(s) {bad}; allowed: {known}")
    if args.optimizer != "sgd" and "reference" in variants:
        print("  reference: skipped (the released loop hand-writes an SGD step)")
        variants.remove("reference")
    base = [a for a in (argv if argv is not None else sys.argv[1:])]
    results = []
    for v in variants:  # memory: each variant alone in a fresh process
        cmd = [sys.executable, __file__, *base, "--variant", v]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
        r = results[-1]
        print(f"  {v:10s} peak {r['peak_mb']:9.1f} MB (isolated {r['ms_isolated']:.1f} ms)", flush=True)
    times = interleaved_times(args, variants)  # time: round-robin in this process
    for r in results:
        t = sorted(times[r["variant"]])
        r["ms_median"], r["ms_min"] = t[len(t) // 2], t[0]
    plain = next((r for r in results if r["variant"] == "plain"), None)
    if plain:
        for r in results:
            r["time_x_plain"] = r["ms_median"] / plain["ms_median"]
            r["time_min_x_plain"] = r["ms_min"] / plain["ms_min"]
            r["mem_x_plain"] = r["peak_mb"] / plain["peak_mb"] if plain["peak_mb"] > 0 else float("nan")
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu x{args.threads} threads"
    print(f"{args.model} batch {args.batch} {args.dtype} {device_name}")
    nan = float("nan")
    cols = ("median ms", "x plain", "min ms", "x plain", "peak MB", "x plain")
    print(f"{'variant':10s} " + " ".join(f"{c:>9s}" for c in cols))
    for r in results:
        print(
            f"{r['variant']:10s} {r['ms_median']:9.1f} {r.get('time_x_plain', nan):8.2f} "
            f"{r['ms_min']:9.1f} {r.get('time_min_x_plain', nan):8.2f} "
            f"{r['peak_mb']:9.1f} {r.get('mem_x_plain', nan):8.2f}"
        )
    if args.json:
        meta = {k: v for k, v in vars(args).items() if k not in ("variant", "json")}
        with open(args.json, "w") as f:
            json.dump({"config": meta, "device": device_name, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
