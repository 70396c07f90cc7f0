"""The test suite, a package so that its modules import shared code as ``tests.helpers.*``.

Test modules import helpers, never each other. Markers (pyproject.toml): ``integration`` for
tests that start processes, train a run end to end, or drive torchrun/DeepSpeed/Slurm
(``pytest -m "not integration"`` runs the fast unit tests); ``slow`` ones run only on request.
"""
