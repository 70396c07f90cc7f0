#!/usr/bin/env bash
# The README's quick start, on a fresh Debian/Ubuntu machine (or any Linux with Python >= 3.10):
#
#   bash tools/quickstart.sh demo [KEY=VALUE ...]   # install, train + evaluate the demo -> runs/demo
#   bash tools/quickstart.sh test [PYTEST ARGS ...] # install the test extras, run the tests (-q)
#
# System packages come from apt-get: as root directly, otherwise through sudo; with neither
# (or without apt-get) they are skipped and the script says what that costs. Python packages
# go into the virtual environment $L2W_VENV (default .venv), created when missing.
# L2W_QUICKSTART_DRY_RUN=1 prints the commands instead of running them.
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=${1:-}
[ $# -gt 0 ] && shift
VENV=${L2W_VENV:-.venv}
DRY=${L2W_QUICKSTART_DRY_RUN:-}
TORCH=(torch==2.14.1 torchvision==0.29.1) # the pinned CPU-capable release
DEMO_PACKAGES=(dataset-fashion-mnist)
TEST_PACKAGES=(dataset-fashion-mnist slurmctld slurmd slurm-client)

say() { echo "quickstart: $*"; }
run() {
    echo "+ $*"
    [ -n "$DRY" ] || "$@"
}

# How to run a command as root: directly, through sudo, or not at all ("").
if [ "$(id -u)" = 0 ]; then
    AS_ROOT=()
elif command -v sudo >/dev/null 2>&1; then
    AS_ROOT=(sudo)
else
    AS_ROOT=(none)
fi
as_root() {
    if [ "${AS_ROOT[*]}" = none ]; then return 1; fi
    run "${AS_ROOT[@]}" "$@"
}

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

# apt-get install what is missing of "$@"; explain what goes without when that is impossible.
system_packages() {
    local missing=() pkg
    for pkg in "$@"; do installed "$pkg" || missing+=("$pkg"); done
    if ! python3 -c "import ensurepip" >/dev/null 2>&1; then missing+=(python3-venv); fi
    if [ ${#missing[@]} -eq 0 ]; then
        say "system packages present: $*"
        return 0
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        say "no apt-get here; not installing ${missing[*]}"
        return 1
    fi
    if [ "${AS_ROOT[*]}" = none ]; then
        say "not root and no sudo; not installing ${missing[*]}"
        return 1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

python_env() {
    [ -x "$VENV/bin/python" ] || run python3 -m venv "$VENV"
    if [ -z "$DRY" ]; then
        # shellcheck disable=SC1091
        . "$VENV/bin/activate"
    fi
    export PIP_DISABLE_PIP_VERSION_CHECK=1
    run python -m pip install -q "${TORCH[@]}"
    run python -m pip install -q -e "$1"
}

case "$MODE" in
demo)
    system_packages "${DEMO_PACKAGES[@]}" ||
        say "the demo downloads Fashion-MNIST through torchvision instead of /usr/share/datasets/fashion-mnist"
    python_env .
    run l2w-train --config configs/demo.yaml --output runs/demo "$@"
    say "done: runs/demo/eval.json, curve.png, weights.png; '. $VENV/bin/activate' to use l2w-train, l2w-eval"
    ;;
test)
    system_packages "${TEST_PACKAGES[@]}" ||
        say "without Slurm the tests/test_slurm_launch.py tests skip (they need a local slurmctld + slurmd, started" \
            "as root); tests/test_data.py::test_prepare_fashion_mnist_real (slow) skips without dataset-fashion-mnist"
    python_env ".[test]"
    harness=""
    if command -v sbatch >/dev/null 2>&1 && [ "${AS_ROOT[*]}" != none ]; then
        # the Slurm tests need root to start the local controller: start it here (through sudo
        # when not root), so that a user with sudo runs them too
        as_root tests/slurm_harness.sh start && harness=1 ||
            say "the local Slurm did not start; tests/test_slurm_launch.py will say why"
    fi
    [ $# -gt 0 ] || set -- -q
    rc=0
    run python -m pytest "$@" || rc=$?
    if [ -n "$harness" ]; then as_root tests/slurm_harness.sh stop || true; fi
    exit "$rc"
    ;;
*)
    echo "usage: bash tools/quickstart.sh demo [KEY=VALUE ...] | test [PYTEST ARGS ...]" >&2
    exit 2
    ;;
esac
