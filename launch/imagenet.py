"""Submit ImageNet training (default: MSDNet step 4) to Slurm, or run it locally.

    python launch/imagenet.py --cluster slurm --nodes 4 --gpus-per-node 8 --partition gpu

See docs/slurm.md; the implementation is the package l2w_dist/launch/ (command line: cli.py).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a source checkout works uninstalled

from l2w_dist.launch import IMAGENET, main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(preset=IMAGENET))
