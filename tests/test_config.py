"""The run configuration: one field per option, from which the command line and the
resume check follow."""

import dataclasses
import json
import typing

import pytest

from train import cifar
from train.config import (
    MAY_CHANGE_ON_RESUME,
    Config,
    field_types,
    is_optional,
)
from train.trainer import ConfigMismatchError, _check_config

FIELDS = dataclasses.fields(Config)


def _flag(field: dataclasses.Field) -> str:
    return "--" + field.name.replace("_", "-")


def _other_value(field: dataclasses.Field):
    """A valid value of ``field`` other than its default."""
    if field.metadata["choices"]:
        return next(c for c in field.metadata["choices"] if c != field.default)
    annotation = field_types()[field.name]
    if is_optional(annotation):
        (annotation,) = (a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is tuple:
        return tuple(v + 1 for v in field.default)
    if annotation is int:
        return (field.default or 1) + 1
    if annotation is float:
        return 0.5 if field.default is None else 2 * field.default
    if annotation is str:
        return "elsewhere"
    raise AssertionError(f"no test value for {field.name}: {annotation}; add one here")


def _argv(field: dataclasses.Field, value) -> list[str]:
    if isinstance(value, tuple):
        return [_flag(field), *map(str, value)]
    return [f"{_flag(field)}={value}"]


def test_every_field_has_a_flag_with_its_default():
    parser = cifar._parser()
    actions = {a.dest: a for a in parser._actions}
    for field in FIELDS:
        action = actions[field.name]
        assert action.option_strings == [_flag(field)]
        assert action.default == field.default and action.help.startswith(field.metadata["help"])
        assert action.choices == field.metadata["choices"]
    assert set(actions) == {f.name for f in FIELDS} | {"help", "workdir"}
    assert Config.from_values(vars(parser.parse_args([]))) == Config()


@pytest.mark.parametrize("field", FIELDS, ids=lambda f: f.name)
def test_every_flag_sets_its_field(field):
    value = _other_value(field)
    args = cifar._parser().parse_args(_argv(field, value))
    assert Config.from_values(vars(args)) == dataclasses.replace(Config(), **{field.name: value})


@pytest.mark.parametrize("field", FIELDS, ids=lambda f: f.name)
def test_resume_check_follows_the_field_metadata(tmp_path, field):
    (tmp_path / "config.json").write_text(json.dumps(Config().to_json()))
    changed = dataclasses.replace(Config(), **{field.name: _other_value(field)})
    if field.metadata["may_change_on_resume"]:
        _check_config(tmp_path, changed)
    else:
        with pytest.raises(ConfigMismatchError, match=f"different configuration \\({field.name}:"):
            _check_config(tmp_path, changed)


def test_fields_that_may_change_on_resume():
    assert MAY_CHANGE_ON_RESUME == {
        "epochs",
        "max_steps",
        "num_devices",
        "chunk_steps",
        "cache_dir",
    }


def test_tuple_fields_take_lists():
    config = Config(synthetic_size=[8, 4])  # as JSON, argparse and papermill give them
    assert config.synthetic_size == (8, 4) and hash(config) == hash(Config(synthetic_size=(8, 4)))


def test_from_values_takes_the_fields_and_ignores_other_names():
    values = {"epochs": 3, "optimizers": ["adam"], "workdir": "runs", "opt": "sgd"}
    assert Config.from_values(values, opt="adam") == Config(epochs=3, opt="adam")
