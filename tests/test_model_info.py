"""tools/model_info.py: the paper table comes from the registry and the counted FLOPs."""

import json

import pytest

from l2w_dist.models import create_model
from tools.model_info import main, parse_overrides


def test_parse_overrides():
    assert parse_overrides(["step=6", "growth_factor=[1,2,4,4]", "step_mode=even", "bottleneck=false"]) == {
        "step": 6,
        "growth_factor": [1, 2, 4, 4],
        "step_mode": "even",
        "bottleneck": False,
    }
    with pytest.raises(SystemExit):
        parse_overrides(["step"])


def test_markdown_table(capsys):
    assert main(["msdnet_cifar", "num_blocks=2", "num_classes=10"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 2
    flops = create_model("msdnet_cifar", num_blocks=2, num_classes=10).exit_flops
    assert [float(r.split("|")[2]) for r in rows] == [round(f / 1e6, 1) for f in flops]
    assert "| total |" in out


def test_json_params_are_cumulative_and_end_at_the_total(capsys):
    assert main(["msdnet_cifar", "num_blocks=3", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    params = [e["params"] for e in info["exits"]]
    assert params == sorted(params) and params[-1] == info["total_params"]
    model = create_model("msdnet_cifar", num_blocks=3)
    assert info["total_params"] == sum(p.numel() for p in model.parameters())


def test_bad_option_is_reported(capsys):
    assert main(["msdnet_imagenet", "step=5"]) == 2
    assert "allowed values: [4, 6, 7]" in capsys.readouterr().err
