"""Weak scaling of the distributed L2W iteration, and what it communicates.

For each world size (default 1 and 2 CPU processes over gloo, one thread each) and a
fixed *per-rank* batch, times three modes on the same model:
  plain     one plain multi-exit step on the whole per-rank batch (DDP)
  l2w       l2w_iteration, sync="global", hypergrad="jvp", real_weights="updated"
  l2w_pre   the same with real_weights="pre_update" (the real step re-uses the pseudo gradient)
Weak-scaling efficiency = t(1 process) / t(N processes) (ideal: 1, the time per
iteration stays flat as the global batch grows with N).

Bytes communicated per iteration and rank are payload sizes (what each collective is
handed: an all-reduce of n bytes counts n, an all-gather counts its output), counted by
a DDP comm hook (gradient buckets of the real update), by wrapping DDP's buffer
broadcast (BatchNorm running statistics, before every DDP forward), and by a counting
wrapper around the L2W step's collectives (pseudo-step gradient, u, confidences,
normalisation means, weight-net gradient). A ring all-reduce moves about 2(N-1)/N times
its payload over each link.

    PYTHONPATH=. python bench/scaling.py --model msdnet_cifar --batch 32 --iters 5 \\
        --md docs/benchmarks/dist.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from l2w_dist.distributed.backends import build_backend
from l2w_dist.distributed.env import DistEnv
from l2w_dist.distributed.testing import run_ranks

MODES = ("plain", "l2w", "l2w_pre")
INPUT_SIZE = {"msdnet_cifar": (3, 32, 32), "msdnet_imagenet": (3, 224, 224)}


class CountingCollectives:
    """Wraps the L2W step's collectives and adds up their payload bytes."""

    def __init__(self, inner):
        self.inner = inner
        self.world_size = inner.world_size
        self.rank = inner.rank
        self.bytes = 0
        self.calls = 0

    def _count(self, t: torch.Tensor, factor: int = 1) -> None:
        self.bytes += t.numel() * t.element_size() * factor
        self.calls += 1

    def all_reduce_sum_(self, tensor):
        self._count(tensor)
        return self.inner.all_reduce_sum_(tensor)

    def all_reduce_sum(self, tensor):
        self._count(tensor)
        return self.inner.all_reduce_sum(tensor)

    def all_gather_cat(self, tensor):
        self._count(tensor, self.world_size)
        return self.inner.all_gather_cat(tensor)


def _bench(env: DistEnv, opts: dict) -> dict:
    torch.set_num_threads(opts["threads"])
    counters = {"ddp_grad": 0, "ddp_buffers": 0}
    if env.is_distributed:  # DDP broadcasts its buffers before each forward: count them
        original_broadcast = dist._broadcast_coalesced

        def counting_broadcast(group, tensors, *args, **kwargs):
            counters["ddp_buffers"] += sum(t.numel() * t.element_size() for t in tensors)
            return original_broadcast(group, tensors, *args, **kwargs)

        dist._broadcast_coalesced = counting_broadcast

    shape = INPUT_SIZE.get(opts["model"], (3, 32, 32))
    g = torch.Generator().manual_seed(1000 + env.rank)
    x = torch.randn(opts["batch"], *shape, generator=g)
    results = {mode: _bench_mode(env, opts, mode, x, g, counters) for mode in opts["modes"]}
    return results


def _bench_mode(env: DistEnv, opts: dict, mode: str, x: torch.Tensor, g: torch.Generator, counters: dict) -> dict:
    from l2w_dist.meta import L2WConfig, LocalCollectives, WeightNet, default_collectives, l2w_iteration
    from l2w_dist.models import create_model

    torch.manual_seed(0)
    model = create_model(opts["model"])
    num_classes = model(x[:2])[0].shape[1]
    y = torch.randint(0, num_classes, (opts["batch"],), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    shared = env.is_distributed and not opts["independent"]
    backend = build_backend("ddp" if shared else "none", model, opt, env=env)
    if shared:
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        def counting_hook(state, bucket):
            buf = bucket.buffer()
            counters["ddp_grad"] += buf.numel() * buf.element_size()
            return default_hooks.allreduce_hook(None, bucket)

        backend.model.register_comm_hook(None, counting_hook)
    wnet = WeightNet(len(model(x[:2])))
    mopt = torch.optim.Adam(wnet.parameters(), lr=1e-4, weight_decay=1e-4)
    coll = CountingCollectives(default_collectives() if shared else LocalCollectives())
    cfg = L2WConfig(epsilon=0.8, constraint="col", real_weights="pre_update" if mode == "l2w_pre" else "updated")

    def one_iteration():
        if mode == "plain":
            logits = backend.model(x)
            loss = sum(F.cross_entropy(z, y) for z in logits)
            backend.update.zero_grad()
            backend.update.backward(loss)
            backend.update.step()
        else:
            l2w_iteration(backend.model, wnet, backend.update, mopt, x, y, cfg, collectives=coll)

    for _ in range(opts["warmup"]):
        one_iteration()
    for k in counters:
        counters[k] = 0
    coll.bytes = coll.calls = 0
    times, cpu_times = [], []
    for _ in range(opts["iters"]):
        if shared:
            dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        one_iteration()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    n = opts["iters"]
    return {
        "ms_median": 1000 * statistics.median(times),
        "ms_all": [1000 * t for t in times],
        "cpu_ms_median": 1000 * statistics.median(cpu_times),
        "bytes_ddp_grad": counters["ddp_grad"] / n,
        "bytes_ddp_buffers": counters["ddp_buffers"] / n,
        "bytes_l2w": coll.bytes / n,
        "l2w_calls": coll.calls / n,
        "params": sum(p.numel() for p in model.parameters()),
        "weight_net_params": sum(p.numel() for p in wnet.parameters()),
    }


def _mb(b: float) -> str:
    return f"{b / 2**20:.2f}"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="msdnet_cifar")
    ap.add_argument("--batch", type=int, default=32, help="per-rank loader batch (two halves)")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument(
        "--worlds",
        default="1,1x2,2",
        help="comma-separated process counts; 1xN = N independent single-process runs at once "
        "(the 1-process time under the same CPU sharing as N processes)",
    )
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--repeats", type=int, default=1, help="rounds over the world sizes; the fastest median is kept")
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None, help="write a markdown report here")
    args = ap.parse_args(argv)
    modes = args.modes.split(",")
    for m in modes:
        if m not in MODES:
            raise SystemExit(f"--modes: {m!r} is not one of {MODES}")
    opts = dict(
        model=args.model,
        batch=args.batch,
        iters=args.iters,
        warmup=args.warmup,
        threads=args.threads,
        modes=modes,
    )
    worlds = args.worlds.split(",")
    load_before = os.getloadavg()
    by_world: dict[str, dict] = {}
    for _ in range(args.repeats):  # round-robin, so every configuration sees the same background load
        for w in worlds:
            independent = w.startswith("1x")
            n_proc = int(w[2:]) if independent else int(w)
            per_rank = run_ranks(
                _bench,
                n_proc,
                {**opts, "independent": independent},
                timeout_s=3600,
                env={"OMP_NUM_THREADS": str(args.threads)},
            )
            # the slowest rank's median is the iteration time (ranks synchronise every iteration)
            merged = per_rank[0]
            for mode in modes:
                merged[mode]["ms_median"] = max(r[mode]["ms_median"] for r in per_rank)
                merged[mode]["cpu_ms_median"] = max(r[mode]["cpu_ms_median"] for r in per_rank)
                best = by_world.get(w, {}).get(mode)
                if best is not None and best["ms_median"] < merged[mode]["ms_median"]:
                    merged[mode] = best
            by_world[w] = merged
    load_after = os.getloadavg()

    base = by_world[worlds[0]]
    lines = [
        f"# Distributed L2W: weak scaling and communication ({args.model})",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, CPU only, gloo; "
        f"{args.threads} thread(s) per process; per-rank batch {args.batch} "
        f"(L2W halves of {args.batch // 2}); "
        f"median of {args.iters} iterations after {args.warmup} warm-up, best of {args.repeats} "
        "round(s). "
        f"Load average before/after: {load_before[0]:.1f} / {load_after[0]:.1f} (the machine is shared).",
        "",
        f"Command: `PYTHONPATH=. python bench/scaling.py --model {args.model} --batch {args.batch} "
        f"--iters {args.iters} --worlds {args.worlds} --repeats {args.repeats}`",
        "",
        "Rows `1xN`: N independent single-process runs at once, i.e. the one-process time under the same "
        "CPU sharing as N ranks. Efficiency = t(one process) / t(N ranks): *vs 1* against the lone "
        "process, *vs 1xN* against the equally-loaded one (isolates communication and synchronisation "
        "from CPU sharing on this small shared machine), *CPU* on per-process CPU time.",
        "",
        "| mode | processes | ms / iter (wall) | CPU ms / iter | efficiency vs 1 | vs 1xN | CPU | "
        "MB / iter / rank: DDP grads | DDP buffers | L2W collectives | total |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode in modes:
        for w in worlds:
            r = by_world[w][mode]
            total = r["bytes_ddp_grad"] + r["bytes_ddp_buffers"] + r["bytes_l2w"]
            effs = ["—", "—", "—"]
            if "x" not in w and w != "1":
                effs[0] = f"{by_world['1'][mode]['ms_median'] / r['ms_median']:.1%}" if "1" in by_world else "—"
                matched = by_world.get(f"1x{w}")
                effs[1] = f"{matched[mode]['ms_median'] / r['ms_median']:.1%}" if matched else "—"
                if "1" in by_world:
                    effs[2] = f"{by_world['1'][mode]['cpu_ms_median'] / r['cpu_ms_median']:.1%}"
            lines.append(
                f"| {mode} | {w} | {r['ms_median']:.0f} | {r['cpu_ms_median']:.0f} | {' | '.join(effs)} | "
                f"{_mb(r['bytes_ddp_grad'])} | {_mb(r['bytes_ddp_buffers'])} | {_mb(r['bytes_l2w'])} | "
                f"{_mb(total)} |"
            )
    p = base[modes[0]]["params"]
    lines += [
        "",
        f"Model parameters: {p:,} ({_mb(4 * p)} MB in fp32). An L2W iteration is two half steps (θ takes two "
        "steps); each half step with a meta step all-reduces the pseudo-step gradient (|θ|) and u (|θ|+1), "
        "gathers the K meta-batch confidences, all-reduces the weight-net gradient and (mat/row) the weight "
        "means, and — with real_weights=updated — DDP all-reduces the real gradient (|θ|). pre_update drops "
        "the real-update all-reduce (the pseudo-step gradient is already global).",
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.md:
        Path(args.md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.md).write_text(report)
    if args.json:
        Path(args.json).write_text(json.dumps({"opts": opts, "results": by_world}, indent=1))
    return by_world


if __name__ == "__main__":
    main()
