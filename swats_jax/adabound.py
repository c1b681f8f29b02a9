"""AdaBound and AMSBound (Luo et al. 2019) as an Optax gradient transformation."""

import sys
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from swats_jax import _checks, _core


class AdaBoundState(NamedTuple):
    """State of :func:`scale_by_adabound`.

    Attributes:
      count: number of completed updates (int32 scalar).
      mu: first moment.
      nu: second moment.
      nu_max: running maximum of ``nu`` with ``amsbound=True``, else ``None``.
      base_lr: the learning rate the bounds are relative to (float scalar); 0, as in a
        state reset to zeros, stands for the value ``init`` records (``base_lr``, or the
        learning rate at step 0), so that a zeroed state trains as a fresh one.
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
      base_lr: the rate ``final_lr`` refers to, captured in the state at ``init``.
        By default the learning rate at step 0. The official code uses the rate
        passed to its constructor, which PyTorch users set to the peak of their
        schedule: with a schedule that rises after step 0 (a warmup), pass
        ``base_lr`` = that peak; such a schedule without ``base_lr`` warns.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with an :class:`AdaBoundState`.

    References:
      Luo, Xiong, Liu & Sun, `Adaptive Gradient Methods with Dynamic Bound of
      Learning Rate <https://arxiv.org/abs/1902.09843>`_, ICLR 2019; official
      code: Luolc/AdaBound.
    """
    use_weight_decay = _core.check_adam_hyperparameters(learning_rate, b1, b2, eps, weight_decay)
    _checks.check_nonnegative("final_lr", final_lr)
    _checks.check_positive("gamma", gamma)
    if base_lr is not None:
        _checks.check_positive("base_lr", base_lr)
    elif callable(learning_rate):
        _warn_if_schedule_rises(learning_rate)

    def initial_lr():
        return base_lr if base_lr is not None else _core.value_at(learning_rate, 0)

    def init_fn(params: optax.Params) -> AdaBoundState:
        first_lr = initial_lr()
        _checks.check_positive(
            "base_lr (by default the learning rate at step 0; pass base_lr=)", first_lr
        )
        return AdaBoundState(
            **_core.init_adam(params, amsbound),
            # float64 when x64 is on, so that float64 runs stay float64 end to end.
            base_lr=jnp.asarray(first_lr, jnp.result_type(float)),
        )

    def update_leaves(treedef, grads, leaves_params, state: AdaBoundState):
        count = state.count
        # 0 (a state reset to zeros) means "not recorded yet", as in a fresh state.
        recorded = state.base_lr
        base = jnp.where(recorded > 0, recorded, jnp.asarray(initial_lr(), recorded.dtype))
        lr = _core.value_at(learning_rate, count)
        constants = _core.per_dtype(
            lambda acc: _core.adam_constants(acc, count, lr, b1, b2, eps, weight_decay)
        )

        def leaf(g, param, m, v, v_max):
            const = constants(g)
            g_acc = _core.gradient(const, g, param)
            new_m = _core.moment(const.b1, m.astype(g_acc.dtype), const.one_minus_b1, g_acc)
            new_v = _core.second_moment(const, v.astype(g_acc.dtype), g_acc)
            v_denominator = new_v
            if amsbound:
                v_max = _core.running_max(v_max, new_v)
                v_denominator = v_max
            lr_k, k = const.learning_rate, const.k
            final_k = jnp.asarray(final_lr, lr_k.dtype) * lr_k / base.astype(lr_k.dtype)
            # final * (1 - 1/(gamma*k + 1)), without float32 cancellation at small k.
            lower = final_k * (gamma * k) / (gamma * k + 1)
            upper = final_k * (1 + 1 / (gamma * k))
            bounded = jnp.clip(
                const.step_size / _core.denominator(const, v_denominator), lower, upper
            )
            update = (-bounded * new_m).astype(g.dtype)
            if amsbound:
                v_max = v_max.astype(v.dtype)
            return update, new_m.astype(m.dtype), new_v.astype(v.dtype), v_max

        new_updates, mu, nu, nu_max = _core.map_leaves(
            leaf,
            4,
            grads,
            leaves_params,
            treedef.flatten_up_to(state.mu),
            treedef.flatten_up_to(state.nu),
            _core.flatten(treedef, state.nu_max),
        )
        new_state = AdaBoundState(
            count=optax.safe_increment(count),
            mu=treedef.unflatten(mu),
            nu=treedef.unflatten(nu),
            nu_max=treedef.unflatten(nu_max) if amsbound else None,
            base_lr=base,
        )
        return treedef.unflatten(new_updates), new_state

    return _core.transformation("scale_by_adabound", init_fn, update_leaves, use_weight_decay)


# Where a schedule is sampled to tell whether it rises after step 0.
_SCHEDULE_PROBES = (0, 1, 10, 100, 1_000, 10_000, 100_000, 1_000_000)


def _warn_if_schedule_rises(schedule: optax.Schedule) -> None:
    """Warns when the default ``base_lr`` (the rate at step 0) is below later rates."""
    values = [schedule(count) for count in _SCHEDULE_PROBES]
    if any(isinstance(value, jax.core.Tracer) for value in values):
        return
    first, peak = float(values[0]), max(float(value) for value in values)
    if 0 < first < peak:  # a zero first rate is refused at init, with the same advice
        warnings.warn(
            f"adabound: base_lr defaults to the learning rate at step 0 ({first:g}), but the "
            f"schedule rises to at least {peak:g} later, so the bounds will be "
            f"{peak / first:.3g}x those of base_lr={peak:g}; pass base_lr= the rate final_lr "
            "refers to (the official code takes the peak rate).",
            stacklevel=_caller_stacklevel(),
        )


def _caller_stacklevel() -> int:
    """The ``warnings.warn`` stack level of the first frame outside ``swats_jax``: the user's
    call, whether through :func:`adabound` or :func:`scale_by_adabound`."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith("swats_jax"):
        frame, level = frame.f_back, level + 1
    return level


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
