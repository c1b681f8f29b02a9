"""The compiled update keeps the structure that makes it compile fast (no timing).

XLA compiles one kernel per distinct fused computation and shares it between leaves of the
same shape, so compile time follows the number of *distinct* kernels and the program size.
Two regressions made ``swats_global`` compile 50x slower than Adam and run out of memory on
DenseNet-121: every leaf's switch test copied into every other leaf's kernels (program size
growing with the square of the leaf count), and kernels that embed a leaf's position (one
distinct kernel per leaf). These tests pin both away.
"""

import re

import jax
import jax.numpy as jnp
import optax
import pytest

import swats_jax

FACTORIES = {
    "swats_local": swats_jax.swats_local,
    "swats_global": swats_jax.swats_global,
    "adabound": swats_jax.adabound,
}


def _compiled_step_text(opt, params) -> str:
    def step(params, state, grads):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = jax.eval_shape(opt.init, params)
    return jax.jit(step).lower(params, state, params).compile().as_text()


def _distinct_kernels(hlo_text: str) -> int:
    """Fused computations that differ in more than their names and metadata."""
    bodies = set()
    for block in re.split(r"\n(?=%)", hlo_text):
        if not block.startswith(("%fused_computation", "%wrapped_")):
            continue
        body = re.sub(r", metadata=\{[^}]*\}", "", block.split("\n", 1)[1])
        bodies.add(re.sub(r"%[\w.\-]+", "%", body))
    return len(bodies)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_program_size_grows_linearly_with_leaves(name):
    def size(num_leaves):
        params = {f"w{i:02d}": jnp.zeros((i + 2,)) for i in range(num_leaves)}
        return len(_compiled_step_text(FACTORIES[name](), params))

    small, large = size(12), size(36)
    # Linear growth gives about 3x for 3x the leaves; square growth about 9x.
    assert large / small < 4, (small, large)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_leaves_of_one_shape_share_their_kernels(name):
    def kernels(num_leaves):
        params = {f"w{i:02d}": jnp.zeros((7, 3)) for i in range(num_leaves)}
        return _distinct_kernels(_compiled_step_text(FACTORIES[name](), params))

    # Kernels over the per-leaf vectors change with the leaf count, but their number does
    # not; a kernel per leaf would make 32 leaves need more than 16 do. (With fewer than
    # 16 leaves XLA may fuse a few leaves' sums into the kernel that stacks them, and from
    # about 40 it splits the reductions over the vectors in two: both change the count by a
    # constant, not per leaf.)
    assert kernels(32) <= kernels(16)
