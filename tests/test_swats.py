"""SWATS against the independent NumPy float64 reference and the facts of docs/algorithm.md."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import run_optimizer
from numpy_reference import reference_sgd_magnitudes, swats_reference
from problems import make_problem

import swats_jax

NUM_STEPS = 60


def _compare(ours, reference, state, leaf_count):
    for step, (a, b) in enumerate(zip(ours, reference["params"])):
        for leaf, (x, y) in enumerate(zip(a, b)):
            np.testing.assert_allclose(
                np.asarray(x),
                y,
                rtol=0,
                atol=1e-10,
                err_msg=f"step {step + 1}, leaf {leaf}",
            )
    events = swats_jax.switch_events(state)
    assert [(int(e.path), e.step) for e in events] == [(i, k) for i, k, _ in reference["events"]]
    np.testing.assert_allclose(
        [e.sgd_lr for e in events], [r for _, _, r in reference["events"]], rtol=1e-12
    )
    np.testing.assert_allclose(jax.tree.leaves(state.lam), reference["lam"], rtol=1e-12, atol=0)
    assert [bool(s) for s in jax.tree.leaves(state.switched)] == reference["switched"]
    assert len(jax.tree.leaves(state.mu)) == leaf_count


LOCAL_CASES = {
    "default": {},
    "nesterov": {"nesterov": True},
    "amsgrad_weight_decay": {"amsgrad": True, "weight_decay": 0.05},
    "schedules": {
        "learning_rate": optax.piecewise_constant_schedule(1e-2, {20: 0.5}),
        "sgd_scale": optax.piecewise_constant_schedule(1.0, {15: 0.1, 30: 0.1}),
    },
    "no_sign_check": {"require_positive": False, "switch_tol": 1e-4},
}


def _reference_kwargs(kwargs):
    ref = dict(kwargs)
    ref["lr"] = ref.pop("learning_rate", 1e-2)
    scale = ref.get("sgd_scale")
    if callable(scale):
        ref["sgd_scale"] = lambda count: float(scale(count))
    if callable(ref["lr"]):
        lr = ref["lr"]
        ref["lr"] = lambda count: float(lr(count))
    return ref


@pytest.mark.parametrize("case", sorted(LOCAL_CASES))
def test_local_matches_numpy_reference(x64, case):
    kwargs = LOCAL_CASES[case]
    params, grad_fn = make_problem()
    opt = swats_jax.swats_local(**{"learning_rate": 1e-2, **kwargs})
    ours, state = run_optimizer(opt, [jnp.asarray(p) for p in params], grad_fn, NUM_STEPS)
    ref = swats_reference(params, grad_fn, NUM_STEPS, mode="local", **_reference_kwargs(kwargs))
    assert len({k for _, k, _ in ref["events"]}) >= 2, "the case must switch on several steps"
    _compare(ours, ref, state, len(params))


GLOBAL_CASES = {
    "paper": {},
    "reference": {"momentum": "reference"},
    "reference_nesterov": {"momentum": "reference", "nesterov": True},
    "paper_nesterov_amsgrad_wd": {
        "nesterov": True,
        "amsgrad": True,
        "weight_decay": 0.02,
    },
    "sgd_scale_schedule": {"sgd_scale": optax.piecewise_constant_schedule(1.0, {10: 0.1})},
}


@pytest.mark.parametrize("case", sorted(GLOBAL_CASES))
def test_global_matches_numpy_reference(x64, case):
    kwargs = {"switch_rtol": 1e-3, **GLOBAL_CASES[case]}
    params, grad_fn = make_problem()
    opt = swats_jax.swats_global(**{"learning_rate": 1e-2, **kwargs})
    ours, state = run_optimizer(opt, [jnp.asarray(p) for p in params], grad_fn, NUM_STEPS)
    ref = swats_reference(params, grad_fn, NUM_STEPS, mode="global", **_reference_kwargs(kwargs))
    assert len(ref["events"]) == 1 and ref["events"][0][1] < NUM_STEPS - 10
    _compare(ours, ref, state, len(params))


@pytest.mark.parametrize("momentum", ["paper", "reference"])
def test_sgd_recursion_test_vectors(x64, momentum):
    # eps = 0 and a constant unit gradient make gamma = Lam = lr exactly, so the leaf
    # switches at k = 2 with rate 1 and the SGD updates are the vectors of docs/algorithm.md
    # section 9.
    opt = swats_jax.swats_global(learning_rate=1.0, eps=0.0, momentum=momentum)
    params = jnp.zeros(1, jnp.float64)
    state = opt.init(params)
    magnitudes = []
    for _ in range(6):
        updates, state = opt.update(jnp.ones(1, jnp.float64), state)
        magnitudes.append(float(-updates[0]))
    assert swats_jax.switch_events(state)[0].step == 2
    expected = {
        "paper": [0.1, 0.19, 0.271, 0.3439],
        "reference": [0.1, 0.19, 0.1171, 0.1105],
    }
    np.testing.assert_allclose(magnitudes[2:], reference_sgd_magnitudes(4, momentum), rtol=1e-12)
    np.testing.assert_allclose(magnitudes[2:], expected[momentum], atol=5e-5)


@pytest.mark.parametrize("factory", [swats_jax.swats_local, swats_jax.swats_global])
def test_constant_gradient_switches_at_step_two(factory):
    g = jnp.array([0.5, -2.0, 3.0, 0.1])
    opt = factory(learning_rate=1e-3)
    state = opt.init(jnp.zeros(4))
    for _ in range(3):
        _, state = opt.update(g, state)
    (event,) = swats_jax.switch_events(state)
    assert event.step == 2
    np.testing.assert_allclose(event.sgd_lr, 1e-3 * 4 / float(jnp.abs(g).sum()), rtol=1e-4)


def test_identical_leaves_switch_together():
    # Leaves with identical gradients switch on the same step with the same rate (section 9).
    params, grad_fn = make_problem()

    def twin_grads(count, current):
        grads = grad_fn(count, current[:2] + current[3:])
        return grads[:2] + [grads[1]] + grads[2:]

    start = [jnp.asarray(p, jnp.float32) for p in params[:2] + [params[1]] + params[2:]]
    _, state = run_optimizer(swats_jax.swats_local(learning_rate=1e-2), start, twin_grads, 30)
    events = {e.path: e for e in swats_jax.switch_events(state)}
    assert events["1"].step == events["2"].step > 2
    assert events["1"].sgd_lr == events["2"].sgd_lr
    assert events["0"].step != events["1"].step


@pytest.mark.parametrize("factory", [swats_jax.swats_local, swats_jax.swats_global])
def test_zero_gradient_leaf_never_switches_nor_nans(factory):
    opt = factory(learning_rate=1e-2)
    params = {"live": jnp.ones(3), "dead": jnp.ones(2)}
    state = opt.init(params)
    update = jax.jit(opt.update)
    for _ in range(30):
        updates, state = update({"live": jnp.full(3, 0.3), "dead": jnp.zeros(2)}, state)
        assert all(bool(jnp.isfinite(u).all()) for u in jax.tree.leaves(updates))
    assert float(state.lam["dead"]) == 0.0
    assert int(state.switch_step["dead"]) == 0  # 0: no switch (steps count from 1)
    assert [e.path for e in swats_jax.switch_events(state)] == ["live"]
    if factory is swats_jax.swats_local:
        assert not bool(state.switched["dead"])
        np.testing.assert_array_equal(updates["dead"], 0.0)


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf])
def test_nonfinite_gradient_does_not_poison_estimate(bad):
    def lam_after(skip):
        opt = swats_jax.swats_local(learning_rate=1e-2, switch_tol=0.0, skip_nonfinite=skip)
        state = opt.init(jnp.ones(3))
        for step in range(5):
            g = jnp.array([0.3, bad, 0.1]) if step == 2 else jnp.array([0.3, 0.2, 0.1])
            _, state = opt.update(g, state)
        return float(state.lam)

    assert np.isfinite(lam_after(True))
    assert np.isnan(lam_after(False))


@pytest.mark.parametrize("factory", [swats_jax.swats_local, swats_jax.swats_global])
def test_zero_size_leaves(factory):
    opt = factory()
    params = {"empty": jnp.zeros((0, 3)), "w": jnp.ones(2)}
    state = opt.init(params)
    for _ in range(4):
        updates, state = jax.jit(opt.update)({"empty": jnp.zeros((0, 3)), "w": jnp.ones(2)}, state)
    assert updates["empty"].shape == (0, 3)
    assert int(state.switch_step["empty"]) == 0
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(state))


def test_empty_tree():
    opt = swats_jax.swats_global()
    state = opt.init({})
    updates, state = opt.update({}, state)
    assert updates == {} and int(state.count) == 1


@pytest.mark.parametrize("factory", [swats_jax.swats_local, swats_jax.swats_global])
def test_first_step_never_switches(factory):
    # At k = 1, Lam == gamma identically: even an infinite tolerance must not fire.
    kwargs = {"switch_tol": np.inf} if factory is swats_jax.swats_local else {"switch_atol": np.inf}
    opt = factory(**kwargs)
    state = opt.init(jnp.ones(3))
    _, state = opt.update(jnp.array([0.1, 0.2, 0.3]), state)
    assert swats_jax.switch_events(state) == []
    _, state = opt.update(jnp.array([0.1, 0.2, 0.3]), state)
    assert [e.step for e in swats_jax.switch_events(state)] == [2]


def test_require_positive_refuses_ascent_rate():
    # The second gradient opposes the momentum, so gamma_2 < 0 and Lam_2 < 0.
    def run(require_positive):
        opt = swats_jax.swats_local(switch_tol=1e3, require_positive=require_positive)
        state = opt.init(jnp.zeros(1))
        for g in (1.0, -0.05):
            _, state = opt.update(jnp.array([g]), state)
        return state

    assert not bool(run(True).switched)
    ascent = run(False)
    assert bool(ascent.switched) and float(ascent.sgd_lr) < 0


def test_sgd_scale_multiplies_only_the_adopted_rate():
    g = jnp.array([0.5])
    half = swats_jax.swats_local(sgd_scale=optax.constant_schedule(0.5))
    full = swats_jax.swats_local()
    states = [half.init(jnp.zeros(1)), full.init(jnp.zeros(1))]
    for step in range(4):
        (u_half, states[0]), (u_full, states[1]) = (
            half.update(g, states[0]),
            full.update(g, states[1]),
        )
        ratio = 1.0 if step < 2 else 0.5  # Adam steps 1-2, SGD from step 3
        np.testing.assert_allclose(u_half, ratio * u_full, rtol=1e-6)
    assert (
        swats_jax.switch_events(states[0])[0].sgd_lr == swats_jax.switch_events(states[1])[0].sgd_lr
    )


def test_state_keeps_two_buffers_and_stable_dtypes():
    params = {"a": jnp.ones((4, 3)), "b": jnp.ones(5, jnp.bfloat16)}
    opt = swats_jax.swats_local()
    state = opt.init(params)
    new_state = state
    for _ in range(3):
        _, new_state = jax.jit(opt.update)(jax.tree.map(jnp.ones_like, params), new_state)
    assert jax.tree.map(lambda x: x.dtype, state) == jax.tree.map(lambda x: x.dtype, new_state)
    # Parameter-sized buffers: two per leaf, like Adam. The per-leaf scalars are vectors with
    # one entry per leaf.
    shapes = {p.shape for p in params.values()}
    buffers = [x for x in jax.tree.leaves(state) if x.ndim > 0 and x.shape in shapes]
    assert len(buffers) == 2 * len(params)
    assert all(x.shape == (len(params),) for x in state.per_leaf)
    assert state.lam["b"].dtype == jnp.float32 and state.mu["b"].dtype == jnp.bfloat16


def test_float64_end_to_end(x64):
    opt = swats_jax.swats_global()
    params = jnp.ones(3, jnp.float64)
    state = opt.init(params)
    updates, state = opt.update(jnp.ones(3, jnp.float64), state)
    assert updates.dtype == jnp.float64 and state.lam.dtype == jnp.float64
    assert state.sgd_lr.dtype == jnp.float64


@pytest.mark.parametrize(
    "factory, kwargs, name",
    [
        (swats_jax.swats_local, {"learning_rate": -1.0}, "learning_rate"),
        (swats_jax.swats_local, {"b1": 1.0}, "b1"),
        (swats_jax.swats_local, {"b2": -0.1}, "b2"),
        (swats_jax.swats_local, {"switch_tol": -1e-5}, "switch_tol"),
        (swats_jax.swats_local, {"sgd_scale": -1.0}, "sgd_scale"),
        (swats_jax.swats_local, {"weight_decay": -1.0}, "weight_decay"),
        (swats_jax.swats_local, {"eps": -1.0}, "eps"),
        (swats_jax.swats_global, {"momentum": "heavy"}, "momentum"),
        (swats_jax.swats_global, {"switch_rtol": -1.0}, "switch_rtol"),
        (swats_jax.scale_by_swats, {"mode": "layer"}, "mode"),
    ],
)
def test_invalid_hyperparameters(factory, kwargs, name):
    with pytest.raises(ValueError, match=name):
        factory(**kwargs)


def test_weight_decay_needs_params():
    opt = swats_jax.swats_local(weight_decay=1e-4)
    state = opt.init(jnp.ones(2))
    with pytest.raises(ValueError, match="weight_decay needs `params`"):
        opt.update(jnp.ones(2), state)


def test_global_first_leaf_in_flatten_order_sets_the_rate():
    # Constant gradients: every leaf passes on step 2 (docs/algorithm.md section 9). "a"
    # comes first in flatten order, so its rate is adopted and only it records the switch;
    # "c" is a copy of "a" (the same rate, bit for bit), so it records the switch too.
    grads = {
        "a": jnp.array([0.5, -2.0]),
        "b": jnp.array([3.0, 0.1, 1.0]),
        "c": jnp.array([0.5, -2.0]),
    }
    opt = swats_jax.swats_global(learning_rate=1e-3)
    state = opt.init(jax.tree.map(jnp.zeros_like, grads))
    update = jax.jit(opt.update)
    for _ in range(3):
        _, state = update(grads, state)
    events = swats_jax.switch_events(state)
    assert [(e.path, e.step) for e in events] == [("a", 2), ("c", 2)]
    rate_a = events[0].sgd_lr
    np.testing.assert_allclose(rate_a, 1e-3 * 2 / 2.5, rtol=1e-4)
    assert {float(r) for r in jax.tree.leaves(state.sgd_lr)} == {rate_a}


@pytest.mark.parametrize("factory", [swats_jax.swats_local, swats_jax.swats_global])
def test_donated_state_steps_under_jit(factory):
    """The state's buffers are distinct (no vector shared by two fields), so a jitted step
    can donate it, step after step."""
    params = {"a": jnp.ones((4, 3)), "b": jnp.ones(5), "c": jnp.ones((4, 3))}
    opt = factory(learning_rate=1e-2)

    def step(params, state, grads):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    donated = jax.jit(step, donate_argnums=(0, 1))
    plain_params, plain_state = params, opt.init(params)
    ours = jax.tree.map(jnp.copy, params), opt.init(params)
    for k in range(1, 6):
        grads = jax.tree.map(lambda p, k=k: jnp.sin(k * p), plain_params)
        plain_params, plain_state = jax.jit(step)(plain_params, plain_state, grads)
        ours = donated(*ours, grads)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves((plain_params, plain_state))):
        np.testing.assert_array_equal(a, b)


def test_mixed_float32_and_float64_leaves_follow_their_own_dtype(x64):
    """With float32 and float64 leaves, each leaf's switch test runs in its own
    accumulation dtype: the float32 leaf follows what it does alone, and the views keep
    each leaf's dtype."""
    wide = {"a": jnp.linspace(0.5, 1.5, 6), "w": jnp.linspace(-1.0, 1.0, 8, dtype=jnp.float32)}
    alone = {"w": wide["w"]}

    def run(params):
        opt = swats_jax.swats_local(learning_rate=1e-2, switch_tol=1e-3)
        state = opt.init(params)
        for k in range(1, 8):
            # "w": a constant gradient, whose test passes on step 2 (then SGD steps).
            grads = {**params, "w": jnp.full(8, 0.2, jnp.float32)}
            if "a" in params:
                grads["a"] = jnp.cos(k * params["a"])
            updates, state = opt.update(grads, state, params)
            params = optax.apply_updates(params, updates)
        return params, state

    (params, state), (params_alone, state_alone) = run(wide), run(alone)
    assert state.per_leaf.lam.dtype == jnp.float64 and state.lam["w"].dtype == jnp.float32
    assert params["w"].dtype == jnp.float32 and params["a"].dtype == jnp.float64
    np.testing.assert_array_equal(params["w"], params_alone["w"])
    for field in ("lam", "sgd_lr", "switched", "switch_step", "estimate", "gamma"):
        np.testing.assert_array_equal(getattr(state, field)["w"], getattr(state_alone, field)["w"])
    assert int(state.switch_step["w"]) > 0  # the float32 leaf took SGD steps too


def test_per_leaf_vectors_of_another_length_are_refused():
    params = {"a": jnp.ones(3), "b": jnp.ones(2)}
    opt = swats_jax.swats_local()
    state = opt.init(params)
    wrong = state._replace(per_leaf=jax.tree.map(lambda v: v[:1], state.per_leaf))
    with pytest.raises(ValueError, match=r"expected \(2,\) for 2 leaves"):
        opt.update(params, wrong)
