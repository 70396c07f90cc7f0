"""Config loading: YAML + dotted overrides, and clear errors for bad keys and values."""

from pathlib import Path

import pytest
import yaml

from l2w_dist.config import Config, ConfigError, config_from_dict, load_config, save_config

CONFIGS = sorted(Path(__file__).resolve().parents[1].glob("configs/**/*.yaml"))


def test_overrides_are_typed():
    cfg = load_config(None, ["optim.lr=0.4", "meta.interval=10", "model.options.step=6", "optim.betas=[0.8,0.9]"])
    assert cfg.optim.lr == 0.4 and isinstance(cfg.optim.lr, float)
    assert cfg.meta.interval == 10
    assert cfg.model.options == {"step": 6}
    assert cfg.optim.betas == (0.8, 0.9)


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1", "unknown key(s) ['optim.lrr']"),
        ("foo.bar=1", "unknown key(s) ['foo']"),
        ("meta.constraint=diag", "meta.constraint='diag' is not allowed; choose one of ['mat', 'col', 'row']"),
        ("meta.hypergrad=magic", "choose one of ['jvp', 'autograd']"),
        ("train.batch_size=7", "train.batch_size=7 is not allowed; expected an even integer"),
        ("optim.lr=fast", "optim.lr='fast' must be a number"),
        ("optim.lr=-1", "optim.lr=-1.0 is not allowed; expected a positive number"),
        ("meta.target_p_index=40", "meta.target_p_index=40 is not allowed; expected an integer in 1..39"),
        ("train.channels_last=maybe", "train.channels_last='maybe' must be true or false"),
        ("dist.zero_stage=4", "dist.zero_stage=4 is not allowed; expected one of 0, 1, 2, 3"),
        ("lr", "override 'lr' is not of the form key=value"),
    ],
)
def test_bad_overrides_name_key_and_allowed_values(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_missing_file_and_bad_top_level(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)


def test_save_and_reload_round_trip(tmp_path):
    cfg = load_config(None, ["optim.name=adamw", "wandb.tags=[a,b]", "model.options={step: 4}"])
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg
    assert config_from_dict(yaml.safe_load((tmp_path / "c.yaml").read_text())) == cfg


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_shipped_configs_are_valid(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    from l2w_dist.models import list_models

    assert cfg.model.name in list_models()
