"""Config loading: YAML + dotted overrides, and clear errors for bad keys and values."""

import dataclasses
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args, get_origin

import pytest
import yaml

from l2w_dist.config import Config, ConfigError, MetaConfig, config_from_dict, load_config, save_config
from l2w_dist.meta import L2WConfig, weight_net
from l2w_dist.meta import settings as l2w_settings
from l2w_dist.meta.settings import L2WSettings
from l2w_dist.utils.settings import SettingError, Settings, at_least, is_free, setting

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
        ("meta.hypergrad=magic", "choose one of ['jvp', 'autograd', 'finite_difference']"),
        ("meta.label_smoothing=0.1", "unknown key(s) ['meta.label_smoothing']"),  # optim's, not meta's
        ("meta.fd_step=0", "meta.fd_step=0.0 is not allowed; expected a positive number"),
        ("meta.weight_decay=-1", "meta.weight_decay=-1.0 is not allowed; expected a number >= 0"),
        ("train.ckpt_every=-1", "train.ckpt_every=-1 is not allowed; expected an integer >= 0"),
        ("train.threads=-2", "train.threads=-2 is not allowed; expected an integer >= 0"),
        ("eval.every_epochs=-1", "eval.every_epochs=-1 is not allowed; expected an integer >= 0"),
        ("data.eval_batch_size=0", "data.eval_batch_size=0 is not allowed; expected an integer >= 1"),
        ("optim.betas=[0.9,1.0]", "optim.betas=(0.9, 1.0) is not allowed; expected a list of values, each a number in"),
        ("optim.betas=[0.9,fast]", "optim.betas[1]='fast' must be a number"),
        ("optim.eps=0", "optim.eps=0.0 is not allowed; expected a positive number"),
        ("optim.min_lr=-1e-5", "optim.min_lr=-1e-05 is not allowed; expected a number >= 0"),
        ("optim.lr_reference_batch=-256", "optim.lr_reference_batch=-256 is not allowed; expected an integer >= 0"),
        ("model.name=''", "model.name='' is not allowed; expected a non-empty string"),
        ("wandb.tags=[ok,'']", "wandb.tags=['ok', ''] is not allowed"),
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


# --- every field is checked or declared free ----------------------------------------------------


def _leaves(cls: type, prefix: str = "") -> typing.Iterator[tuple[str, type, dataclasses.Field, type]]:
    """(dotted key, section class, field, type) for every non-section field, recursively."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _leaves(hints[f.name], prefix + f.name + ".")
        else:
            yield prefix + f.name, cls, f, hints[f.name]


_NUMBERS = [-(2**40), -1, 0, 1, 3, 7, 40, 2**40]


def _probes(typ: type) -> list:
    """Values of type ``typ`` of which a checked field should reject at least one."""
    origin, args = get_origin(typ), get_args(typ)
    if origin is Literal:
        return ["no-such-choice"]
    if typ is int:
        return list(_NUMBERS)
    if typ is float:
        return [float(v) for v in _NUMBERS] + [0.5, 1.5, math.nan]
    if typ is str:
        return ["", "x" * 100]
    if origin is tuple:
        return [tuple([v] * len(args)) for v in _probes(args[0])]
    if origin is list:
        return [[v] for v in _probes(args[0])]
    return []  # bool, dict: every value of the type is meaningful, so such fields must be free


LEAVES = list(_leaves(Config))


def test_the_walk_sees_every_section():
    sections = {key.split(".")[0] for key, *_ in LEAVES}
    assert sections == {f.name for f in dataclasses.fields(Config)}
    assert {"meta.epsilon", "meta.fd_step", "meta.reuse_meta_forward", "optim.label_smoothing"} <= {
        key for key, *_ in LEAVES
    }


@pytest.mark.parametrize("key, section, field, typ", LEAVES, ids=[key for key, *_ in LEAVES])
def test_every_field_rejects_a_bad_value_or_is_declared_free(key, section, field, typ):
    assert issubclass(section, Settings), f"{section.__name__} is not validated on construction"
    if is_free(field):
        return
    rejected = []
    for value in _probes(typ):
        try:
            load_config(None, [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip()}"])
        except SettingError as err:
            assert str(err).startswith(f"{key}="), str(err)
            assert "is not allowed" in str(err), str(err)  # refused by its check, not by its type
            rejected.append(value)
    assert rejected, f"{key} accepts every probe {_probes(typ)}: give it a check, or declare it free=True"


def test_a_field_without_a_check_is_refused():
    @dataclass
    class Unchecked(Settings):
        checked: int = setting(1, at_least(0))
        forgotten: int = 3

    with pytest.raises(TypeError, match="Unchecked.forgotten declares no check"):
        Unchecked()
    with pytest.raises(TypeError, match="either free or checked"):
        setting(1, at_least(0), free=True)


def test_python_construction_is_checked_and_typed_like_yaml():
    with pytest.raises(SettingError, match=r"L2WConfig.epsilon=-0.5 is not allowed; expected a number >= 0"):
        L2WConfig(epsilon=-0.5)
    with pytest.raises(SettingError, match="MetaConfig.hypergrad='double' is not allowed; choose one of"):
        MetaConfig(hypergrad="double")
    assert isinstance(L2WConfig(epsilon=1).epsilon, float)


# --- the L2W settings are declared once ----------------------------------------------------------


def test_l2w_settings_are_declared_once():
    shared = dataclasses.fields(L2WSettings)
    meta = {f.name: f for f in dataclasses.fields(MetaConfig)}
    l2w = {f.name: f for f in dataclasses.fields(L2WConfig)}
    for f in shared:  # inherited, not redeclared: the very same field objects
        assert meta[f.name] is f and l2w[f.name] is f
    assert set(l2w) - {f.name for f in shared} == {"label_smoothing"}
    assert "label_smoothing" not in meta  # the run config's is optim.label_smoothing
    assert {f.name for f in dataclasses.fields(MetaConfig)} - {f.name for f in shared} == {
        "enabled",
        "interval",
        "hidden",
        "layers",
        "lr",
        "weight_decay",
    }


def test_one_set_of_defaults_and_one_way_to_the_l2w_config():
    cfg = load_config(None, ["optim.label_smoothing=0.1", "meta.constraint=row", "meta.fd_step=0.01"])
    built = cfg.meta.l2w(label_smoothing=cfg.optim.label_smoothing)
    assert built == L2WConfig(constraint="row", fd_step=0.01, label_smoothing=0.1)
    defaults = Config().meta.l2w(label_smoothing=0.0)
    assert defaults == L2WConfig()
    assert (defaults.epsilon, defaults.constraint, defaults.reuse_meta_forward) == (0.8, "col", True)


def test_allowed_choices_live_in_one_place():
    assert weight_net.CONSTRAINTS is l2w_settings.CONSTRAINTS
    assert weight_net.WPN_INPUTS is l2w_settings.WPN_INPUTS
    hints = typing.get_type_hints(MetaConfig)
    assert get_args(hints["hypergrad"]) == l2w_settings.HYPERGRADS == ("jvp", "autograd", "finite_difference")
    assert get_args(hints["sync"]) == l2w_settings.SYNCS
    assert get_args(hints["real_weights"]) == l2w_settings.REAL_WEIGHTS
    assert get_args(hints["constraint"]) == l2w_settings.CONSTRAINTS
