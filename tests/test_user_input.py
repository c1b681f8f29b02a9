"""What users pass that is wrong, and what they see: argument errors, schedules, NNX paths."""

import warnings

import jax.numpy as jnp
import optax
import pytest
from flax import nnx

import swats_jax


@pytest.mark.parametrize(
    "factory, kwargs, name",
    [
        (swats_jax.swats_local, {"learning_rate": "1e-3"}, "learning_rate"),
        (swats_jax.swats_global, {"sgd_scale": None}, "sgd_scale"),
        (swats_jax.swats_local, {"switch_tol": "small"}, "switch_tol"),
        (swats_jax.adabound, {"final_lr": "0.1"}, "final_lr"),
    ],
)
def test_non_numeric_hyperparameters_are_refused_by_name(factory, kwargs, name):
    with pytest.raises(TypeError, match=f"{name} must be a number or an Optax schedule"):
        factory(**kwargs)


def test_errors_name_the_argument_the_user_passed():
    with pytest.raises(ValueError, match=r"^switch_tol must be >= 0, got -1\.$"):
        swats_jax.swats_local(switch_tol=-1)
    with pytest.raises(ValueError, match=r"^b1 must be in \[0, 1\), got 1\.0\.$"):
        swats_jax.swats_local(b1=jnp.float32(1.0))


def test_adabound_warns_when_the_schedule_rises_after_step_zero():
    warmup = optax.warmup_cosine_decay_schedule(1e-4, 1e-3, 100, 1000)
    with pytest.warns(UserWarning, match=r"base_lr defaults to .*\(0\.0001\).* 10x .*base_lr="):
        swats_jax.adabound(warmup)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        swats_jax.adabound(warmup, base_lr=1e-3)  # said explicitly: no warning
        swats_jax.adabound(optax.exponential_decay(1e-3, 100, 0.5))  # peak at step 0
        swats_jax.adabound(1e-3)


def test_switch_paths_under_flax_nnx_drop_the_variable_value():
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, swats_jax.swats_local(), wrt=nnx.Param)
    grads = nnx.state(model, nnx.Param)
    grads = optax.tree.full_like(grads, 0.5)  # constant gradients: both switch at step 2
    for _ in range(2):
        optimizer.update(model, grads)
    events = swats_jax.switch_events(optimizer.opt_state)
    assert sorted(e.path for e in events) == ["bias", "kernel"]


def test_a_dict_key_named_value_is_kept():
    opt = swats_jax.swats_local()
    params = {"value": jnp.ones(2)}
    state = opt.init(params)
    for _ in range(2):
        _, state = opt.update({"value": jnp.full(2, 0.5)}, state)
    assert [e.path for e in swats_jax.switch_events(state)] == ["value"]
