"""The optimizer state sharded the ways JAX users shard it, on four CPU devices.

Run by tests/test_multidevice.py in a process with four host devices (it cannot be run in
the main test process, whose devices are fixed when JAX starts). Every optimizer of the
package runs beside ``optax.adam``: what works for Adam's state must work for ours.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from helpers import STATE_OPTIMIZERS, SWATS, three_leaf_grads, three_leaf_params
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import swats_jax

PARAM_SPECS = {"w": P("x", None), "b": P("x"), "v": P("x", None)}


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() == 4, "run through tests/test_multidevice.py (4 host devices)"
    return jax.make_mesh((4,), ("x",), axis_types=(AxisType.Auto,))


def _shard(tree, specs, mesh):
    is_spec = lambda x: isinstance(x, P)  # noqa: E731
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=is_spec)
    return jax.device_put(tree, shardings)


def _train(opt, params, state, steps=12):
    @jax.jit
    def step(params, state, k):
        updates, state = opt.update(three_leaf_grads(k, params), state, params)
        return optax.apply_updates(params, updates), state

    for k in range(1, steps + 1):
        params, state = step(params, state, jnp.float32(k))
    return params, state


def _moments_and_params(opt, state, params):
    """Pairs (moment, its parameter) over every parameter-shaped part of ``state``."""
    pairs = []
    optax.tree_utils.tree_map_params(opt, lambda m, p: pairs.append((m, p)), state, params)
    return pairs


@pytest.mark.parametrize("name", sorted(STATE_OPTIMIZERS))
def test_fsdp_recipe_shards_the_moments_like_the_parameters(name, mesh):
    """Optax's recipe: the state's specs from the parameters' with ``tree_map_params``."""
    opt = STATE_OPTIMIZERS[name]()
    params = three_leaf_params()
    state = opt.init(params)
    specs = optax.tree_utils.tree_map_params(
        opt, lambda _, spec: spec, state, PARAM_SPECS, transform_non_params=lambda _: P()
    )
    sharded_params = _shard(params, PARAM_SPECS, mesh)
    sharded = _train(opt, sharded_params, _shard(state, specs, mesh))
    pairs = _moments_and_params(opt, sharded[1], sharded[0])
    assert len(pairs) == 2 * len(params)
    for moment, param in pairs:
        assert moment.sharding.is_equivalent_to(param.sharding, param.ndim), (
            moment.sharding,
            param.sharding,
        )
    # The same run on one device: equal to float32 rounding (sharded sums add in another
    # order), with the same switches.
    single = _train(opt, params, opt.init(params))
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    if name in SWATS:
        events, single_events = (swats_jax.switch_events(s) for s in (sharded[1], single[1]))
        assert events and [e[:2] for e in events] == [e[:2] for e in single_events]
        np.testing.assert_allclose(
            [e.sgd_lr for e in events], [e.sgd_lr for e in single_events], rtol=1e-5
        )


class _MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, annotate: bool):
        def init(initializer, names):
            return nnx.with_partitioning(initializer, names) if annotate else initializer

        kernel, zeros = nnx.initializers.lecun_normal(), nnx.initializers.zeros_init()
        self.fc1 = nnx.Linear(
            8, 16, kernel_init=init(kernel, (None, "x")), bias_init=init(zeros, ("x",)), rngs=rngs
        )
        self.fc2 = nnx.Linear(16, 4, kernel_init=init(kernel, ("x", None)), rngs=rngs)

    def __call__(self, x):
        return self.fc2(jax.nn.relu(self.fc1(x)))


def _nnx_run(tx, sharded: bool, steps: int = 5):
    """Flax's sharding recipe: model and optimizer made under jit, their state constrained to
    the specs ``nnx.get_partition_spec`` reads from the parameters' annotations."""

    @nnx.jit
    def create():
        model = _MLP(nnx.Rngs(0), annotate=sharded)
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        if sharded:
            state = nnx.state((model, optimizer))
            specs = nnx.get_partition_spec(state)
            nnx.update((model, optimizer), jax.lax.with_sharding_constraint(state, specs))
        return model, optimizer

    @nnx.jit
    def train_step(model, optimizer, x, y):
        loss_fn = lambda model: jnp.mean((model(x) - y) ** 2)  # noqa: E731
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    x = jax.random.normal(jax.random.key(1), (32, 8))
    y = jax.random.normal(jax.random.key(2), (32, 4))
    model, optimizer = create()
    losses = [float(train_step(model, optimizer, x, y)) for _ in range(steps)]
    return model, optimizer, losses


@pytest.mark.parametrize("name", sorted(STATE_OPTIMIZERS))
def test_nnx_sharded_model_trains_like_the_unsharded_one(name, mesh):
    with jax.set_mesh(mesh):
        model, optimizer, losses = _nnx_run(STATE_OPTIMIZERS[name](), sharded=True)
    _, _, single_losses = _nnx_run(STATE_OPTIMIZERS[name](), sharded=False)
    np.testing.assert_allclose(losses, single_losses, rtol=1e-5)
    params = nnx.state(model, nnx.Param)
    opt_state = nnx.as_pure(optimizer.opt_state)
    pairs = _moments_and_params(optimizer.tx, opt_state, nnx.as_pure(params))
    assert len(pairs) == 2 * len(jax.tree.leaves(params))
    for moment, param in pairs:
        assert moment.sharding.is_equivalent_to(param.sharding, param.ndim)
    # Three of the four parameters are annotated, and sharded: so are their moments.
    assert sum(param.sharding.spec != P() for _, param in pairs) == 2 * 3


@pytest.mark.parametrize("name", sorted(STATE_OPTIMIZERS))
def test_orbax_round_trip_keeps_values_and_shardings(name, mesh, tmp_path):
    opt = STATE_OPTIMIZERS[name]()
    params = three_leaf_params()
    state = opt.init(params)
    specs = optax.tree_utils.tree_map_params(
        opt, lambda _, spec: spec, state, PARAM_SPECS, transform_non_params=lambda _: P()
    )
    params, state = _train(opt, _shard(params, PARAM_SPECS, mesh), _shard(state, specs, mesh))
    if name in SWATS:
        assert swats_jax.num_switched(state) > 0, "the saved state must hold switches"
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "state", state)
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(tmp_path / "state", target)
        raw = checkpointer.restore(tmp_path / "state")
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert a.sharding.is_equivalent_to(b.sharding, b.ndim)
    if name in SWATS:
        assert swats_jax.switch_events(restored) == swats_jax.switch_events(state)
        with pytest.raises(ValueError, match="restored without a target"):
            swats_jax.switch_events(raw)
        # Training goes on from the restored state as from the saved one.
        for a, b in zip(
            jax.tree.leaves(_train(opt, params, restored, 3)),
            jax.tree.leaves(_train(opt, params, state, 3)),
        ):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
