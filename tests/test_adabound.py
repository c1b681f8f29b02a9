"""AdaBound / AMSBound against the NumPy reference and docs/algorithm.md's check values."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import run_optimizer
from numpy_reference import adabound_bounds, adabound_reference
from problems import make_problem

import swats_jax


def _rate_on_first_step(g, **kwargs):
    """The clipped per-element rate on step 1, read back from the update (u = -rate*m)."""
    opt = swats_jax.adabound(**kwargs)
    state = opt.init(jnp.zeros(1))
    updates, _ = opt.update(jnp.array([g]), state)
    return float(-updates[0] / (0.1 * g))  # m = (1 - b1) g on step 1


def test_bounds_at_step_one():
    lower, upper = adabound_bounds(0.1, 1e-3, 1)
    np.testing.assert_allclose([lower, upper], [9.99e-5, 100.1], rtol=1e-4)
    # A tiny gradient wants a huge rate (clipped to upper), a huge one a tiny rate (lower).
    np.testing.assert_allclose(_rate_on_first_step(1e-9), upper, rtol=1e-6)
    np.testing.assert_allclose(_rate_on_first_step(1e9), lower, rtol=1e-6)


def test_bounds_collapse_to_final_lr_at_large_steps():
    opt = swats_jax.adabound(final_lr=0.1)
    state = opt.init(jnp.zeros(2))._replace(count=jnp.asarray(10**8, jnp.int32))
    g = jnp.array([1e-9, 1e9])
    updates, state = opt.update(g, state)
    rates = -updates / (state.mu)
    np.testing.assert_allclose(rates, [0.1, 0.1], rtol=1e-4)


def test_bounds_follow_the_learning_rate_schedule():
    schedule = optax.piecewise_constant_schedule(1e-3, {1: 0.1})
    opt = swats_jax.adabound(learning_rate=schedule)
    state = opt.init(jnp.zeros(1))
    updates, state = opt.update(jnp.array([1e9]), state)
    first = float(-updates[0] / state.mu[0])
    updates, state = opt.update(jnp.array([1e9]), state)
    second = float(-updates[0] / state.mu[0])
    np.testing.assert_allclose(first, adabound_bounds(0.1, 1e-3, 1)[0], rtol=1e-5)
    np.testing.assert_allclose(second, adabound_bounds(0.01, 1e-3, 2)[0], rtol=1e-5)


CASES = {
    "adabound": {},
    "amsbound": {"amsbound": True},
    "weight_decay": {"weight_decay": 0.05},
    "schedule": {"learning_rate": optax.piecewise_constant_schedule(1e-2, {20: 0.1})},
    "base_lr": {"base_lr": 5e-3, "final_lr": 0.05, "gamma": 1e-2},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_numpy_reference(x64, case):
    kwargs = {"learning_rate": 1e-2, **CASES[case]}
    params, grad_fn = make_problem()
    ours, _ = run_optimizer(
        swats_jax.adabound(**kwargs), [jnp.asarray(p) for p in params], grad_fn, 60
    )
    ref_kwargs = dict(kwargs)
    lr = ref_kwargs.pop("learning_rate")
    ref_kwargs["lr"] = (lambda count: float(lr(count))) if callable(lr) else lr
    ref = adabound_reference(params, grad_fn, 60, **ref_kwargs)
    for a, b in zip(ours, ref["params"]):
        for x, y in zip(a, b):
            np.testing.assert_allclose(np.asarray(x), y, rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"gamma": 0.0}, "gamma"),
        ({"base_lr": 0.0}, "base_lr"),
        ({"final_lr": -0.1}, "final_lr"),
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"b1": 1.5}, "b1"),
    ],
)
def test_invalid_hyperparameters(kwargs, name):
    with pytest.raises(ValueError, match=name):
        swats_jax.adabound(**kwargs)


def test_zero_initial_learning_rate_is_rejected_at_init():
    opt = swats_jax.adabound(learning_rate=optax.linear_schedule(0.0, 1e-3, 10))
    with pytest.raises(ValueError, match="base_lr"):
        opt.init(jnp.zeros(2))
