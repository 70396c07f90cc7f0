"""The test suite, a package so that its modules import shared code as ``tests.helpers.*``.

Test modules import helpers, never each other. Markers (pyproject.toml): ``integration`` for
tests that start processes, train a run end to end, or drive torchrun/DeepSpeed/Slurm;
``slow`` ones are left out by default. A ``-m`` on the command line replaces the default
one, so the fast unit tests are ``pytest -m "not integration and not slow"``.
"""
