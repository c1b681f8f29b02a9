"""The properties optax checks for every optimizer, for ours."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import swats_jax

FACTORIES = {
    "swats_local": swats_jax.swats_local,
    "swats_global": swats_jax.swats_global,
    "adabound": swats_jax.adabound,
}


def _params():
    return {
        "w": jnp.array([1.0, -2.0, 3.0]),
        "b": jnp.array([[0.5, 0.25], [-1.0, 2.0]]),
    }


def _grads(step, params):
    # "w": a quadratic with a step-dependent wobble; "b": a constant gradient, so that both
    # SWATS variants switch within the first steps and the SGD phase is exercised.
    return {
        "w": 2.0 * params["w"] + 0.01 * jnp.sin(1.0 + step),
        "b": jnp.full_like(params["b"], 0.5),
    }


def _trajectory(opt, num_steps=12, update=None):
    params = _params()
    state = opt.init(params)
    update = update or opt.update
    out = []
    for step in range(num_steps):
        updates, state = update(_grads(step, params), state, params)
        params = optax.apply_updates(params, updates)
        out.append(params)
    return out, state


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_jit_agrees_with_eager(name):
    opt = FACTORIES[name](learning_rate=0.05)
    eager, eager_state = _trajectory(opt)
    jitted, jitted_state = _trajectory(opt, update=jax.jit(opt.update))
    chex.assert_trees_all_close(jitted, eager, rtol=1e-6, atol=1e-7)
    if name != "adabound":
        assert swats_jax.switch_events(jitted_state) == swats_jax.switch_events(eager_state)
        assert swats_jax.switch_events(eager_state), "the trajectory must cover a switch"


@pytest.mark.parametrize("name", sorted(FACTORIES))
class TestOptaxContract:
    def test_inject_hyperparams(self, name):
        kwargs = {"learning_rate": 0.05}
        if name != "adabound":
            kwargs["sgd_scale"] = optax.piecewise_constant_schedule(1.0, {6: 0.1})
        plain, plain_state = _trajectory(FACTORIES[name](**kwargs))
        injected, state = _trajectory(optax.inject_hyperparams(FACTORIES[name])(**kwargs))
        chex.assert_trees_all_close(injected, plain, rtol=1e-6)
        if name != "adabound":
            assert swats_jax.switch_events(state) == swats_jax.switch_events(plain_state)
            assert swats_jax.switch_events(state), "the trajectory must cover a switch"

    def test_constant_schedule_equals_constant(self, name):
        constant, _ = _trajectory(FACTORIES[name](learning_rate=0.05))
        scheduled, _ = _trajectory(FACTORIES[name](learning_rate=optax.constant_schedule(0.05)))
        chex.assert_trees_all_close(scheduled, constant, rtol=1e-6)

    @pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64"])
    @pytest.mark.parametrize("ams", [False, True], ids=["plain", "ams"])
    def test_updates_and_state_keep_their_dtypes(self, name, dtype, ams):
        # As optax's own dtype-stability tests: jitted updates through the switch must return
        # updates of the params' dtypes and a state of unchanged shapes, dtypes and weak
        # types (a changed one would also retrace the update on every step).
        kwargs = {"learning_rate": 0.05, ("amsbound" if name == "adabound" else "amsgrad"): ams}
        if name == "swats_global":
            kwargs["switch_rtol"] = 1e-2  # bfloat16 noise keeps the default from switching
        opt = FACTORIES[name](**kwargs)
        with jax.enable_x64(dtype == "float64"):
            params = jax.tree.map(lambda p: p.astype(dtype), _params())
            state = opt.init(params)
            chex.assert_trees_all_equal_dtypes(state.mu, state.nu, params)
            if ams:
                chex.assert_trees_all_equal_dtypes(state.nu_max, params)
            if name != "adabound":
                scalar = jnp.float64 if dtype == "float64" else jnp.float32
                assert all(lam.dtype == scalar for lam in jax.tree.leaves(state.lam))
            state_types = jax.tree.map(jax.typeof, state)
            params_types = jax.tree.map(jax.typeof, params)
            chex.clear_trace_counter()
            update = jax.jit(chex.assert_max_traces(opt.update, n=1))
            for step in range(8):
                grads = _grads(step, params)
                assert jax.tree.map(jax.typeof, grads) == params_types
                updates, state = update(grads, state, params)
                assert jax.tree.map(jax.typeof, updates) == params_types, step
                assert jax.tree.map(jax.typeof, state) == state_types, step
                params = optax.apply_updates(params, updates)
                assert jax.tree.map(jax.typeof, params) == params_types, step
            if name != "adabound":
                assert swats_jax.num_switched(state) > 0, "the steps must cover a switch"

    def test_in_chain_masked_and_multisteps(self, name):
        mask = {"w": True, "b": False}
        chained = optax.chain(
            optax.clip_by_global_norm(1.0),
            optax.masked(FACTORIES[name](), mask),
            optax.masked(optax.sgd(0.1), {"w": False, "b": True}),
        )
        multi = optax.MultiSteps(chained, every_k_schedule=2)
        params = _params()
        state = multi.init(params)
        update = jax.jit(multi.update)
        for step in range(6):
            updates, state = update(_grads(step, params), state, params)
            params = optax.apply_updates(params, updates)
        assert all(bool(jnp.isfinite(p).all()) for p in jax.tree.leaves(params))
        assert not np.allclose(params["w"], _params()["w"])

    def test_no_recompilation(self, name):
        chex.clear_trace_counter()
        opt = FACTORIES[name]()
        params = _params()
        state = opt.init(params)

        @jax.jit
        @chex.assert_max_traces(n=1)
        def step(grads, state, params):
            return opt.update(grads, state, params)

        for i in range(4):
            _, state = step(_grads(i, params), state, params)

    def test_converges_on_a_toy_problem(self, name):
        # Least squares; SWATS must switch and keep converging in its SGD phase.
        key_a, key_x = jax.random.split(jax.random.key(0))
        a = jax.random.normal(key_a, (32, 8))
        target = a @ jax.random.normal(key_x, (8,))
        loss = lambda x: jnp.mean((a @ x - target) ** 2)  # noqa: E731
        # Tolerances loose enough for this smooth problem to switch early.
        tolerance = {"swats_local": {"switch_tol": 1e-3}, "swats_global": {"switch_rtol": 1e-2}}
        opt = FACTORIES[name](learning_rate=0.05, **tolerance.get(name, {}))
        params = jnp.zeros(8)
        state = opt.init(params)

        @jax.jit
        def step(params, state):
            updates, state = opt.update(jax.grad(loss)(params), state, params)
            return optax.apply_updates(params, updates), state

        for _ in range(1500):
            params, state = step(params, state)
        assert float(loss(params)) < 1e-3 * float(loss(jnp.zeros(8)))
        if name != "adabound":
            assert swats_jax.num_switched(state) == 1


def test_switch_events_in_nested_chain():
    params = {
        "layer1": [{"conv1": {"kernel": jnp.ones((3, 3))}}],
        "linear": {"kernel": jnp.ones(4), "bias": jnp.zeros(2)},
    }
    inner = optax.inject_hyperparams(swats_jax.swats_local)(learning_rate=1e-3)
    opt = optax.MultiSteps(
        optax.chain(
            optax.clip_by_global_norm(10.0),
            optax.masked(
                inner,
                {
                    "layer1": [{"conv1": {"kernel": True}}],
                    "linear": {"kernel": True, "bias": False},
                },
            ),
        ),
        every_k_schedule=1,
    )
    state = opt.init(params)
    grads = {
        "layer1": [{"conv1": {"kernel": jnp.full((3, 3), 0.5)}}],
        "linear": {"kernel": jnp.full(4, 2.0), "bias": jnp.ones(2)},
    }
    for _ in range(3):
        _, state = opt.update(grads, state, params)
    events = swats_jax.switch_events(state)
    assert [e.path for e in events] == ["layer1/0/conv1/kernel", "linear/kernel"]
    assert [e.step for e in events] == [2, 2]
    np.testing.assert_allclose([e.sgd_lr for e in events], [2e-3, 5e-4], rtol=1e-4)
    assert swats_jax.num_switched(state) == 2
    table = swats_jax.format_switch_table(events)
    assert "| `layer1/0/conv1/kernel` | 2 | 0.002 |" in table
    assert (
        swats_jax.format_switch_table(events, "csv")
        .splitlines()[1]
        .startswith("layer1/0/conv1/kernel,2,0.002")
    )


def test_global_switch_reports_one_event_for_the_trigger():
    opt = swats_jax.swats_global()
    params = {"a": jnp.ones(3), "b": jnp.ones(3)}
    state = opt.init(params)
    for step in range(3):
        # "b" is constant (switches at k = 2); "a" changes, so only "b" triggers.
        grads = {"a": jnp.array([1.0, -2.0, 0.5]) * (1 + step), "b": jnp.full(3, 0.5)}
        _, state = opt.update(grads, state)
    (event,) = swats_jax.switch_events(state)
    assert event.path == "b" and event.step == 2
    assert swats_jax.num_switched(state) == 2
    assert float(state.sgd_lr["a"]) == float(state.sgd_lr["b"]) == event.sgd_lr


def test_format_switch_table_rejects_unknown_format():
    with pytest.raises(ValueError, match="fmt"):
        swats_jax.format_switch_table([], "xml")
