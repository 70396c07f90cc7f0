#!/usr/bin/env python
"""Write WebDataset shards + a JSON sidecar from ImageFolder / CIFAR / Fashion-MNIST / numpy.

    python tools/make_shards.py --source imagefolder --input /data/imagenet \
        --output /data/shards/imagenet --maxcount 5000 --holdout 50000 --workers 16

See docs/data.md; the logic lives in l2w_dist/data/shards.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from l2w_dist.data.shards import main  # noqa: E402

if __name__ == "__main__":
    main()
