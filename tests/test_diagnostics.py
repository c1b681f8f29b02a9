"""switch_diagnostics: the last switch test of every leaf, against the NumPy oracle and
through the wrappers switch_events reads through (docs/algorithm.md, section 2)."""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from numpy_reference import swats_reference
from problems import make_problem

import swats_jax
import swats_jax.events

NUM_STEPS = 60
CHECKED_STEPS = (1, 2, 5, 6, 12, 30, NUM_STEPS)
STOP = 5  # the gradient of the leaf "5" is zero from update count STOP on


def _problem():
    """make_problem's four leaves, plus "4" (always a zero gradient: its test never runs)
    and "5" (a zero gradient from count STOP on: its tests stop, from step STOP + 1)."""
    params, grad_fn = make_problem()
    params = params + [np.ones(3), np.full(2, 0.5)]

    def grads(count, current):
        return grad_fn(count, current[:4]) + [np.zeros(3), current[5] * float(count < STOP)]

    return params, grads


def _run_with_diagnostics(opt, params, grad_fn, num_steps):
    """Our optimizer for ``num_steps`` steps; the diagnostics after each step, by step."""
    params = [jnp.asarray(p) for p in params]
    state = opt.init(params)
    update = jax.jit(opt.update)
    rows = {}
    for count in range(num_steps):
        grads = grad_fn(count, [np.asarray(p) for p in params])
        updates, state = update([jnp.asarray(g) for g in grads], state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
        rows[count + 1] = swats_jax.switch_diagnostics(state)
    return rows


CASES = {
    "local": (
        lambda: swats_jax.swats_local(learning_rate=1e-2),
        {"mode": "local", "lr": 1e-2},
    ),
    "global": (
        lambda: swats_jax.swats_global(learning_rate=1e-2, switch_rtol=1e-3),
        {"mode": "global", "lr": 1e-2, "switch_rtol": 1e-3},
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_diagnostics_match_the_numpy_oracle(x64, case):
    make_opt, reference_kwargs = CASES[case]
    params, grad_fn = _problem()
    ours = _run_with_diagnostics(make_opt(), params, grad_fn, NUM_STEPS)
    for steps in CHECKED_STEPS:
        ref = swats_reference(params, grad_fn, steps, **reference_kwargs)
        rows = ours[steps]
        where = f"after step {steps}"
        assert [r.path for r in rows] == [str(i) for i in range(len(params))]
        estimate = np.array([r.estimate for r in rows])
        gamma = np.array([r.gamma for r in rows])
        np.testing.assert_allclose(estimate, ref["lam_hat"], rtol=1e-12, err_msg=where)
        np.testing.assert_allclose(gamma, ref["gamma"], rtol=1e-12, err_msg=where)
        gap = np.abs(np.array(ref["lam_hat"]) - np.array(ref["gamma"]))
        np.testing.assert_allclose(
            [r.absolute_gap for r in rows], gap, rtol=1e-6, atol=1e-13, err_msg=where
        )
        np.testing.assert_allclose(
            [r.relative_gap for r in rows],
            gap / np.abs(ref["gamma"]),
            rtol=1e-6,
            atol=1e-11,
            err_msg=where,
        )
        assert [r.phase for r in rows] == ["sgd" if s else "adam" for s in ref["switched"]]
        switch_steps = {str(i): k for i, k, _ in ref["events"]}
        assert [r.switch_step for r in rows] == [switch_steps.get(r.path) for r in rows]
        # The leaf "4" never ran a test: NaN, not a gap of 0 that would read as "passed"
        # (in global mode it is in SGD once another leaf has switched).
        never = rows[4]
        assert never.switch_step is None
        assert all(np.isnan(x) for x in (never.estimate, never.gamma, never.absolute_gap))

    # On step 1, Lam == gamma: a gap of 0 that cannot pass (k > 1 is required).
    assert all(r.absolute_gap == 0 for r in ours[1] if r.path != "4")
    assert ref["events"], "the run must cover a switch"
    # A switched leaf keeps the values of its switch step.
    for i, k, rate in ref["events"]:
        row = ours[NUM_STEPS][i]
        assert row.phase == "sgd" and row.switch_step == k
        assert row[3:] == ours[k][i][3:]
        np.testing.assert_allclose(row.estimate, rate, rtol=1e-12)


def test_skipped_steps_keep_the_last_valid_gamma(x64):
    # The leaf "5" has a zero gradient from count STOP on: pg == 0 skips its test, so its
    # estimate and gamma stay those of step STOP, while lam is unchanged as well.
    params, grad_fn = _problem()
    ours = _run_with_diagnostics(swats_jax.swats_local(learning_rate=1e-2), params, grad_fn, 20)
    ref = swats_reference(params, grad_fn, STOP, mode="local", lr=1e-2)
    kept = ours[STOP][5]
    assert kept.phase == "adam" and np.isfinite(kept.gamma)
    np.testing.assert_allclose(kept.gamma, ref["gamma"][5], rtol=1e-12)
    assert all(ours[k][5] == kept for k in range(STOP + 1, 21))


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf])
def test_a_nonfinite_gradient_keeps_the_last_valid_gamma(bad):
    opt = swats_jax.swats_local(learning_rate=1e-2, switch_tol=0.0)
    state = opt.init(jnp.ones(3))
    history = []
    for step in range(4):
        g = jnp.array([0.3, bad, 0.1]) if step == 2 else jnp.array([0.3, 0.2, 0.1]) * (step + 1)
        _, state = opt.update(g, state)
        history.append(swats_jax.switch_diagnostics(state)[0])
    assert history[2] == history[1]
    assert np.isfinite(history[2].gamma) and history[2].path == ""


def test_before_the_first_step_everything_is_nan():
    state = swats_jax.swats_global().init({"a": jnp.ones(2), "b": jnp.ones((2, 2), jnp.bfloat16)})
    rows = swats_jax.switch_diagnostics(state)
    assert [(r.path, r.phase, r.switch_step) for r in rows] == [
        ("a", "adam", None),
        ("b", "adam", None),
    ]
    assert all(np.isnan(r[3:]).all() for r in rows)
    assert state.gamma["b"].dtype == jnp.float32 and state.estimate["b"].dtype == jnp.float32
    # The state itself holds 0 there, not NaN (docs/algorithm.md, section 2).
    assert float(state.gamma["a"]) == float(state.estimate["a"]) == 0.0


@pytest.mark.parametrize("factory", [swats_jax.swats_local, swats_jax.swats_global])
def test_the_state_stays_free_of_nan_for_jax_debug_nans(factory):
    # Leaves whose test never runs (a zero gradient, no elements) keep the 0 of "no test
    # yet": a NaN there would stop every step under jax_debug_nans, and a multi-process
    # device_put of the state, which compares the processes' values (NaN != NaN).
    params = {"dead": jnp.zeros(2), "empty": jnp.zeros((0, 3)), "w": jnp.ones(3)}
    grads = {"dead": jnp.zeros(2), "empty": jnp.zeros((0, 3)), "w": jnp.array([0.3, -0.2, 0.1])}
    opt = factory()
    with jax.debug_nans(True):
        state = opt.init(params)
        for _ in range(3):
            _, state = jax.jit(opt.update)(grads, state)
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(state))
    rows = {r.path: r for r in swats_jax.switch_diagnostics(state)}
    assert np.isnan(rows["dead"].gamma) and np.isnan(rows["empty"].absolute_gap)
    assert np.isfinite(rows["w"].gamma)


def test_global_leaves_switched_by_another_have_no_switch_step():
    opt = swats_jax.swats_global()
    state = opt.init({"a": jnp.ones(3), "b": jnp.ones(3)})
    for step in range(3):
        # "b" is constant (switches at k = 2); "a" changes, so only "b" triggers.
        grads = {"a": jnp.array([1.0, -2.0, 0.5]) * (1 + step), "b": jnp.full(3, 0.5)}
        _, state = opt.update(grads, state)
    a, b = swats_jax.switch_diagnostics(state)
    assert (a.phase, a.switch_step, b.phase, b.switch_step) == ("sgd", None, "sgd", 2)
    # "b" passed the global test; "a" did not (its last test, on step 2, was too far).
    assert b.absolute_gap <= 1e-8 + 1e-5 * abs(b.gamma)
    assert a.absolute_gap > 1e-8 + 1e-5 * abs(a.gamma)


def _nested(inner):
    """The wrappers of test_switch_events_in_nested_chain around ``inner``."""
    mask = {"layer1": [{"conv1": {"kernel": True}}], "linear": {"kernel": True, "bias": False}}
    return optax.MultiSteps(
        optax.chain(optax.clip_by_global_norm(10.0), optax.masked(inner, mask)),
        every_k_schedule=1,
    )


def test_diagnostics_through_chain_mask_multisteps_and_inject_hyperparams():
    params = {
        "layer1": [{"conv1": {"kernel": jnp.ones((3, 3))}}],
        "linear": {"kernel": jnp.ones(4), "bias": jnp.zeros(2)},
    }
    opt = _nested(optax.inject_hyperparams(swats_jax.swats_local)(learning_rate=1e-3))
    state = opt.init(params)
    bare = swats_jax.swats_local(learning_rate=1e-3)
    kept = {"layer1": params["layer1"], "linear": {"kernel": params["linear"]["kernel"]}}
    bare_state = bare.init(kept)
    for step in range(4):
        grads = {
            "layer1": [{"conv1": {"kernel": jnp.full((3, 3), 0.5)}}],
            "linear": {"kernel": 0.1 * jnp.arange(4.0) * (step + 1), "bias": jnp.ones(2)},
        }
        _, state = opt.update(grads, state, params)
        _, bare_state = bare.update(
            {"layer1": grads["layer1"], "linear": {"kernel": grads["linear"]["kernel"]}}, bare_state
        )
    rows = swats_jax.switch_diagnostics(state)
    assert [(r.path, r.phase, r.switch_step) for r in rows] == [
        ("layer1/0/conv1/kernel", "sgd", 2),
        ("linear/kernel", "adam", None),
    ]
    assert rows == swats_jax.switch_diagnostics(bare_state)
    assert [e.path for e in swats_jax.switch_events(state)] == ["layer1/0/conv1/kernel"]


def test_diagnostics_of_several_swats_states_in_one_host_transfer(monkeypatch):
    params = {"a": jnp.ones(3), "b": jnp.ones(2)}
    opt = optax.multi_transform(
        {"local": swats_jax.swats_local(), "global": swats_jax.swats_global()},
        {"a": "local", "b": "global"},
    )
    state = opt.init(params)
    _, state = opt.update({"a": jnp.full(3, 0.1), "b": jnp.full(2, 0.2)}, state)
    calls = []
    real_get = jax.device_get
    monkeypatch.setattr(jax, "device_get", lambda x: calls.append(1) or real_get(x))
    rows = swats_jax.switch_diagnostics(state)
    assert len(calls) == 1
    assert sorted(r.path for r in rows) == ["a", "b"]


class _Net(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(2, 3, rngs=rngs)
        self.out = nnx.Linear(3, 1, rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.tanh(self.hidden(x)))


def test_flax_nnx_paths_have_no_value_suffix():
    params = nnx.state(_Net(nnx.Rngs(0)), nnx.Param)
    opt = swats_jax.swats_local()
    state = opt.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    for _ in range(2):
        _, state = opt.update(grads, state)
    paths = [r.path for r in swats_jax.switch_diagnostics(state)]
    assert paths == ["hidden/bias", "hidden/kernel", "out/bias", "out/kernel"]
    assert paths == sorted(e.path for e in swats_jax.switch_events(state))


def test_docstring_example_runs():
    results = doctest.testmod(swats_jax.events, optionflags=doctest.ELLIPSIS)
    assert results.attempted >= 5 and results.failed == 0


def test_a_state_stripped_of_its_per_leaf_vectors_is_refused_clearly():
    params = {"a": jnp.ones(3), "b": jnp.ones(2)}
    state = swats_jax.swats_local().init(params)
    stripped = jax.tree.map(lambda x: x if x.ndim == 0 else None, state)  # drops per_leaf
    for read in (swats_jax.switch_diagnostics, swats_jax.switch_events, swats_jax.num_switched):
        with pytest.raises(ValueError, match="no per-leaf vectors"):
            read(stripped)
