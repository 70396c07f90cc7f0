"""Per-exit FLOPs and parameters of a registered model, as a table to paste into a paper.

    python tools/model_info.py msdnet_imagenet step=6
    python tools/model_info.py msdnet_cifar num_blocks=7 step_mode=even step=2 base=4
    python tools/model_info.py --list
    python tools/model_info.py msdnet_cifar --json
    python tools/model_info.py msdnet_cifar --row --header   # a row of the all-models table

Overrides are ``key=value`` keyword options of ``create_model`` (values parsed as YAML:
``6``, ``true``, ``[1,2,4,4]``, ``lin_grow``). FLOPs are the model's ``exit_flops``
(cumulative multiply-adds for one image at its input size, in the model's counting
convention); "params to exit k" counts every parameter used until exit k has produced its
logits (backbone so far and all heads up to k, as the MSDNet papers count them). Works
for any registered model through the registry and the ``MultiExitModel`` contract only.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch
import yaml

from l2w_dist.models import create_model, list_models


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["step=6", "growth_factor=[1,2,4,4]"]`` -> ``{"step": 6, "growth_factor": [1, 2, 4, 4]}``."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"override {item!r} is not of the form key=value")
        overrides[key] = yaml.safe_load(value)
    return overrides


def params_to_exits(model: torch.nn.Module) -> list[int]:
    """Parameters used until each exit head has finished, for one forward of one image."""
    used: set[int] = set()
    counts: list[int | None] = [None] * len(model.exit_heads)
    sizes = {id(p): p.numel() for p in model.parameters()}
    handles = []
    for mod in model.modules():
        own = [id(p) for p in mod.parameters(recurse=False)]
        if own:
            handles.append(mod.register_forward_pre_hook(lambda _m, _i, own=own: used.update(own)))
    for k, head in enumerate(model.exit_heads):

        def done(_m, _i, _o, k=k):
            counts[k] = sum(sizes[i] for i in used)

        handles.append(head.register_forward_hook(done))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *model.input_size))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return [int(c) for c in counts]


def model_info(name: str, **overrides: Any) -> dict[str, Any]:
    """Exits, cumulative FLOPs and parameters of a registered model, as a dict."""
    model = create_model(name, **overrides)
    flops = model.exit_flops
    params = params_to_exits(model)
    return {
        "model": name,
        "options": overrides,
        "input_size": list(model.input_size),
        "num_classes": model.num_classes,
        "flop_convention": getattr(model, "flop_convention", "macs"),
        "exits": [{"exit": k + 1, "flops": f, "params": p} for k, (f, p) in enumerate(zip(flops, params))],
        "total_params": sum(p.numel() for p in model.parameters()),
    }


CONVENTIONS = {
    "macs": "FLOPs = multiply-adds of convolutions and matrix products",
    "op_counter": "FLOPs = multiply-adds + ReLU/pooling/bias operations (the MSDNet op_counter)",
}


def markdown(info: dict[str, Any]) -> str:
    opts = ", ".join(f"{k}={v}" for k, v in info["options"].items())
    size = "×".join(str(s) for s in info["input_size"])
    lines = [
        f"**{info['model']}**{f' ({opts})' if opts else ''}: {len(info['exits'])} exits, "
        f"input {size}, {info['num_classes']} classes; {CONVENTIONS[info['flop_convention']]}, one image",
        "",
        "| Exit | MFLOPs (cumulative) | Params to exit (M) |",
        "|---:|---:|---:|",
    ]
    for e in info["exits"]:
        lines.append(f"| {e['exit']} | {e['flops'] / 1e6:.1f} | {e['params'] / 1e6:.2f} |")
    lines.append(f"| total | {info['exits'][-1]['flops'] / 1e6:.1f} | {info['total_params'] / 1e6:.2f} |")
    return "\n".join(lines)


SUMMARY_HEADER = "| Model | Exits | MFLOPs per exit (cumulative) | Params (M) |\n|---|---:|---|---:|"


def summary_row(info: dict[str, Any]) -> str:
    """One line of the all-models table (``--row``); header: ``SUMMARY_HEADER``."""
    opts = " ".join(f"{k}={v}" for k, v in info["options"].items())
    flops = " / ".join(f"{e['flops'] / 1e6:.1f}" for e in info["exits"])
    name = f"`{info['model']}`" + (f" {opts}" if opts else "")
    return f"| {name} | {len(info['exits'])} | {flops} | {info['total_params'] / 1e6:.2f} |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", nargs="?", help="registered model name (see --list)")
    parser.add_argument("overrides", nargs="*", help="key=value options for create_model")
    parser.add_argument("--list", action="store_true", help="print the registered model names and exit")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a markdown table")
    parser.add_argument("--row", action="store_true", help="print one row of the all-models table")
    parser.add_argument("--header", action="store_true", help="with --row: print the table header first")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(list_models()))
        return 0
    if not args.name:
        parser.error(f"give a model name; registered: {', '.join(list_models())}")
    torch.set_num_threads(min(4, torch.get_num_threads()))
    try:
        info = model_info(args.name, **parse_overrides(args.overrides))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(info, indent=2))
    elif args.row:
        print((SUMMARY_HEADER + "\n" if args.header else "") + summary_row(info))
    else:
        print(markdown(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
