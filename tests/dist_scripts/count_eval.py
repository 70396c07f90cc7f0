"""``l2w_dist.train`` under a launcher, recording what each rank's evaluation saw.

    torchrun --nproc-per-node 2 tests/dist_scripts/count_eval.py OUT_DIR --config ... [overrides]

Every ``collect_logits`` call of the run's evaluation (``l2w_dist.evaluate.run``: the
calibration split, then the test split) is wrapped: the batches this rank's loader gave are
fingerprinted (a digest of each image tensor) before the real function runs and gathers
them. ``OUT_DIR/rank{R}.json`` lists, per call, the rank's fingerprints and labels and the
labels the gather returned, so a test can check that each sample was evaluated exactly
once across the ranks and that every rank got all of them back.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import l2w_dist.evaluate.run as evaluate_run  # noqa: E402
from l2w_dist import train  # noqa: E402

real_collect = evaluate_run.collect_logits
calls: list[dict] = []


def counting_collect(model, loader, device, precision="fp32", gather=True):
    batches, fingerprints, labels = [], [], []
    for x, y in loader:
        batches.append((x, y))
        fingerprints += [hashlib.sha1(image.contiguous().numpy().tobytes()).hexdigest() for image in x]
        labels += [int(v) for v in y]
    logits, gathered = real_collect(model, batches, device, precision, gather)
    calls.append({"local": fingerprints, "local_labels": labels, "gathered_labels": gathered.tolist()})
    return logits, gathered


if __name__ == "__main__":
    out = Path(sys.argv[1])
    evaluate_run.collect_logits = counting_collect
    try:
        train.main(sys.argv[2:])
    finally:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(calls))
