"""Small mechanisms shared across the package, one copy each (no imports of the rest of l2w_dist)."""

from .atomic import atomic_write, atomic_write_json
from .precision import autocast
from .signals import SignalAbort, StopSignals

__all__ = ["SignalAbort", "StopSignals", "atomic_write", "atomic_write_json", "autocast"]
