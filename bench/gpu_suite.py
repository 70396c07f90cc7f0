"""GPU performance suite: plain vs L2W iterations at the paper's batch sizes.

One process runs every case through ``bench/meta_step.py``'s ``run_variant`` (same code the
CPU benchmark uses), frees the GPU between cases, and stops starting new cases once the time
budget is spent, so a partial run still leaves its JSON and table.

    python bench/gpu_suite.py --out-dir OUT                 # on a GPU, < 8 minutes
    python bench/gpu_suite.py --device cpu --out-dir OUT    # CPU smoke mode (tiny batches)

Ratios reported (measured in the same run): L2W jvp / plain at interval 1; bf16 +
channels_last plain speed-up over fp32 plain; the meta overhead at interval 100, amortised
((T_meta + 99·T_no_meta)/100 against T_no_meta, and against plain); peak memory jvp / plain.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import meta_step  # noqa: E402  (bench/meta_step.py: the variants)

# (name, model, model args, batch on GPU, batch on CPU, dtype, channels_last, variants), in the
# order they run: when the time budget is spent, the cases and variants at the end are skipped.
# "*_graph" variants (CUDA only, skipped in the CPU smoke mode): the same iteration captured
# as a CUDA graph and replayed (train.cuda_graph), beside its eager row.
CASES = [
    (
        "msdnet_in_step4_bf16_cl",
        "msdnet_imagenet",
        ["step=4"],
        512,
        4,
        "bf16",
        True,
        ["plain", "plain_graph", "jvp", "jvp_graph", "jvp_nometa", "jvp_nometa_graph", "jvp_pre", "jvp_pre_graph"],
    ),
    (
        "msdnet_cifar_bf16_cl",
        "msdnet_cifar",
        [],
        1024,
        16,
        "bf16",
        True,
        ["plain", "plain_graph", "jvp", "jvp_graph", "jvp_nometa", "jvp_nometa_graph"],
    ),
    (
        "msdnet_in_step4_fp32",
        "msdnet_imagenet",
        ["step=4"],
        512,
        4,
        "fp32",
        False,
        ["plain", "plain_graph", "jvp", "jvp_graph", "jvp_nometa", "jvp_nometa_graph", "jvp_pre", "jvp_pre_rerun"],
    ),
    (
        "deit_small_exits_bf16",
        "vit_exits",
        ["backbone=deit_small_patch16_224"],
        256,
        2,
        "bf16",
        False,
        ["plain", "plain_graph", "jvp", "jvp_graph", "jvp_nometa", "jvp_nometa_graph", "jvp_adamw_loop"],
    ),
    (
        "msdnet_cifar_fp32",
        "msdnet_cifar",
        [],
        1024,
        16,
        "fp32",
        False,
        ["plain", "jvp", "jvp_nometa", "jvp_pre", "autograd"],
    ),
    ("msdnet_in_step4_bf16_cl_compile", "msdnet_imagenet", ["step=4"], 512, 4, "bf16", True, ["plain_compile"]),
]
# torch.profiler summaries (eager): kernel time against wall time and kernels per iteration.
PROFILE_CASE, PROFILE_VARIANTS = "msdnet_in_step4_bf16_cl", ["plain", "jvp_nometa", "jvp"]


def case_args(case, args) -> argparse.Namespace:
    """``bench/meta_step.py``'s arguments for a case."""
    name, model, model_args, gpu_batch, cpu_batch, dtype, channels_last, variants = case
    return meta_step.parse_args(
        [
            "--model",
            model,
            *sum((["--model-arg", a] for a in model_args), []),
            "--device",
            args.device,
            "--batch",
            str(gpu_batch if args.device == "cuda" else cpu_batch),
            "--dtype",
            dtype,
            "--iters",
            str(args.iters),
            "--warmup",
            str(args.warmup),
            "--threads",
            str(args.threads),
            *(["--channels-last"] if channels_last else []),
            *(["--optimizer", "adamw"] if model == "vit_exits" else []),  # as the DeiT recipe
        ]
    )


def run_case(case, args) -> list[dict]:
    name, model, _, _, _, dtype, channels_last, variants = case
    results = []
    for variant in variants:
        if variant.endswith("_graph") and args.device != "cuda":
            args.skipped.append(f"{name}/{variant}: needs CUDA")
            continue
        if time.perf_counter() - args.t0 > args.budget_s:
            print(f"  budget spent: skipping {name}/{variant}", flush=True)
            args.skipped.append(f"{name}/{variant}: time budget spent")
            continue
        ns = case_args(case, args)
        try:
            r = time_variant(ns, variant)
        except Exception as err:  # record and go on: one failing case must not lose the others
            r = {"variant": variant, "error": f"{type(err).__name__}: {err}"[:500]}
        r.update(case=name, model=model, batch=ns.batch, dtype=dtype, channels_last=channels_last)
        results.append(r)
        print(
            f"  {name:34s} {variant:14s} "
            + (f"{r['ms_median']:9.1f} ms  peak {r['peak_mb']:9.0f} MB" if "ms_median" in r else r["error"]),
            flush=True,
        )
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return results


def time_variant(ns: argparse.Namespace, variant: str) -> dict:
    """Warm up, then the median of ``ns.iters`` synchronised iterations and the peak memory."""
    torch.set_num_threads(ns.threads)
    one_iteration = meta_step.build_variant(ns, variant)
    cuda = ns.device == "cuda"
    graphed = one_iteration.graphed
    # one_iteration enters autocast itself (per iteration, as the trainer does); a graph
    # variant's own eager warm-ups and its capture come before the timed replays
    for _ in range(ns.warmup + (meta_step.GRAPH_WARMUP + 1 if graphed is not None else 0)):
        one_iteration()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(ns.iters):
        t0 = time.perf_counter()
        one_iteration()
        if cuda:
            torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - t0))
    times.sort()
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan")
    out = {"variant": variant, "ms_median": times[len(times) // 2], "ms_min": times[0], "peak_mb": peak}
    if graphed is not None:  # a failed capture ran eagerly: the row must say so
        out["graph"] = "captured" if graphed.failed is None else f"eager fallback: {graphed.failed}"
    return out


def profile_variants(args) -> list[dict]:
    """torch.profiler over a few iterations of each :data:`PROFILE_VARIANTS` (after warm-up):
    device kernel time per iteration against wall time (under the profiler), and the number
    of kernels launched per iteration. On CPU (smoke mode): aten operators instead of kernels."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    case = next(c for c in CASES if c[0] == PROFILE_CASE)
    rows = []
    for variant in PROFILE_VARIANTS:
        if time.perf_counter() - args.t0 > args.budget_s:
            args.skipped.append(f"profile/{variant}: time budget spent")
            continue
        ns = case_args(case, args)
        cuda = ns.device == "cuda"
        try:
            one_iteration = meta_step.build_variant(ns, variant)
            for _ in range(ns.warmup):
                one_iteration()
            meta_step._sync(ns.device)
            iters = 3
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            with profile(activities=activities) as prof:
                t0 = time.perf_counter()
                for _ in range(iters):
                    one_iteration()
                meta_step._sync(ns.device)
                wall_ms = 1000 * (time.perf_counter() - t0) / iters
            if cuda:
                kernels = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
                busy_ms = sum(e.self_device_time_total for e in kernels) / 1000 / iters
            else:
                kernels = [e for e in prof.key_averages() if e.key.startswith("aten::")]
                busy_ms = sum(e.self_cpu_time_total for e in kernels) / 1000 / iters
            count = sum(e.count for e in kernels) / iters
            row = {"variant": variant, "wall_ms": wall_ms, "kernel_ms": busy_ms, "kernels": count}
            row["kernel_share"] = busy_ms / wall_ms
        except Exception as err:
            row = {"variant": variant, "error": f"{type(err).__name__}: {err}"[:500]}
        row.update(case=PROFILE_CASE, batch=ns.batch, unit="kernels" if cuda else "aten ops")
        rows.append(row)
        print(f"  profile {variant:12s} {row}", flush=True)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return rows


def ratios(results: list[dict]) -> dict[str, float]:
    by = {(r["case"], r["variant"]): r for r in results if "ms_median" in r}
    out = {}
    for case in {r["case"] for r in results}:
        plain = by.get((case, "plain"))
        if not plain:
            continue
        for v in ("jvp", "jvp_pre", "jvp_pre_rerun", "autograd", "jvp_nometa"):
            if (case, v) in by:
                out[f"{case}: {v} / plain time"] = by[case, v]["ms_median"] / plain["ms_median"]
                if plain["peak_mb"] > 0:
                    out[f"{case}: {v} / plain peak memory"] = by[case, v]["peak_mb"] / plain["peak_mb"]
        if (case, "jvp") in by and (case, "jvp_nometa") in by:
            meta, skip = by[case, "jvp"]["ms_median"], by[case, "jvp_nometa"]["ms_median"]
            amortised = (meta + 99 * skip) / 100
            out[f"{case}: interval-100 meta overhead vs no-meta iteration"] = amortised / skip - 1
            out[f"{case}: interval-100 L2W / plain time"] = amortised / plain["ms_median"]
        if (case, "jvp_adamw_loop") in by and (case, "jvp") in by:
            out[f"{case}: multi-tensor AdamW virtual step speed-up (jvp per-parameter / jvp)"] = (
                by[case, "jvp_adamw_loop"]["ms_median"] / by[case, "jvp"]["ms_median"]
            )
        if (case, "jvp_pre_rerun") in by and (case, "jvp_pre") in by:
            out[f"{case}: pre_update forward re-use speed-up (jvp_pre_rerun / jvp_pre)"] = (
                by[case, "jvp_pre_rerun"]["ms_median"] / by[case, "jvp_pre"]["ms_median"]
            )
        out.update(graph_ratios(case, by))
    for base in ("msdnet_in_step4", "msdnet_cifar"):
        fp32, bf16 = by.get((f"{base}_fp32", "plain")), by.get((f"{base}_bf16_cl", "plain"))
        if fp32 and bf16:
            out[f"{base}: bf16+channels_last plain speed-up over fp32 plain"] = fp32["ms_median"] / bf16["ms_median"]
    compiled = by.get(("msdnet_in_step4_bf16_cl_compile", "plain_compile"))
    eager = by.get(("msdnet_in_step4_bf16_cl", "plain"))
    if compiled and eager:
        out["msdnet_in_step4: torch.compile plain speed-up over eager (bf16+cl)"] = (
            eager["ms_median"] / compiled["ms_median"]
        )
    return out


def graph_ratios(case: str, by: dict) -> dict[str, float]:
    """Graph rows against the plain step (eager and graphed) and against their eager rows."""
    out: dict[str, float] = {}
    plain, plain_g = by.get((case, "plain")), by.get((case, "plain_graph"))
    for v in ("plain", "jvp", "jvp_nometa", "jvp_pre"):
        g = by.get((case, f"{v}_graph"))
        if g is None:
            continue
        if (case, v) in by:
            out[f"{case}: graph speed-up of {v} (eager / graph)"] = by[case, v]["ms_median"] / g["ms_median"]
        if plain and v != "plain":
            out[f"{case}: {v}_graph / plain time"] = g["ms_median"] / plain["ms_median"]
            if plain["peak_mb"] > 0:
                out[f"{case}: {v}_graph / plain peak memory"] = g["peak_mb"] / plain["peak_mb"]
        if plain_g and v != "plain":
            out[f"{case}: {v}_graph / plain_graph time"] = g["ms_median"] / plain_g["ms_median"]
    meta, skip = by.get((case, "jvp_graph")), by.get((case, "jvp_nometa_graph"))
    if meta and skip and plain:
        amortised = (meta["ms_median"] + 99 * skip["ms_median"]) / 100
        out[f"{case}: interval-100 L2W graph / plain time"] = amortised / plain["ms_median"]
        if plain_g:
            out[f"{case}: interval-100 L2W graph / plain_graph time"] = amortised / plain_g["ms_median"]
    return out


def markdown(device: str, results: list[dict], rat: dict[str, float], profile: list[dict] = ()) -> str:
    lines = [
        f"Device: {device}",
        "",
        "| case | batch | variant | ms/iter | img/s | peak MB |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for r in results:
        if "ms_median" in r:
            note = "" if r.get("graph", "captured") == "captured" else f" ({r['graph'][:60]})"
            lines.append(
                f"| {r['case']} | {r['batch']} | {r['variant']}{note} | {r['ms_median']:.1f} | "
                f"{1000 * r['batch'] / r['ms_median']:.0f} | {r['peak_mb']:.0f} |"
            )
        else:
            lines.append(f"| {r['case']} | {r['batch']} | {r['variant']} | failed: {r['error'][:80]} | | |")
    lines += ["", "| ratio | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in sorted(rat.items())]
    if profile:
        lines += ["", "| profile (eager) | batch | wall ms | kernel ms | kernel / wall | kernels per iter |"]
        lines += ["|---|---:|---:|---:|---:|---:|"]
        for r in profile:
            if "wall_ms" in r:
                lines.append(
                    f"| {r['case']} {r['variant']} | {r['batch']} | {r['wall_ms']:.1f} | {r['kernel_ms']:.1f} | "
                    f"{r['kernel_share']:.2f} | {r['kernels']:.0f} {r['unit']} |"
                )
            else:
                lines.append(f"| {r['case']} {r['variant']} | {r['batch']} | failed: {r['error'][:80]} | | | |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--out-dir", default="bench_out")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--budget-s", type=float, default=330.0, help="start no new variant after this many seconds")
    ap.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    ap.add_argument(
        "--profile", default="auto", choices=("auto", "on", "off"), help="profiler summary (auto: on CUDA only)"
    )
    ap.add_argument("--dali", action="store_true", help="also the DALI mixed-decode input pipeline (bench/gpu_dali.py)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here; use --device cpu for the smoke mode")
    if args.device == "cpu":
        args.iters, args.warmup = min(args.iters, 2), 1
    args.t0 = time.perf_counter()
    args.skipped = []
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu x{args.threads} threads"
    chosen = [c for c in CASES if not args.cases or c[0] in args.cases.split(",")]
    results: list[dict] = []
    profile: list[dict] = []

    def write() -> None:  # after every case: a partial run still leaves its JSON and table
        rat = ratios(results)
        report = {"device": device, "torch": torch.__version__, "results": results, "ratios": rat}
        report |= {"profile": profile, "skipped": args.skipped}
        (out_dir / "gpu_suite.json").write_text(json.dumps(report, indent=1))
        (out_dir / "gpu_suite.md").write_text(markdown(device, results, rat, profile))

    for i, case in enumerate(chosen):
        results += run_case(case, args)
        write()
        if i == 0 and (args.profile == "on" or (args.profile == "auto" and args.device == "cuda")):
            profile += profile_variants(args)  # after the first case: the floor is measured early
            write()
    print(markdown(device, results, ratios(results), profile))
    dynamic_section(args, out_dir)
    if args.dali:
        dali_section(args, out_dir)
    print(f"total {time.perf_counter() - args.t0:.0f} s")


def dynamic_section(args: argparse.Namespace, out_dir: Path) -> None:
    """Real early exit on the GPU (bench/dynamic.py): the demo model, msdnet_imagenet step 4
    and the DeiT-S exits, batch 1/64/256, 3 budget points, bf16 + channels_last, against the
    full network; OUT_DIR/dynamic.{json,md}. Not run in the CPU smoke mode."""
    if args.device != "cuda":
        return
    import dynamic  # bench/dynamic.py, beside this file

    dynamic.main(
        ["--device", "cuda", "--precision", "bf16", "--channels-last", "--threads", "1"]
        + ["--batches", "1,64,256", "--repeats", "3", "--budget-s", "120"]
        + ["--json", str(out_dir / "dynamic.json"), "--md", str(out_dir / "dynamic.md")]
    )


def dali_section(args: argparse.Namespace, out_dir: Path) -> None:
    """The input pipeline: DALI decoding on the GPU (``mixed``) with 4 CPU threads, the step 4
    ImageNet recipe; its own JSON (``gpu_suite_dali.json``) and line."""
    import gpu_dali  # noqa: E402  (bench/gpu_dali.py)

    small = args.device == "cpu"  # smoke mode: CPU decoding, tiny
    r = gpu_dali.measure(args.device, threads=4, images=128 if small else 2048, batch_size=32 if small else 256)
    (out_dir / "gpu_suite_dali.json").write_text(json.dumps(r, indent=1))
    print(f"dali {r['decode']} decode, 4 CPU threads: {r['img_s']:.0f} img/s, {r['img_per_cpu_s']:.0f} img per CPU-s")


if __name__ == "__main__":
    main()
