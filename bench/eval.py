#!/usr/bin/env python
"""Budgeted-batch evaluation: vectorised vs the literal per-sample loop.

    PYTHONPATH=. OMP_NUM_THREADS=1 python bench/eval.py [--n 50000] [--exits 5] [--classes 1000]

Both sides start from the same stored logits (held-out and test, ``[K, n, C]``) and
produce the 39 operating points p = 1/20 ... 39/20. The literal loop is
the one the tests check equality against (tests/test_evaluate.py, the released
dynamic_evaluate step by step, on Python lists); it is timed on ``--loop-points`` points
and extrapolated to 39 when that is fewer. A third timing follows the released code's
own style (element-wise tensor indexing, ``.item()`` per comparison) on a few points,
extrapolated to 39. The softmax (logits -> confidences) is the same work on every side
and is reported separately.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from l2w_dist.evaluate import DEFAULT_PS, budgeted, confidence_and_prediction  # noqa: E402
from l2w_dist.evaluate.metrics import budgeted_from_confidence  # noqa: E402
from tests.helpers.eval_reference import literal_find_threshold, literal_with_threshold  # noqa: E402


def release_style_point(h_max, t_max, t_arg, t_labels, flops, p):
    """One operating point written the way the released code indexes: tensor by tensor."""
    n_stage, n = h_max.shape
    probs = torch.exp(torch.log(torch.FloatTensor(1).fill_(p)) * torch.arange(1, n_stage + 1).float())
    probs /= probs.sum()
    _, sorted_idx = h_max.sort(dim=1, descending=True)
    filtered = torch.zeros(n)
    T = torch.Tensor(n_stage).fill_(1e8)
    for k in range(n_stage - 1):
        count, out_n = 0, math.floor(n * probs[k])
        for i in range(n):
            idx = sorted_idx[k][i]
            if filtered[idx] == 0:
                count += 1
                if count == out_n:
                    T[k] = h_max[k][idx]
                    break
        filtered.add_(h_max[k].ge(T[k]).type_as(filtered))
    T[n_stage - 1] = -1e8
    acc, exp = 0, torch.zeros(n_stage)
    for i in range(t_max.shape[1]):
        for k in range(n_stage):
            if t_max[k][i].item() >= T[k]:
                acc += int(t_labels[i].item()) == int(t_arg[k][i].item())
                exp[k] += 1
                break
    return acc, sum(exp[k].item() / t_max.shape[1] * flops[k] for k in range(n_stage))


def literal_points(h_max, t_max, t_arg, t_labels, flops, ps):
    """The tests' literal loop (released logic on Python lists), from confidences, per point."""
    n_stage = h_max.shape[0]
    out = []
    for p in ps:
        probs = torch.exp(torch.log(torch.FloatTensor(1).fill_(p)) * torch.arange(1, n_stage + 1).float())
        probs /= probs.sum()
        T = literal_find_threshold(h_max, probs)
        acc, _, exp_flops = literal_with_threshold(t_max, t_arg, t_labels, flops, T)
        out.append({"p": p, "flops": exp_flops, "top1": acc * 100.0 / t_max.shape[1]})
    return out


def best_of(repeats, fn):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=50_000, help="samples in each of held-out and test")
    ap.add_argument("--exits", type=int, default=5)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--loop-points", type=int, default=39, help="points timed for the literal loop")
    ap.add_argument(
        "--release-points", type=int, default=3, help="points timed for the release-style loop (extrapolated to 39)"
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cuda", action="store_true", help="also time the vectorised path on the GPU")
    args = ap.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    k, n, c = args.exits, args.n, args.classes
    scale = torch.linspace(1.0, 3.0, k)[:, None, None]  # later exits sharper: a non-degenerate curve
    h_logits = torch.randn(k, n, c, generator=gen) * scale
    t_logits = torch.randn(k, n, c, generator=gen) * scale
    h_labels = torch.randint(0, c, (n,), generator=gen)
    t_labels = torch.randint(0, c, (n,), generator=gen)
    flops = [1e8 * (i + 1) for i in range(k)]
    ps = list(DEFAULT_PS)

    # shared first step: softmax -> confidence and prediction (once per split, not per point)
    t_conf, (conf_h, conf_t, pred_t) = best_of(
        args.repeats, lambda: (confidence_and_prediction(h_logits)[0], *confidence_and_prediction(t_logits))
    )
    t_full, fast = best_of(args.repeats, lambda: budgeted(h_logits, h_labels, t_logits, t_labels, flops, ps))
    t_vec, core = best_of(args.repeats, lambda: budgeted_from_confidence(conf_h, conf_t, pred_t, t_labels, flops, ps))
    assert core.points == fast

    loop_ps = ps[:: max(1, len(ps) // args.loop_points)][: args.loop_points]
    t0 = time.perf_counter()
    slow = literal_points(conf_h, conf_t, pred_t, t_labels, flops, loop_ps)
    t_loop = (time.perf_counter() - t0) * len(ps) / len(loop_ps)
    by_p = {r["p"]: r for r in fast}
    assert all(by_p[r["p"]] == r for r in slow), "vectorised and literal results differ"

    # the released style is slow: time a few spread points on all samples and extrapolate
    step = max(1, len(ps) // args.release_points)
    rel_ps = ps[step // 2 :: step][: args.release_points]
    t0 = time.perf_counter()
    for p in rel_ps:
        acc, exp_flops = release_style_point(conf_h, conf_t, pred_t, t_labels, flops, p)
        assert (by_p[p]["top1"], by_p[p]["flops"]) == (acc * 100.0 / n, exp_flops), p
    t_release = (time.perf_counter() - t0) * len(ps) / len(rel_ps)

    extrap = "" if len(loop_ps) == len(ps) else f", timed on {len(loop_ps)} points, extrapolated to 39"
    print(f"budgeted batch: {n} held-out + {n} test samples, K={k} exits, C={c} classes, {len(ps)} points, 1 thread")
    print(f"softmax -> confidences (shared, once) : {t_conf:9.3f} s")
    print(f"vectorised, after softmax             : {t_vec:9.3f} s")
    print(f"vectorised, end to end (budgeted())   : {t_full:9.3f} s")
    print(f"literal loop on lists, after softmax  : {t_loop:9.3f} s  (results equal{extrap})")
    print(
        f"release-style loop, after softmax     : {t_release:9.1f} s  "
        f"(timed on p={rel_ps}, extrapolated to 39 points; results equal)"
    )
    print(f"speed-up after softmax, vs literal loop on lists : {t_loop / t_vec:8.1f}x")
    print(f"speed-up after softmax, vs release-style loop    : {t_release / t_vec:8.1f}x")
    print(f"speed-up end to end,    vs literal loop on lists : {(t_conf + t_loop) / t_full:8.1f}x")
    print(f"speed-up end to end,    vs release-style loop    : {(t_conf + t_release) / t_full:8.1f}x")

    if args.cuda:
        cuda_check(args, h_logits, h_labels, t_logits, t_labels, flops, ps, conf_h, conf_t, pred_t, fast, t_vec)


def cuda_check(args, h_logits, h_labels, t_logits, t_labels, flops, ps, conf_h, conf_t, pred_t, fast, t_vec):
    """The same evaluation with CUDA tensors: equal results from equal confidences; timings."""
    dev = torch.device("cuda")

    def timed(fn):
        fn()  # warm-up (kernels, allocator)
        times = []
        for _ in range(max(3, args.repeats)):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            result = fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return min(times), result

    g_conf_h, g_conf_t, g_pred_t, g_labels = (x.to(dev) for x in (conf_h, conf_t, pred_t, t_labels))
    t_core, core = timed(lambda: budgeted_from_confidence(g_conf_h, g_conf_t, g_pred_t, g_labels, flops, ps))
    assert core.points == fast, "CUDA core differs from CPU on the same confidences"
    gh, gt, ghl, gtl = (x.to(dev) for x in (h_logits, t_logits, h_labels, t_labels))
    t_e2e, pts = timed(lambda: budgeted(gh, ghl, gt, gtl, flops, ps))
    differ = sum(a != b for a, b in zip(pts, fast))
    print(
        f"CUDA ({torch.cuda.get_device_name()}): after softmax {t_core * 1e3:.1f} ms "
        f"(equal to CPU on the same confidences; {t_vec / t_core:.1f}x the 1-thread CPU core), "
        f"end to end with GPU softmax {t_e2e * 1e3:.1f} ms; "
        f"{differ}/{len(pts)} points differ from CPU when the softmax runs on the GPU"
    )


if __name__ == "__main__":
    main()
