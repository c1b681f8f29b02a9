"""Helpers shared by the tests (imported like ``problems`` and ``numpy_reference``)."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import swats_jax

# Command-line flags of a tiny training run: synthetic data (128 training and 64 test
# images), a width-4 network, 4 steps of 32 images per epoch. The trainer, CLI and notebook
# tests share them, and so share the compiled programs in the session's cache.
TINY = [
    "--data=synthetic",
    "--synthetic-size",
    "128",
    "64",
    "--batch-size=32",
    "--width=4",
    "--eval-batch-size=32",
]


def run_optimizer(opt, params, grad_fn, num_steps, *, jit=True):
    """Applies ``opt`` for ``num_steps`` steps; returns the params after each step and the state.

    ``grad_fn(count, params_list)`` returns the gradients as a list, like the NumPy reference.
    """
    state = opt.init(params)
    update = jax.jit(opt.update) if jit else opt.update
    history = []
    for count in range(num_steps):
        grads = grad_fn(count, [np.asarray(p) for p in params])
        grads = [jax.numpy.asarray(g, dtype=p.dtype) for g, p in zip(grads, params)]
        updates, state = update(grads, state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
        history.append(params)
    return history, state


def flip_a_byte_inside_an_array(step_directory: Path) -> None:
    """Flips one bit in the middle of the largest data file of a checkpoint, which holds
    the chunk of its largest array: Orbax and TensorStore store no checksums, so this
    restores without error (one value of that array changes) unless a digest catches it."""
    largest = max(
        (path for path in step_directory.rglob("*") if path.is_file()),
        key=lambda p: p.stat().st_size,
    )
    data = bytearray(largest.read_bytes())
    data[len(data) // 2] ^= 0x01
    largest.write_bytes(bytes(data))


# Every optimizer of the package beside optax.adam, on a 3-leaf problem whose SWATS runs
# switch (tests/test_state_tooling.py and tests/multidevice).
STATE_OPTIMIZERS = {
    "optax.adam": lambda: optax.adam(1e-2),
    "adabound": lambda: swats_jax.adabound(1e-2),
    "swats_local": lambda: swats_jax.swats_local(1e-2, switch_tol=1e-3),
    "swats_global": lambda: swats_jax.swats_global(1e-2),
}
SWATS = ("swats_local", "swats_global")


def three_leaf_params():
    return {"w": jnp.linspace(-1.0, 1.0, 32).reshape(8, 4), "b": jnp.ones(4), "v": jnp.ones((4, 2))}


def three_leaf_grads(k, params):
    """ "b": a constant gradient (its switch test passes on step 2); "w", "v": changing ones."""
    return {"w": jnp.sin(k * params["w"]), "b": jnp.full(4, 0.3), "v": jnp.cos(k + params["v"])}
