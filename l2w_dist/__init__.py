"""l2w_dist: distributed training of dynamic early-exiting networks with L2W-DEN weighting."""

__version__ = "0.1.0"
