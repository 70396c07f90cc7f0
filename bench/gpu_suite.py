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

# (name, model, model args, batch on GPU, batch on CPU, dtype, channels_last, variants)
CASES = [
    (
        "msdnet_in_step4_fp32",
        "msdnet_imagenet",
        ["step=4"],
        512,
        4,
        "fp32",
        False,
        ["plain", "jvp", "jvp_nometa", "jvp_pre", "jvp_pre_rerun", "autograd"],
    ),
    (
        "msdnet_in_step4_bf16_cl",
        "msdnet_imagenet",
        ["step=4"],
        512,
        4,
        "bf16",
        True,
        ["plain", "jvp", "jvp_nometa", "jvp_pre"],
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
    ("msdnet_cifar_bf16_cl", "msdnet_cifar", [], 1024, 16, "bf16", True, ["plain", "jvp", "jvp_nometa"]),
    (
        "deit_small_exits_bf16",
        "vit_exits",
        ["backbone=deit_small_patch16_224"],
        256,
        2,
        "bf16",
        False,
        ["plain", "jvp"],
    ),
    ("msdnet_in_step4_bf16_cl_compile", "msdnet_imagenet", ["step=4"], 512, 4, "bf16", True, ["plain_compile"]),
]


def run_case(case, args) -> list[dict]:
    name, model, model_args, gpu_batch, cpu_batch, dtype, channels_last, variants = case
    results = []
    for variant in variants:
        if time.perf_counter() - args.t0 > args.budget_s:
            print(f"  budget spent: skipping {name}/{variant}", flush=True)
            continue
        ns = meta_step.parse_args(
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
    # one_iteration enters autocast itself (per iteration, as the trainer does)
    for _ in range(ns.warmup):
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
    return {"variant": variant, "ms_median": times[len(times) // 2], "ms_min": times[0], "peak_mb": peak}


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


def markdown(device: str, results: list[dict], rat: dict[str, float]) -> str:
    lines = [
        f"Device: {device}",
        "",
        "| case | batch | variant | ms/iter | img/s | peak MB |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for r in results:
        if "ms_median" in r:
            lines.append(
                f"| {r['case']} | {r['batch']} | {r['variant']} | {r['ms_median']:.1f} | "
                f"{1000 * r['batch'] / r['ms_median']:.0f} | {r['peak_mb']:.0f} |"
            )
        else:
            lines.append(f"| {r['case']} | {r['batch']} | {r['variant']} | failed: {r['error'][:80]} | | |")
    lines += ["", "| ratio | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in sorted(rat.items())]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--out-dir", default="bench_out")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--budget-s", type=float, default=420.0, help="start no new case after this many seconds")
    ap.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    ap.add_argument("--dali", action="store_true", help="also the DALI mixed-decode input pipeline (bench/gpu_dali.py)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here; use --device cpu for the smoke mode")
    if args.device == "cpu":
        args.iters, args.warmup = min(args.iters, 2), 1
    args.t0 = time.perf_counter()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu x{args.threads} threads"
    chosen = [c for c in CASES if not args.cases or c[0] in args.cases.split(",")]
    results: list[dict] = []
    for case in chosen:
        results += run_case(case, args)
        rat = ratios(results)
        (out_dir / "gpu_suite.json").write_text(
            json.dumps({"device": device, "torch": torch.__version__, "results": results, "ratios": rat}, indent=1)
        )
        (out_dir / "gpu_suite.md").write_text(markdown(device, results, rat))
    print(markdown(device, results, ratios(results)))
    if args.dali:
        dali_section(args, out_dir)
    print(f"total {time.perf_counter() - args.t0:.0f} s")


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
