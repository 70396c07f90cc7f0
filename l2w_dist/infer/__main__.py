"""``python -m l2w_dist.infer`` is ``l2w-infer``."""

from .cli import main

if __name__ == "__main__":
    main()
