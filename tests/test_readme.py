"""The README's quick start: its two commands, what CI runs, and the script they call, which
must pick the right way to install system packages as root, as a user with sudo, and
without either (a fake PATH plays each machine; the script's dry run prints its commands)."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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
