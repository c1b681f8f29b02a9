"""The run configuration: one field per option, from which the command line and the
resume check follow; the optimizer recipes against their documented values."""

import dataclasses
import itertools
import json
import subprocess
import sys
import typing
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import swats_jax
from train import cifar
from train.config import (
    MAY_CHANGE_ON_RESUME,
    MODELS,
    OPTIMIZERS,
    PUBLISHED_TEST_ACCURACY,
    RECIPES,
    Config,
    field_types,
    is_optional,
    make_optimizer,
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
        return 2 * (field.default or 0.25)
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
    # Besides the fields: the workdir, and how this process joins others (not run options).
    processes = {"distributed", "coordinator", "num_processes", "process_id"}
    assert set(actions) == {f.name for f in FIELDS} | {"help", "workdir"} | processes
    assert Config.from_values(vars(parser.parse_args([]))) == Config()


@pytest.mark.parametrize("field", FIELDS, ids=lambda f: f.name)
def test_every_flag_sets_its_field(field):
    value = _other_value(field)
    assert value != field.default
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
        "max_train_loss",  # a guard: it does not change what the run computes
    }


def test_tuple_fields_take_lists():
    config = Config(synthetic_size=[8, 4])  # as JSON, argparse and papermill give them
    assert config.synthetic_size == (8, 4) and hash(config) == hash(Config(synthetic_size=(8, 4)))


def test_from_values_takes_the_fields_and_ignores_other_names():
    values = {"epochs": 3, "optimizers": ["adam"], "workdir": "runs", "opt": "sgd"}
    assert Config.from_values(values, opt="adam") == Config(epochs=3, opt="adam")


@pytest.mark.parametrize("argv", [["--help"], ["--opt=lion"], ["--epochs=0"]])
def test_help_and_flag_errors_do_not_load_jax(argv):
    script = (
        "import sys\n"
        "from train import cifar\n"
        "try:\n"
        f"    cifar.main({argv!r})\n"
        "except SystemExit as exit:\n"
        "    print(exit.code, 'jax' in sys.modules)\n"
    )
    root = Path(__file__).resolve().parents[1]  # imports this checkout's train
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=root
    )
    assert result.stdout.splitlines()[-1] == ("0 False" if argv == ["--help"] else "2 False")


# The recipes as make_optimizer's docstring states them, by (opt, model): the Adam-phase
# (or base) learning rate and the factor on the SGD-phase rates, each from the given
# epoch (1-based) on.
R, D = "resnet18", "densenet121"
DOCUMENTED = {
    ("swats_local", R): ({1: 1e-3, 100: 1e-4}, {1: 1.0, 75: 0.1, 150: 0.01}),
    ("swats_local", D): ({1: 1e-3, 100: 1e-4}, {1: 1.0, 75: 0.1, 150: 0.01}),
    ("swats_global", R): ({1: 1e-3}, {1: 1.0, 100: 0.1}),
    ("swats_global", D): ({1: 1e-3}, {1: 1.0, 150: 0.1}),
    ("adabound", R): ({1: 1e-3, 101: 1e-4}, {1: 1.0}),
    ("adabound", D): ({1: 1e-3, 151: 1e-4}, {1: 1.0}),
    ("adam", R): ({1: 1e-3}, {1: 1.0}),
    ("adam", D): ({1: 1e-3}, {1: 1.0}),
    ("sgd", R): ({1: 0.1, 100: 0.01, 150: 1e-3}, {1: 1.0}),
    ("sgd", D): ({1: 0.1, 100: 0.01, 150: 1e-3}, {1: 1.0}),
}
CHANGE_EPOCHS = (75, 100, 101, 150, 151)  # every model's, checked on all


def test_every_optimizer_and_model_is_documented():
    assert set(DOCUMENTED) == set(itertools.product(OPTIMIZERS, MODELS))


def _documented_optimizer(opt, first_lr, momentum):
    """The optimizer the docstring names, at the rate of the first epoch (a schedule, as
    Optax keeps a count for schedules)."""
    lr = optax.constant_schedule(first_lr)
    return {
        "swats_local": lambda: swats_jax.swats_local(learning_rate=lr),
        "swats_global": lambda: swats_jax.swats_global(learning_rate=lr, momentum=momentum),
        "adabound": lambda: swats_jax.adabound(learning_rate=lr, final_lr=0.1, base_lr=first_lr),
        "adam": lambda: optax.adam(lr),
        "sgd": lambda: optax.sgd(lr, momentum=0.9),
    }[opt]()


def _updates(optimizer, steps=6):
    """Updates of a few steps on gradients that switch SWATS and bound AdaBound early."""
    params = {"small": jnp.ones(2), "large": jnp.linspace(-1.0, 1.0, 3)}
    grads = {"small": jnp.full(2, 0.5), "large": jnp.array([50.0, -200.0, 3e3])}
    state = optimizer.init(params)
    out = []
    for _ in range(steps):
        updates, state = optimizer.update(grads, state, params)
        out.append(updates)
    return jax.tree.structure(state), out


@pytest.mark.parametrize("opt, model", DOCUMENTED)
@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("lr", [None, 0.02])
def test_make_optimizer_builds_the_documented_recipe(opt, model, recipe, lr):
    lr_by_epoch, scale_by_epoch = DOCUMENTED[opt, model]
    if recipe == "none":  # every rate constant
        lr_by_epoch, scale_by_epoch = {1: lr_by_epoch[1]}, {1: 1.0}
    if lr is not None:  # replaces the first rate; the changes apply to it
        lr_by_epoch = {e: v * lr / lr_by_epoch[1] for e, v in lr_by_epoch.items()}

    def at(by_epoch, count, steps_per_epoch):
        epoch = count // steps_per_epoch + 1
        return by_epoch[max(e for e in by_epoch if e <= epoch)]

    for steps_per_epoch in (391, 7):
        setup = make_optimizer(Config(opt=opt, model=model, recipe=recipe, lr=lr), steps_per_epoch)
        starts = [(e - 1) * steps_per_epoch for e in CHANGE_EPOCHS]
        counts = [0, 1, *(c + d for c in starts for d in (-1, 0, 1)), 200 * steps_per_epoch - 1]
        for count in counts:
            np.testing.assert_allclose(
                float(setup.learning_rate(count)),
                at(lr_by_epoch, count, steps_per_epoch),
                rtol=1e-6,
                err_msg=f"learning rate at count {count}",
            )
            np.testing.assert_allclose(
                float(setup.sgd_scale(count)),
                at(scale_by_epoch, count, steps_per_epoch),
                rtol=1e-6,
                err_msg=f"sgd_scale at count {count}",
            )

    momentum = "reference" if recipe == "reference" else "paper"
    expected = _updates(_documented_optimizer(opt, lr_by_epoch[1], momentum))
    built = _updates(setup.optimizer)
    assert built[0] == expected[0]
    for a, b in zip(jax.tree.leaves(built[1]), jax.tree.leaves(expected[1])):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_unknown_optimizer_is_refused():
    config = Config()
    object.__setattr__(config, "opt", "lion")  # past Config's own check
    known = "swats_local, swats_global, adabound, adam, sgd"
    with pytest.raises(ValueError, match=f"unknown optimizer 'lion'; known: {known}"):
        make_optimizer(config, 391)


def test_published_test_accuracy():
    assert PUBLISHED_TEST_ACCURACY == {
        (R, "swats_global"): 92.89,
        (R, "swats_local"): 94.13,
        (R, "adabound"): 93.0,
        (D, "swats_global"): 93.30,
        (D, "swats_local"): 94.62,
        (D, "adabound"): 93.36,
    }
