"""Code the tests share (no tests here).

- ``l2w_reference``: tiny multi-exit models, test optimizers, ``max_rel_diff``, and the one
  literal released-style L2W reference (``reference_meta_loss``, ``reference_half_step``,
  per rank with ``mean_gradients_over_ranks``).
- ``eval_reference``: the released budgeted-batch evaluation loop, written literally.
- ``tiny_run``: a synthetic image set and the overrides of a tiny end-to-end training run.
- ``torchrun``: ``run_torchrun``, torchrun agents on localhost for tests of a real launcher.
- ``host_sync``: ``NoHostSync``, a detector that fails on any host read of a tensor value.

Ranks running a Python function are started by ``l2w_dist.distributed.testing.run_ranks``
(the library's launcher, which bench/scaling.py uses too). The launcher tests' utilities are
tests/launch_testutil.py and tests/launch_stand_in.py; fixtures are in tests/conftest.py.
"""
