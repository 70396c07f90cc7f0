"""Start torchrun agents as a user would (``python -m torch.distributed.run``), for the tests
that run a script or module under a real launcher, on one or several emulated nodes.

Tests that only need N ranks running a Python function use
:func:`l2w_dist.distributed.testing.run_ranks` instead (no launcher, one spawn per rank).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from l2w_dist.distributed.testing import free_port

REPO = Path(__file__).resolve().parents[2]


def run_torchrun(
    target: Sequence[str], *, nnodes: int = 1, nproc_per_node: int = 2, timeout_s: float = 300.0
) -> list[str]:
    """Run ``nnodes`` torchrun agents on localhost (static rendezvous, as on a cluster without a
    rendezvous store), each starting ``nproc_per_node`` workers of ``target`` (a script and its
    arguments, or ``-m module ...``); return each agent's stdout.

    Fails with the agents' output when one exits non-zero; agents still running after
    ``timeout_s`` are killed. The workers import this checkout (PYTHONPATH), on one thread each.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"}
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="l2w_torchrun_") as logs:
        outputs = [(Path(logs) / f"node{n}.out", Path(logs) / f"node{n}.err") for n in range(nnodes)]
        agents = []
        try:
            for node, (out, err) in enumerate(outputs):
                cmd = [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--nnodes",
                    str(nnodes),
                    "--nproc-per-node",
                    str(nproc_per_node),
                    "--node-rank",
                    str(node),
                    "--master-addr",
                    "127.0.0.1",
                    "--master-port",
                    str(port),
                    *target,
                ]
                # output to files, not pipes: an agent never blocks on a full pipe nobody reads
                with open(out, "w") as stdout, open(err, "w") as stderr:
                    agents.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdout=stdout, stderr=stderr))
            deadline = time.monotonic() + timeout_s
            for agent in agents:
                try:
                    agent.wait(timeout=max(deadline - time.monotonic(), 0))
                except subprocess.TimeoutExpired:
                    pass
        finally:
            killed = [agent.poll() is None for agent in agents]
            for agent in agents:
                if agent.poll() is None:
                    agent.kill()
                    agent.wait()
        texts = [(out.read_text(), err.read_text()) for out, err in outputs]
    failed = [
        f"node {node}: {'killed after timeout_s' if hung else f'exit code {agent.returncode}'}\n"
        f"{stdout[-3000:]}{stderr[-6000:]}"
        for node, (agent, hung, (stdout, stderr)) in enumerate(zip(agents, killed, texts))
        if agent.returncode != 0
    ]
    assert not failed, "\n".join(failed)
    return [stdout for stdout, _ in texts]
