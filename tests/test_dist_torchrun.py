"""Two emulated nodes: two ``torchrun --nnodes 2 --nproc-per-node 2`` agents on localhost.

Each agent is started with its ``--node-rank`` and the shared master address/port (static
rendezvous, as on a cluster without an etcd/c10d store); the 4 workers run
tests/dist_scripts/equality.py, which checks that 4 ranks (2 per node) end two L2W half
steps with ``sync="global"`` exactly where one process does on the concatenated batch.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.torchrun import run_torchrun

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).resolve().parent / "dist_scripts" / "equality.py"


def test_two_torchrun_nodes_equal_one_process(tmp_path):
    run_torchrun([str(SCRIPT), "--out", str(tmp_path)], nnodes=2, nproc_per_node=2)
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
    for r, rec in enumerate(records):
        assert (rec["rank"], rec["world_size"], rec["num_nodes"], rec["local_world_size"]) == (r, 4, 2, 2)
        assert (rec["node_rank"], rec["local_rank"]) == (r // 2, r % 2)
        assert (rec["launcher"], rec["backend"]) == ("torchrun", "gloo")
        assert len(rec["cases"]) == 3
        for case in rec["cases"]:
            assert case["max_rel_diff"] <= 1e-9, (r, case)
