"""AdaBound and AMSBound (Luo et al. 2019) as an Optax gradient transformation."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from swats_jax import _checks
from swats_jax.swats import _accumulation_dtype, _value_at


class AdaBoundState(NamedTuple):
    """State of :func:`scale_by_adabound`.

    Attributes:
      count: number of completed updates (int32 scalar).
      mu: first moment.
      nu: second moment.
      nu_max: running maximum of ``nu`` with ``amsbound=True``, else ``None``.
      base_lr: the learning rate the bounds are relative to (float scalar).
    """

    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates
    nu_max: optax.Updates | None
    base_lr: jax.Array


def scale_by_adabound(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    final_lr: float = 0.1,
    gamma: float = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    amsbound: bool = False,
    base_lr: float | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""AdaBound: Adam with per-element step sizes clipped into bounds that tighten to SGD.

    With :math:`k` the 1-based step, :math:`\eta_k` the learning rate,
    :math:`g` the gradient (plus ``weight_decay * params``),

    .. math::
      m &\leftarrow b_1 m + (1 - b_1) g, \quad v \leftarrow b_2 v + (1 - b_2) g^2 \\
      \alpha^* &= \eta_k \frac{\sqrt{1 - b_2^k}}{1 - b_1^k}, \quad
      f_k = \text{final\_lr} \cdot \eta_k / \text{base\_lr} \\
      l_k &= f_k \Big(1 - \frac{1}{\gamma k + 1}\Big), \quad
      h_k = f_k \Big(1 + \frac{1}{\gamma k}\Big) \\
      u &= -\operatorname{clip}\Big(\frac{\alpha^*}{\sqrt{v} + \epsilon}, l_k, h_k\Big)\, m

    so the bounds follow the learning-rate schedule, as in the official code.
    AMSBound uses the running maximum of :math:`v`. The transformation returns the
    final updates (rate and sign included).

    Args:
      learning_rate: Adam-like rate, a float or a schedule of the update count.
      final_lr: the SGD rate the bounds converge to (at ``learning_rate == base_lr``).
      gamma: convergence speed of the bounds (> 0).
      b1: first-moment decay.
      b2: second-moment decay.
      eps: added to the un-corrected :math:`\sqrt{v}`.
      weight_decay: L2 coefficient added to the gradient.
      amsbound: use AMSBound.
      base_lr: the rate ``final_lr`` refers to; by default the learning rate at
        step 0 (the schedule's first value), captured in the state at ``init``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with an :class:`AdaBoundState`.

    References:
      Luo, Xiong, Liu & Sun, `Adaptive Gradient Methods with Dynamic Bound of
      Learning Rate <https://arxiv.org/abs/1902.09843>`_, ICLR 2019; official
      code: Luolc/AdaBound.
    """
    _checks.check_nonnegative("learning_rate", learning_rate)
    _checks.check_nonnegative("final_lr", final_lr)
    _checks.check_positive("gamma", gamma)
    _checks.check_beta("b1", b1)
    _checks.check_beta("b2", b2)
    _checks.check_nonnegative("eps", eps)
    _checks.check_nonnegative("weight_decay", weight_decay)
    if base_lr is not None:
        _checks.check_positive("base_lr", base_lr)
    use_weight_decay = not _checks.is_static_zero(weight_decay)

    def init_fn(params: optax.Params) -> AdaBoundState:
        first_lr = base_lr if base_lr is not None else _value_at(learning_rate, 0)
        _checks.check_positive("base_lr (the learning rate at step 0)", first_lr)
        return AdaBoundState(
            count=jnp.zeros([], jnp.int32),
            mu=optax.tree.zeros_like(params),
            nu=optax.tree.zeros_like(params),
            nu_max=optax.tree.zeros_like(params) if amsbound else None,
            # float64 when x64 is on, so that float64 runs stay float64 end to end.
            base_lr=jnp.asarray(first_lr, jnp.result_type(float)),
        )

    def update_fn(
        updates: optax.Updates,
        state: AdaBoundState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, AdaBoundState]:
        del extra_args
        if use_weight_decay and params is None:
            raise ValueError("scale_by_adabound: weight_decay needs `params` in update().")
        count = state.count
        lr = _value_at(learning_rate, count)

        def leaf(g, param, m, v, vmax):
            acc = _accumulation_dtype(g.dtype)
            ga = g.astype(acc)
            if use_weight_decay:
                ga = ga + jnp.asarray(weight_decay, acc) * param.astype(acc)
            c1, c2 = jnp.asarray(b1, acc), jnp.asarray(b2, acc)
            k = (count + 1).astype(acc)
            new_m = c1 * m.astype(acc) + (1 - c1) * ga
            new_v = c2 * v.astype(acc) + (1 - c2) * ga * ga
            denominator_v = new_v
            if amsbound:
                vmax = jnp.maximum(vmax.astype(acc), new_v)
                denominator_v = vmax
            lr_k = jnp.asarray(lr, acc)
            step_size = lr_k * jnp.sqrt(1 - c2**k) / (1 - c1**k)
            final_k = jnp.asarray(final_lr, acc) * lr_k / state.base_lr.astype(acc)
            # final * (1 - 1/(gamma*k + 1)), without float32 cancellation at small k.
            lower = final_k * (gamma * k) / (gamma * k + 1)
            upper = final_k * (1 + 1 / (gamma * k))
            rate = jnp.clip(step_size / (jnp.sqrt(denominator_v) + eps), lower, upper)
            update = (-rate * new_m).astype(g.dtype)
            if amsbound:
                vmax = vmax.astype(v.dtype)
            return update, new_m.astype(m.dtype), new_v.astype(v.dtype), vmax

        treedef = jax.tree.structure(updates)
        grads = treedef.flatten_up_to(updates)
        none = [None] * len(grads)
        results = [
            leaf(*args)
            for args in zip(
                grads,
                treedef.flatten_up_to(params) if use_weight_decay else none,
                treedef.flatten_up_to(state.mu),
                treedef.flatten_up_to(state.nu),
                treedef.flatten_up_to(state.nu_max) if amsbound else none,
            )
        ]
        new_updates, mu, nu, nu_max = (list(x) for x in zip(*results)) if results else ([],) * 4
        new_state = AdaBoundState(
            count=optax.safe_increment(count),
            mu=treedef.unflatten(mu),
            nu=treedef.unflatten(nu),
            nu_max=treedef.unflatten(nu_max) if amsbound else None,
            base_lr=state.base_lr,
        )
        return treedef.unflatten(new_updates), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def adabound(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    final_lr: float = 0.1,
    gamma: float = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    amsbound: bool = False,
    base_lr: float | None = None,
) -> optax.GradientTransformationExtraArgs:
    """AdaBound (``amsbound=False``) or AMSBound; see :func:`scale_by_adabound`.

    Example:
      >>> import jax.numpy as jnp, swats_jax
      >>> opt = swats_jax.adabound(learning_rate=1e-3, final_lr=0.1)
      >>> state = opt.init({"w": jnp.ones(3)})
    """
    return scale_by_adabound(
        learning_rate, final_lr, gamma, b1, b2, eps, weight_decay, amsbound, base_lr
    )
