"""The optimizer state under the JAX ecosystem's generic state tooling, on one device.

What users do to an optimizer state with optax's tree utilities (reset it to zeros, map over
its parameter-shaped parts, read and replace fields) must either mean what it means for
``optax.adam`` or fail clearly, never change silently what the optimizer computes. The
sharded recipes (FSDP with ``tree_map_params``, Flax NNX, Orbax) run on four devices in
tests/multidevice, started by tests/test_multidevice.py.
"""

import inspect
import typing
from importlib import resources

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import STATE_OPTIMIZERS, SWATS, three_leaf_grads, three_leaf_params

import swats_jax


def _run(opt, params, state, steps, first=1):
    update = jax.jit(opt.update)
    for k in range(first, first + steps):
        updates, state = update(three_leaf_grads(k, params), state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def _assert_bit_identical(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b) and len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


ZEROING = {
    "tree_zeros_like": optax.tree_utils.tree_zeros_like,
    "tree.map(zeros_like)": lambda state: jax.tree.map(jnp.zeros_like, state),
}


@pytest.mark.parametrize("zeros", sorted(ZEROING))
@pytest.mark.parametrize("name", sorted(STATE_OPTIMIZERS))
def test_a_zeroed_state_trains_as_a_fresh_one(name, zeros):
    opt = STATE_OPTIMIZERS[name]()
    params = three_leaf_params()
    _, trained = _run(opt, params, opt.init(params), 20)
    reset = ZEROING[zeros](trained)
    if name != "adabound":  # AdaBound's base_lr is 0 until the first step records it
        _assert_bit_identical(reset, opt.init(params))
    fresh_run = _run(opt, params, opt.init(params), 40)
    reset_run = _run(opt, params, reset, 40)
    _assert_bit_identical(reset_run, fresh_run)
    if name in SWATS:
        assert swats_jax.num_switched(trained) > 0, "the reset must undo switches"
        assert swats_jax.switch_events(reset_run[1]) == swats_jax.switch_events(fresh_run[1])


@pytest.mark.parametrize("name", sorted(STATE_OPTIMIZERS))
def test_tree_map_params_finds_only_the_moments(name):
    """Parameter-structured parts of the state are parameter-shaped: a map over them (the
    sharding and casting recipes) sees the moments, the rest is left to
    ``transform_non_params``."""
    opt = STATE_OPTIMIZERS[name]()
    params = three_leaf_params()
    state = opt.init(params)
    seen = []

    def record(leaf, param):
        assert leaf.shape == param.shape, (leaf.shape, param.shape)
        seen.append(leaf.shape)
        return leaf

    optax.tree_utils.tree_map_params(opt, record, state, params)
    assert len(seen) == 2 * len(params)  # mu and nu, as for optax.adam


@pytest.mark.parametrize("name", SWATS)
def test_moments_cast_through_tree_map_params_keep_training(name):
    """Casting the moments to bfloat16 (a memory-saving recipe) casts nothing else: the
    per-leaf vectors keep their dtypes, and the update keeps the moments' dtype."""
    opt = STATE_OPTIMIZERS[name]()
    params = three_leaf_params()
    state = optax.tree_utils.tree_map_params(
        opt, lambda x: x.astype(jnp.bfloat16), opt.init(params)
    )
    assert all(v.dtype == jnp.float32 for v in (state.per_leaf.lam, state.per_leaf.sgd_lr))
    _, state = _run(opt, params, state, 10)
    assert {x.dtype for x in jax.tree.leaves((state.mu, state.nu))} == {jnp.dtype(jnp.bfloat16)}
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(state))
    if name == "swats_local":
        assert swats_jax.num_switched(state) > 0


def test_tree_get_and_tree_set_reach_the_per_leaf_vectors():
    opt = STATE_OPTIMIZERS["swats_local"]()
    params = three_leaf_params()
    _, state = _run(opt, params, opt.init(params), 5)
    lam = optax.tree_utils.tree_get(state, "lam")
    np.testing.assert_array_equal(lam, state.per_leaf.lam)
    changed = optax.tree_utils.tree_set(state, lam=2 * lam)
    np.testing.assert_array_equal(changed.lam["b"], 2 * state.lam["b"])


@pytest.mark.parametrize(
    "read", [swats_jax.switch_events, swats_jax.switch_diagnostics, swats_jax.num_switched]
)
def test_reading_the_switches_under_jit_says_to_call_outside(read):
    opt = STATE_OPTIMIZERS["swats_local"]()
    state = opt.init(three_leaf_params())
    with pytest.raises(ValueError, match="outside jit"):
        jax.jit(lambda s: read(s) and 0)(state)


@pytest.mark.parametrize(
    "read", [swats_jax.switch_events, swats_jax.switch_diagnostics, swats_jax.num_switched]
)
def test_a_state_restored_without_its_types_is_refused(read):
    """What a restore without a target returns: the NamedTuples as dicts of arrays. Reading
    it as if nothing had switched would be wrong in silence."""
    opt = optax.chain(optax.clip_by_global_norm(1.0), STATE_OPTIMIZERS["swats_local"]())
    params = three_leaf_params()
    _, state = _run(opt, params, opt.init(params), 5)
    assert swats_jax.num_switched(state) > 0

    def as_dicts(tree):
        if isinstance(tree, tuple) and hasattr(tree, "_asdict"):
            return {key: as_dicts(value) for key, value in tree._asdict().items()}
        if isinstance(tree, (list, tuple)):
            return {str(i): as_dicts(value) for i, value in enumerate(tree)}
        return tree

    with pytest.raises(ValueError, match="restored without a target"):
        read(as_dicts(state))


def test_a_state_stripped_of_its_moments_is_refused_clearly():
    state = STATE_OPTIMIZERS["swats_local"]().init(three_leaf_params())
    with pytest.raises(ValueError, match="no first moments"):
        swats_jax.switch_events(state._replace(mu=None, nu=None))


def test_public_annotations_are_objects_and_the_package_is_typed():
    for function in (
        swats_jax.swats_local,
        swats_jax.swats_global,
        swats_jax.scale_by_swats,
        swats_jax.adabound,
        swats_jax.scale_by_adabound,
    ):
        signature = inspect.signature(function)
        assert signature.parameters["learning_rate"].annotation is optax.ScalarOrSchedule
        assert signature.return_annotation is optax.GradientTransformationExtraArgs
    for function in (
        swats_jax.switch_events,
        swats_jax.switch_diagnostics,
        swats_jax.num_switched,
        swats_jax.format_switch_table,
    ):
        typing.get_type_hints(function)  # resolvable, for type checkers and doc tools
    assert resources.files("swats_jax").joinpath("py.typed").is_file()
