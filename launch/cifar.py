"""Submit CIFAR-100 training (default: MSDNet) to Slurm, or run it locally.

    python launch/cifar.py --cluster slurm --gpus-per-node 1 --partition gpu

See docs/slurm.md; the implementation is the package l2w_dist/launch/ (command line: cli.py).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a source checkout works uninstalled

from l2w_dist.launch import CIFAR, main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(preset=CIFAR))
