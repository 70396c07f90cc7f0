"""GPU check of MSDNet (one short run): CPU/GPU agreement, forward-mode AD through
cuDNN BatchNorm in train mode (adjoint identity vs reverse mode), and step timings.

    python bench/msdnet_gpu_check.py [--out results.json] [--batch 128]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.func import functional_call, jvp, vjp

from l2w_dist.models import create_model


def timed(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps * 1000


def bench_imagenet(step: int, batch: int, reps: int, dev: torch.device) -> dict:
    """ms per plain bf16 training step and per forward-mode JVP (train mode) of msdnet_imagenet."""
    out: dict = {}
    torch.manual_seed(0)
    model = create_model("msdnet_imagenet", step=step).to(dev).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    xb = torch.randn(batch, 3, 224, 224, device=dev)
    yb = torch.randint(0, 1000, (batch,), device=dev)

    def train_step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = sum(torch.nn.functional.cross_entropy(o, yb) for o in model(xb))
        loss.backward()
        opt.step()

    params = {k: v.detach() for k, v in model.named_parameters()}
    bufs = dict(model.named_buffers())
    tangent = {k: torch.randn_like(v) for k, v in params.items()}

    def f(p):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return tuple(functional_call(model, (p, {k: v.clone() for k, v in bufs.items()}), (xb,)))

    torch.cuda.reset_peak_memory_stats()
    out[f"step{step}_train_step_ms_bs{batch}_bf16"] = timed(train_step, reps)
    out[f"step{step}_train_peak_GB"] = torch.cuda.max_memory_allocated() / 1e9
    try:
        torch.cuda.reset_peak_memory_stats()
        out[f"step{step}_jvp_ms_bs{batch}_bf16"] = timed(lambda: jvp(f, (params,), (tangent,)), reps)
        out[f"step{step}_jvp_peak_GB"] = torch.cuda.max_memory_allocated() / 1e9
    except Exception as err:  # report, do not hide
        out[f"step{step}_jvp_error"] = f"{type(err).__name__}: {err}"[:500]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    dev = torch.device("cuda")
    res: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}

    # 1. same function on CPU and GPU (eval, fp32, TF32 off)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    m = create_model("msdnet_imagenet", step=4).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        cpu = m(x)
        gpu = m.to(dev)(x.to(dev))
    res["cpu_gpu_max_abs_diff"] = max((a - b.cpu()).abs().max().item() for a, b in zip(cpu, gpu))

    # 2. jvp in train mode on GPU, msdnet_cifar float64 (adjoint identity) and imagenet fp32 (runs)
    mc = create_model("msdnet_cifar").double().to(dev).train()
    params = {k: v.detach() for k, v in mc.named_parameters()}
    bufs = dict(mc.named_buffers())
    xc = torch.randn(8, 3, 32, 32, dtype=torch.float64, device=dev)

    def f(p):
        return tuple(functional_call(mc, (p, {k: v.clone() for k, v in bufs.items()}), (xc,)))

    tan = {k: torch.randn_like(v) for k, v in params.items()}
    outs, touts = jvp(f, (params,), (tan,))
    ct = tuple(torch.randn_like(o) for o in outs)
    _, pb = vjp(f, params)
    (g,) = pb(ct)
    fwd = sum((c * t).sum() for c, t in zip(ct, touts)).item()
    rev = sum((g[k] * tan[k]).sum() for k in params).item()
    res["cifar_jvp_adjoint_rel_err_fp64"] = abs(fwd - rev) / max(abs(rev), 1e-30)

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    for step in (4, 6, 7):
        res.update(bench_imagenet(step, args.batch, args.reps, dev))
        torch.cuda.empty_cache()
        print(json.dumps(res), flush=True)

    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
