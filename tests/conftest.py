"""Shared test configuration: strict JAX numerics and small helpers."""

import tempfile

import jax
import numpy as np
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")
# Trainer tests build the same tiny programs in several runs (e.g. a run and its resumed
# twin): a compilation cache for the session compiles each of them once.
jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="swats-jax-xla-cache-"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


@pytest.fixture
def x64():
    """Runs the test with 64-bit JAX types."""
    with jax.enable_x64(True):
        yield


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
