"""The README's quick start: its two commands, what CI runs, and the script they call, which
must pick the right way to install system packages as root, as a user with sudo, and
without either (a fake PATH plays each machine; the script's dry run prints its commands)."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SCRIPT = ROOT / "tools" / "quickstart.sh"


def quick_start_commands() -> list[str]:
    """The command lines of the README's "Quick start" code block (comments dropped)."""
    section = README.read_text().split("## Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "the README's quick start has no ```bash block"
    return [line.strip() for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]


def test_readme_has_two_commands_without_sudo_and_ci_runs_the_second():
    commands = quick_start_commands()
    assert commands == ["bash tools/quickstart.sh demo", "bash tools/quickstart.sh test"]
    assert not any(re.search(r"\bsudo\b", c) for c in commands), "a bare sudo fails as root without sudo"
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert commands[1] in ci_lines, ".ci/run must run the README's test command verbatim"
    # ... in the README's environment: none of the variables the quick start reads are set by CI
    ci_text = (ROOT / ".ci" / "run").read_text()
    for variable in re.findall(r"\$\{?(L2W_[A-Z_]+)", SCRIPT.read_text()):
        assert variable not in ci_text, f".ci/run sets {variable}, which the README's command does not"
    assert os.access(SCRIPT, os.X_OK) or SCRIPT.read_text().startswith("#!/usr/bin/env bash")


def fake_machine(tmp_path: Path, *, uid: int, sudo: bool, apt: bool, slurm: bool = False) -> dict:
    """A PATH holding only what the script needs: real python3, grep, dirname, and fakes."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("grep", "dirname"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    (bin_dir / "python3").symlink_to(sys.executable)
    fakes = {"id": f"echo {uid}", "dpkg-query": "exit 1"}  # nothing installed yet
    if sudo:
        fakes["sudo"] = 'exec "$@"'
    if apt:
        fakes["apt-get"] = "exit 0"
    if slurm:
        fakes["sbatch"] = "exit 0"
    for name, body in fakes.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return {"PATH": str(bin_dir), "L2W_QUICKSTART_DRY_RUN": "1", "HOME": str(tmp_path)}


def dry_run(env: dict, *args: str) -> list[str]:
    res = subprocess.run(
        [shutil.which("bash"), str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout.splitlines()


@pytest.mark.parametrize(
    "uid, sudo, prefix", [(0, False, "+ env"), (0, True, "+ env"), (1000, True, "+ sudo env")], ids=str
)
def test_quickstart_installs_the_test_packages_as_root_or_through_sudo(tmp_path, uid, sudo, prefix):
    out = dry_run(fake_machine(tmp_path, uid=uid, sudo=sudo, apt=True, slurm=True), "test")
    install = [line for line in out if "apt-get install" in line]
    assert len(install) == 1, out
    assert install[0].startswith(f"{prefix} DEBIAN_FRONTEND=noninteractive apt-get install")
    for pkg in ("dataset-fashion-mnist", "slurmctld", "slurmd", "slurm-client"):
        assert pkg in install[0].split()
    assert any(line.endswith("apt-get update -qq") for line in out)
    harness = [line for line in out if "slurm_harness.sh start" in line]
    assert harness == [f"{'+ sudo' if uid else '+'} tests/slurm_harness.sh start"]
    assert out.index(install[0]) < out.index(harness[0]) < out.index("+ python -m pytest -q")
    assert "+ python -m pip install -q -e .[test]" in out


def test_quickstart_without_root_or_sudo_skips_apt_and_says_what_that_costs(tmp_path):
    out = dry_run(fake_machine(tmp_path, uid=1000, sudo=False, apt=True), "test")
    assert not any("apt-get" in line and line.startswith("+") for line in out)
    assert any("not root and no sudo" in line for line in out)
    said = "\n".join(out)
    assert "tests/test_slurm_launch.py" in said and "skip" in said
    assert out[-1] == "+ python -m pytest -q"
    readme = README.read_text()
    assert "tests/test_slurm_launch.py" in readme, "the README says what skips without root"


def test_quickstart_demo_without_apt_get_trains_the_demo(tmp_path):
    out = dry_run(fake_machine(tmp_path, uid=0, sudo=False, apt=False), "demo", "train.epochs=1")
    assert any("no apt-get here" in line for line in out)
    assert "+ python -m pip install -q -e ." in out
    assert "+ l2w-train --config configs/demo.yaml --output runs/demo train.epochs=1" in out


def test_quickstart_rejects_an_unknown_mode(tmp_path):
    res = subprocess.run([shutil.which("bash"), str(SCRIPT), "deploy"], capture_output=True, text=True)
    assert res.returncode == 2 and "usage: bash tools/quickstart.sh" in res.stderr


def fake_run(folder: Path, seed: int, top1: list[float], rho: list[float] | None) -> Path:
    """A run folder as l2w-train leaves it, for the README generator: config.yaml and eval.json."""
    import yaml

    from l2w_dist.evaluate import write_eval_json

    folder.mkdir(parents=True)
    cfg = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    cfg["train"]["seed"] = seed
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    anytime = [{"exit": k + 1, "flops": 3e6 * (k + 1), "top1": t, "top5": 99.0} for k, t in enumerate(top1)]
    budgeted = [{"p": i / 20, "flops": 3e6 + i * 1e5, "top1": top1[0] + i * 0.01} for i in range(1, 40)]
    weights = None
    if rho is not None:
        exits = [
            {"exit": k + 1, "spearman": r, "easy_mean": 1 - r / 10, "hard_mean": 1 + r / 10} for k, r in enumerate(rho)
        ]
        exits = [{**e, "quintile_means": [1.0] * 5} for e in exits]
        weights = {"split": "calibration", "samples": 5000, "difficulty": "d", "exits": exits}
    write_eval_json(folder / "eval.json", anytime, budgeted, weights=weights)
    return folder


def test_readme_results_rewrites_only_the_marked_block_from_the_runs(tmp_path):
    sys.path.insert(0, str(ROOT / "tools"))
    import readme_results

    l2w = [
        fake_run(tmp_path / "demo", 0, [80.0, 82.0, 84.0], [-0.4, 0.1, 0.5]),
        fake_run(tmp_path / "demo_s1", 1, [81.0, 83.0, 85.0], [-0.2, 0.3, 0.6]),
    ]
    base = [
        fake_run(tmp_path / "b0", 0, [79.0, 82.5, 84.0], None),
        fake_run(tmp_path / "b1", 1, [80.0, 83.5, 86.0], None),
    ]
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{readme_results.BEGIN}\nold hand-typed 83.55\n{readme_results.END}\nrest\n")
    args = ["--l2w", *map(str, l2w), "--baseline", *map(str, base), "--wall-s", "300", "280", "320"]
    readme_results.main([*args, "--readme", str(readme), "--root", str(tmp_path)])
    text = readme.read_text()
    assert text.startswith(f"intro\n{readme_results.BEGIN}\n") and text.endswith(f"{readme_results.END}\nrest\n")
    assert "83.55" not in text
    assert "| 1 | 3.0 | 80.50 ± 0.50 | 79.50 ± 0.50 | +1.00 |" in text  # means ± half-range over the seeds
    assert "| 3 | 9.0 | 84.50 ± 0.50 | 85.00 ± 1.00 | -0.50 |" in text
    assert "median 5.0 min of 3 L2W runs" in text
    assert "| 1 | -0.30 ± 0.10 | 1.040 | 0.960 |" in text  # Spearman over the seeds, the first run's means
    assert "as the paper claims: easy samples weigh more at exit 1, hard samples at exits 2–3" in text
    assert (tmp_path / "docs" / "demo_curves.png").is_file() and (tmp_path / "docs" / "demo_weights.png").is_file()
    saved = tmp_path / "docs" / "demo_results.json"
    assert readme_results.render_saved(saved) == readme_results.readme_block(text)


def test_the_readme_demo_block_is_what_the_saved_demo_runs_render():
    """The README's demo numbers come from docs/demo_results.json through the generator, not a keyboard."""
    sys.path.insert(0, str(ROOT / "tools"))
    import readme_results

    readme = (ROOT / "README.md").read_text()
    saved = json.loads(readme_results.RESULTS.read_text())
    assert readme_results.readme_block(readme) == readme_results.render_saved()
    demo = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    for run in saved["l2w"] + saved["baseline"]:  # the runs are of the demo as configured now
        for section in ("model", "data", "optim", "train"):
            for key, value in demo[section].items():
                assert run["config"][section][key] == value, (run["run"], section, key)
    assert all(run["config"]["meta"]["enabled"] for run in saved["l2w"])
    assert not any(run["config"]["meta"]["enabled"] for run in saved["baseline"])
