"""Two emulated nodes: two ``torchrun --nnodes 2 --nproc-per-node 2`` agents on localhost.

Each agent is started with its ``--node-rank`` and the shared master address/port (static
rendezvous, as on a cluster without an etcd/c10d store); the 4 workers run
tests/dist_scripts/equality.py, which checks that 4 ranks (2 per node) end two L2W half
steps with ``sync="global"`` exactly where one process does on the concatenated batch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from l2w_dist.distributed.testing import free_port

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "dist_scripts" / "equality.py"


def test_two_torchrun_nodes_equal_one_process(tmp_path):
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu"}
    agents = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--nproc-per-node",
                "2",
                "--node-rank",
                str(node),
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                str(port),
                str(SCRIPT),
                "--out",
                str(tmp_path),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in (0, 1)
    ]
    logs = []
    try:
        for a in agents:
            logs.append(a.communicate(timeout=150)[0])
    finally:
        for a in agents:
            if a.poll() is None:
                a.kill()
                a.wait()
    assert all(a.returncode == 0 for a in agents), "\n".join(log[-3000:] for log in logs)
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
    for r, rec in enumerate(records):
        assert (rec["rank"], rec["world_size"], rec["num_nodes"], rec["local_world_size"]) == (r, 4, 2, 2)
        assert (rec["node_rank"], rec["local_rank"]) == (r // 2, r % 2)
        assert (rec["launcher"], rec["backend"]) == ("torchrun", "gloo")
        assert len(rec["cases"]) == 3
        for case in rec["cases"]:
            assert case["max_rel_diff"] <= 1e-9, (r, case)
