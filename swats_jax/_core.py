"""Numerics shared by the optimizers: dtypes, schedules, Adam's moments and step size.

SWATS and AdaBound both run Adam's arithmetic (docs/algorithm.md, section 1): the
gradient with L2 weight decay, the two moments in an accumulation dtype, the bias-corrected
step size and eps added to the un-corrected ``sqrt(v)``. It is written here once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from swats_jax import _checks


def accumulation_dtype(dtype: Any) -> jnp.dtype:
    """float64 for float64 leaves, float32 for everything narrower."""
    return jnp.dtype(jnp.float64) if jnp.dtype(dtype) == jnp.float64 else jnp.dtype(jnp.float32)


def value_at(value: optax.ScalarOrSchedule, count: jax.Array) -> jax.typing.ArrayLike:
    """The value of a float or of a schedule at update ``count``."""
    return value(count) if callable(value) else value


class AdamConstants(NamedTuple):
    """The scalars of one Adam step, in one accumulation dtype.

    With ``k = count + 1`` the 1-based step: ``bc2 = 1 - b2**k`` and
    ``step_size = learning_rate * sqrt(1 - b2**k) / (1 - b1**k)``.
    """

    b1: jax.Array
    b2: jax.Array
    one_minus_b1: jax.Array
    one_minus_b2: jax.Array
    k: jax.Array
    bc2: jax.Array
    learning_rate: jax.Array
    step_size: jax.Array
    eps: jax.Array
    weight_decay: jax.Array


def adam_constants(acc, count, learning_rate, b1, b2, eps, weight_decay) -> AdamConstants:
    """The scalars of step ``count + 1`` in dtype ``acc``, computed once for every leaf."""
    b1, b2 = jnp.asarray(b1, acc), jnp.asarray(b2, acc)
    k = (count + 1).astype(acc)
    bc1, bc2 = 1 - b1**k, 1 - b2**k
    learning_rate = jnp.asarray(learning_rate, acc)
    return AdamConstants(
        b1=b1,
        b2=b2,
        one_minus_b1=1 - b1,
        one_minus_b2=1 - b2,
        k=k,
        bc2=bc2,
        learning_rate=learning_rate,
        step_size=learning_rate * jnp.sqrt(bc2) / bc1,
        eps=jnp.asarray(eps, acc),
        weight_decay=jnp.asarray(weight_decay, acc),
    )


def gradient(const: AdamConstants, g: jax.Array, param: jax.Array | None) -> jax.Array:
    """The gradient in the accumulation dtype, plus L2 weight decay when ``param`` is given."""
    g = g.astype(const.b1.dtype)
    if param is not None:
        g = g + const.weight_decay * param.astype(g.dtype)
    return g


def moment(decay: jax.Array, old: jax.Array, weight: jax.Array, new: jax.Array) -> jax.Array:
    """``decay * old + weight * new``: Adam's first moment, or the SGD momentum buffer."""
    return decay * old + weight * new


def second_moment(const: AdamConstants, v: jax.Array, g: jax.Array) -> jax.Array:
    """Adam's second moment ``b2 v + (1 - b2) g²``."""
    return const.b2 * v + const.one_minus_b2 * g * g


def running_max(v_max: jax.Array, v: jax.Array) -> jax.Array:
    """AMSGrad's running maximum of the second moment."""
    return jnp.maximum(v_max.astype(v.dtype), v)


def denominator(const: AdamConstants, v: jax.Array) -> jax.Array:
    """Adam's denominator ``sqrt(v) + eps``: eps on the un-corrected root (PyTorch's form)."""
    return jnp.sqrt(v) + const.eps


def per_dtype(build: Callable[[jnp.dtype], Any]) -> Callable[[jax.Array], Any]:
    """Calls ``build(acc)`` once per accumulation dtype; returns a lookup by leaf."""
    built: dict[jnp.dtype, Any] = {}

    def lookup(leaf: jax.Array) -> Any:
        acc = accumulation_dtype(leaf.dtype)
        if acc not in built:
            built[acc] = build(acc)
        return built[acc]

    return lookup


def check_adam_hyperparameters(learning_rate, b1, b2, eps, weight_decay) -> bool:
    """Raises ``ValueError`` for an invalid Adam hyperparameter; whether L2 decay is on."""
    _checks.check_nonnegative("learning_rate", learning_rate)
    _checks.check_beta("b1", b1)
    _checks.check_beta("b2", b2)
    _checks.check_nonnegative("eps", eps)
    _checks.check_nonnegative("weight_decay", weight_decay)
    return not _checks.is_static_zero(weight_decay)


def init_adam(params: optax.Params, amsgrad: bool) -> dict[str, Any]:
    """The step count, both moments and (with AMSGrad) the running maximum, all zero."""
    return {
        "count": jnp.zeros([], jnp.int32),
        "mu": optax.tree.zeros_like(params),
        "nu": optax.tree.zeros_like(params),
        "nu_max": optax.tree.zeros_like(params) if amsgrad else None,
    }


UpdateLeaves = Callable[[Any, list[jax.Array], list[Any], Any], tuple[optax.Updates, Any]]


def transformation(
    name: str, init_fn: optax.TransformInitFn, update_leaves: UpdateLeaves, use_weight_decay: bool
) -> optax.GradientTransformationExtraArgs:
    """An Optax transformation whose update works on flattened leaves.

    ``update_leaves(treedef, grads, params, state)`` receives the tree structure, the
    gradient leaves and, with weight decay, the parameter leaves (else ``None`` per leaf).
    """

    def update_fn(
        updates: optax.Updates,
        state: Any,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, Any]:
        del extra_args
        if use_weight_decay and params is None:
            raise ValueError(f"{name}: weight_decay needs `params` in update().")
        treedef = jax.tree.structure(updates)
        leaves_params = flatten(treedef, params if use_weight_decay else None)
        return update_leaves(treedef, treedef.flatten_up_to(updates), leaves_params, state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def flatten(treedef: Any, tree: Any | None) -> list[Any]:
    """The leaves of ``tree`` in ``treedef``'s order; ``None`` for each leaf when it is ``None``."""
    return [None] * treedef.num_leaves if tree is None else treedef.flatten_up_to(tree)


def map_leaves(
    fn: Callable[..., tuple[Any, ...]], num_outputs: int, *leaves: Sequence[Any]
) -> tuple[list[Any], ...]:
    """Calls ``fn`` on the leaves at each position; returns one list per output."""
    results = [fn(*args) for args in zip(*leaves)]
    if not results:
        return ([],) * num_outputs
    return tuple(map(list, zip(*results)))
