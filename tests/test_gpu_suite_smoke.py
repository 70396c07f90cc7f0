"""bench/gpu_suite.sh in its CPU smoke mode: the script a GPU session runs, end to end
through the shell wrapper, on the msdnet_cifar cases (tiny batches)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_suite_cpu_smoke_mode_measures_every_variant(tmp_path):
    cases = "msdnet_cifar_fp32,msdnet_cifar_bf16_cl"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        ["bash", str(ROOT / "bench/gpu_suite.sh"), str(tmp_path), "--device", "cpu", "--cases", cases],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert report["device"].startswith("cpu")
    got = {(r["case"], r["variant"]) for r in report["results"]}
    expect = {("msdnet_cifar_fp32", v) for v in ("plain", "jvp", "jvp_nometa", "jvp_pre", "autograd")}
    expect |= {("msdnet_cifar_bf16_cl", v) for v in ("plain", "jvp", "jvp_nometa")}
    assert got == expect
    # the CUDA-graph rows need a GPU: listed as skipped, never silently dropped
    assert "msdnet_cifar_bf16_cl/jvp_graph: needs CUDA" in report["skipped"]
    for r in report["results"]:
        assert "error" not in r, r  # the suite records a failing variant and goes on: none may fail
        assert r["ms_median"] > 0 and r["ms_min"] > 0
    ratios = report["ratios"]
    for key in (
        "msdnet_cifar_fp32: jvp / plain time",
        "msdnet_cifar_fp32: interval-100 meta overhead vs no-meta iteration",
        "msdnet_cifar: bf16+channels_last plain speed-up over fp32 plain",
    ):
        assert key in ratios and ratios[key] > 0, (key, ratios)
    assert ratios["msdnet_cifar_fp32: jvp / plain time"] > 1  # a meta iteration cannot be cheaper than plain
    assert "| msdnet_cifar_fp32 |" in (tmp_path / "gpu_suite.md").read_text()
