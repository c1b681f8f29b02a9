"""SWATS: switching from Adam to SGD, as Optax gradient transformations.

The phase of every parameter array (leaf) lives in the optimizer state and is
updated with ``jnp.where``: the switch compiles into the jitted update, with no
host synchronisation and no Python branching on traced values.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from swats_jax import _checks

Mode = Literal["local", "global"]
Momentum = Literal["paper", "reference"]


class SwatsState(NamedTuple):
    """State of :func:`scale_by_swats`.

    Every field but ``count`` is a pytree with the structure of the parameters.

    Attributes:
      count: number of completed updates (int32 scalar).
      mu: Adam's first moment while a leaf is in the Adam phase; the SGD
        momentum buffer once it has switched (the first moment is never used
        again, so the buffer reuses its storage).
      nu: Adam's second moment (frozen once a leaf has switched).
      nu_max: running maximum of ``nu`` when ``amsgrad=True``, else ``None``.
      lam: per-leaf exponential moving average of the projected SGD rate
        (float32 scalars; float64 for float64 leaves).
      sgd_lr: per-leaf adopted SGD rate, before ``sgd_scale`` (0 until the switch).
      switched: per-leaf bool, True once the leaf takes SGD steps (from the step
        after its switch).
      switch_step: per-leaf int32, the 1-based step on which this leaf's own
        switch test passed and caused a switch; -1 otherwise. In global mode only
        the leaf that triggered the switch has one.
    """

    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates
    nu_max: optax.Updates | None
    lam: optax.Updates
    sgd_lr: optax.Updates
    switched: optax.Updates
    switch_step: optax.Updates


def _accumulation_dtype(dtype: Any) -> jnp.dtype:
    """float64 for float64 leaves, float32 for everything narrower."""
    return jnp.dtype(jnp.float64) if jnp.dtype(dtype) == jnp.float64 else jnp.dtype(jnp.float32)


def _value_at(value: optax.ScalarOrSchedule, count: jax.Array) -> jax.typing.ArrayLike:
    return value(count) if callable(value) else value


def scale_by_swats(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    mode: Mode = "local",
    switch_atol: float = 1e-5,
    switch_rtol: float = 0.0,
    require_positive: bool = True,
    sgd_scale: optax.ScalarOrSchedule = 1.0,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
    nesterov: bool = False,
    momentum: Momentum = "paper",
    skip_nonfinite: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""The SWATS core: Adam steps until a switch test passes, then SGD.

    This transformation returns the final updates (learning rates and sign
    included), because each phase has its own rate: ``learning_rate`` in the
    Adam phase and the rate estimated at the switch in the SGD phase. Use it as
    the last element of an ``optax.chain``. :func:`swats_local` and
    :func:`swats_global` are the user-facing presets.

    With :math:`k` the 1-based step, :math:`g` the gradient (plus
    ``weight_decay * params``), :math:`c_1 = 1 - b_1^k`, :math:`c_2 = 1 - b_2^k`,
    a leaf in the Adam phase computes

    .. math::
      m &\leftarrow b_1 m + (1 - b_1) g, \quad v \leftarrow b_2 v + (1 - b_2) g^2 \\
      p &= -\eta_k \frac{\sqrt{c_2}}{c_1} \frac{m}{\sqrt{v} + \epsilon}
        \quad \text{(the update that is applied)} \\
      \gamma &= \frac{p^\top p}{-p^\top g}, \quad
      \lambda \leftarrow b_2 \lambda + (1 - b_2) \gamma, \quad
      \Lambda = \lambda / c_2

    and switches when :math:`k > 1` and
    :math:`|\Lambda - \gamma| < \text{atol} + \text{rtol}\,|\gamma|` (``<=`` in
    global mode; global mode and ``require_positive`` also ask
    :math:`\Lambda > 0`). Steps with :math:`p^\top g = 0` (or a non-finite
    :math:`\gamma` when ``skip_nonfinite``) leave :math:`\lambda` unchanged. The
    sums are exact float32 reductions (float64 for float64 leaves). From the
    next step on, with :math:`s_k` = ``sgd_scale`` and :math:`B` starting at 0,

    .. math::
      B \leftarrow b_1 B + g, \quad u = -\Lambda s_k (1 - b_1) B.

    In ``"local"`` mode each leaf switches on its own and keeps its own
    :math:`\Lambda`. In ``"global"`` mode the first leaf (in pytree flatten
    order) whose test passes switches every leaf, all with its :math:`\Lambda`.

    Args:
      learning_rate: Adam-phase learning rate, a float or an Optax schedule
        called with the number of completed updates.
      b1: decay of the first moment; also the SGD momentum.
      b2: decay of the second moment and of the rate estimate :math:`\lambda`.
      eps: added to the un-corrected :math:`\sqrt{v}` (PyTorch's Adam form).
      mode: ``"local"`` (per-leaf switching) or ``"global"`` (all at once).
      switch_atol: absolute tolerance of the switch test.
      switch_rtol: relative tolerance of the switch test (relative to :math:`|\gamma|`).
      require_positive: only adopt a positive :math:`\Lambda` (always on in
        global mode). ``False`` reproduces the local reference code, which can
        adopt a negative rate (gradient ascent).
      sgd_scale: factor on the adopted SGD rates, a float or a schedule (the
        reference recipes divide them by 10 and 100 late in training).
      weight_decay: L2 coefficient added to the gradient in both phases.
      amsgrad: use the running maximum of :math:`v` in the Adam denominator.
      nesterov: Nesterov momentum in the SGD phase,
        :math:`u = -\Lambda s_k (1 - b_1)(g + b_1 B)`.
      momentum: ``"paper"`` (the recursion above) or ``"reference"``: the SGD
        recursion of the reference global code, whose buffer is overwritten by
        the scaled step (:math:`C = b_1 B + g`, :math:`B = (1 - b_1) C`,
        :math:`u = -\Lambda s_k B`; effective momentum 0.09). Use it only to
        compare with the published global results.
      skip_nonfinite: skip non-finite :math:`\gamma` so that a NaN or inf
        gradient cannot poison :math:`\lambda` forever. This guards the estimate
        only; wrap the optimizer in ``optax.apply_if_finite`` to skip whole steps.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      :class:`SwatsState`.

    References:
      Keskar & Socher, `Improving Generalization Performance by Switching from
      Adam to SGD <https://arxiv.org/abs/1712.07628>`_, 2017.
    """
    _checks.check_choice("mode", mode, ("local", "global"))
    _checks.check_choice("momentum", momentum, ("paper", "reference"))
    _checks.check_nonnegative("learning_rate", learning_rate)
    _checks.check_beta("b1", b1)
    _checks.check_beta("b2", b2)
    _checks.check_nonnegative("eps", eps)
    _checks.check_nonnegative("switch_atol", switch_atol)
    _checks.check_nonnegative("switch_rtol", switch_rtol)
    _checks.check_nonnegative("sgd_scale", sgd_scale)
    _checks.check_nonnegative("weight_decay", weight_decay)
    use_weight_decay = not _checks.is_static_zero(weight_decay)
    require_positive = require_positive or mode == "global"

    def init_fn(params: optax.Params) -> SwatsState:
        def scalar(value, dtype_fn):
            return jax.tree.map(lambda p: jnp.asarray(value, dtype_fn(p.dtype)), params)

        return SwatsState(
            count=jnp.zeros([], jnp.int32),
            mu=optax.tree.zeros_like(params),
            nu=optax.tree.zeros_like(params),
            nu_max=optax.tree.zeros_like(params) if amsgrad else None,
            lam=scalar(0, _accumulation_dtype),
            sgd_lr=scalar(0, _accumulation_dtype),
            switched=scalar(False, lambda _: jnp.bool_),
            switch_step=scalar(-1, lambda _: jnp.int32),
        )

    def update_fn(
        updates: optax.Updates,
        state: SwatsState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, SwatsState]:
        del extra_args
        if use_weight_decay and params is None:
            raise ValueError("scale_by_swats: weight_decay needs `params` in update().")
        count = state.count
        step = optax.safe_increment(count)
        lr = _value_at(learning_rate, count)
        scale = _value_at(sgd_scale, count)

        treedef = jax.tree.structure(updates)
        grads = treedef.flatten_up_to(updates)
        if not grads:
            return updates, state._replace(count=step)
        no_leaves = [None] * len(grads)
        leaves_params = treedef.flatten_up_to(params) if use_weight_decay else no_leaves
        fields = (state.mu, state.nu, state.lam, state.sgd_lr, state.switched, state.switch_step)
        mu, nu, lam, sgd_lr, switched, switch_step = map(treedef.flatten_up_to, fields)
        nu_max = treedef.flatten_up_to(state.nu_max) if amsgrad else no_leaves

        if mode == "global":
            # Every leaf shares the phase; the step of the switch is held by the
            # leaf that triggered it (-1 everywhere before the switch).
            global_switch_step = jnp.max(jnp.stack(switch_step))
            first_sgd_steps = [count == global_switch_step] * len(grads)
        else:
            first_sgd_steps = [count == s for s in switch_step]

        results = [
            _leaf_update(count, lr, scale, *leaf)
            for leaf in zip(
                grads, leaves_params, mu, nu, nu_max, lam, sgd_lr, switched, first_sgd_steps
            )
        ]
        new_updates, new_mu, new_nu, new_nu_max, new_lam, passed, estimates = map(
            list, zip(*results)
        )

        if mode == "local":
            new_sgd_lr = [jnp.where(t, e, r) for t, e, r in zip(passed, estimates, sgd_lr)]
            new_switched = [s | t for s, t in zip(switched, passed)]
            new_switch_step = [jnp.where(t, step, s) for t, s in zip(passed, switch_step)]
        else:
            passed_any = jnp.stack(passed)
            triggered = jnp.any(passed_any)
            first = jnp.argmax(passed_any)  # first True in flatten order
            wide = jnp.result_type(*estimates)
            rate = jnp.stack([e.astype(wide) for e in estimates])[first]
            new_sgd_lr = [jnp.where(triggered, rate.astype(r.dtype), r) for r in sgd_lr]
            new_switched = [s | triggered for s in switched]
            new_switch_step = [
                jnp.where(triggered & (first == i), step, s) for i, s in enumerate(switch_step)
            ]

        unflatten = treedef.unflatten
        new_state = SwatsState(
            count=step,
            mu=unflatten(new_mu),
            nu=unflatten(new_nu),
            nu_max=unflatten(new_nu_max) if amsgrad else None,
            lam=unflatten(new_lam),
            sgd_lr=unflatten(new_sgd_lr),
            switched=unflatten(new_switched),
            switch_step=unflatten(new_switch_step),
        )
        return unflatten(new_updates), new_state

    def _leaf_update(count, lr, scale, g, param, m, v, vmax, lam, rate, switched, first_sgd_step):
        """One leaf: both phases computed, the current one selected with where."""
        acc = _accumulation_dtype(g.dtype)
        ga = g.astype(acc)
        if use_weight_decay:
            ga = ga + jnp.asarray(weight_decay, acc) * param.astype(acc)
        ma, va = m.astype(acc), v.astype(acc)
        c1, c2 = jnp.asarray(b1, acc), jnp.asarray(b2, acc)
        k = (count + 1).astype(acc)
        bc1, bc2 = 1 - c1**k, 1 - c2**k

        # Adam phase (spec section 1): the moments.
        m_adam = c1 * ma + (1 - c1) * ga
        v_adam = c2 * va + (1 - c2) * ga * ga

        # SGD phase (spec section 3): the momentum buffer, from zero on the first SGD step.
        buffer = c1 * jnp.where(first_sgd_step, 0, ma) + ga
        if momentum == "reference":
            # The reference stores the scaled step in the buffer, except on the first SGD
            # step, where it stores a fresh copy of the gradient.
            stored = (1 - c1) * (1 + c1) * buffer if nesterov else (1 - c1) * buffer
            buffer = jnp.where(first_sgd_step, buffer, stored)

        # The new state of the leaf. The update below reads only these and the gradient,
        # so that the old moments can be overwritten in place (no copies under donation).
        new_m = jnp.where(switched, buffer, m_adam)
        new_v = jnp.where(switched, va, v_adam)
        v_denominator = new_v
        new_vmax = None
        if amsgrad:
            new_vmax = jnp.where(switched, vmax, jnp.maximum(vmax.astype(acc), v_adam))
            v_denominator = new_vmax

        step_size = jnp.asarray(lr, acc) * jnp.sqrt(bc2) / bc1
        p = -step_size * new_m / (jnp.sqrt(v_denominator) + eps)
        sgd_rate = rate * jnp.asarray(scale, acc)
        if momentum == "paper":
            sgd_update = -sgd_rate * (1 - c1) * (ga + c1 * new_m if nesterov else new_m)
        elif nesterov:
            sgd_update = -sgd_rate * new_m
        else:
            sgd_update = -sgd_rate * jnp.where(first_sgd_step, (1 - c1) * new_m, new_m)
        update = jnp.where(switched, sgd_update, p)

        # Projection and switch test (spec section 2). In the Adam phase `update` is p;
        # after the switch the sums are ignored.
        pg = jnp.sum(update * ga, dtype=acc)
        pp = jnp.sum(update * update, dtype=acc)
        gamma = pp / -pg
        valid = (pg != 0) & ~switched
        if skip_nonfinite:
            valid &= jnp.isfinite(gamma)
        new_lam = jnp.where(valid, c2 * lam + (1 - c2) * gamma, lam)
        estimate = new_lam / bc2
        tolerance = switch_atol + switch_rtol * jnp.abs(gamma)
        gap = jnp.abs(estimate - gamma)
        close = gap <= tolerance if mode == "global" else gap < tolerance
        passed = valid & (k > 1) & close
        if require_positive:
            passed &= estimate > 0

        update = update.astype(g.dtype)
        new_m, new_v = new_m.astype(m.dtype), new_v.astype(v.dtype)
        if amsgrad:
            new_vmax = new_vmax.astype(vmax.dtype)
        return update, new_m, new_v, new_vmax, new_lam, passed, estimate

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def swats_local(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    switch_tol: float = 1e-5,
    sgd_scale: optax.ScalarOrSchedule = 1.0,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
    nesterov: bool = False,
    require_positive: bool = True,
    skip_nonfinite: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""SWATS with per-leaf switching: each parameter array moves to SGD on its own.

    A leaf switches when :math:`k > 1` and :math:`|\Lambda - \gamma| <` ``switch_tol``
    (absolute), then takes SGD steps with momentum ``b1`` and its own rate
    :math:`\Lambda`, scaled by ``sgd_scale``; leaves still in Adam keep their Adam
    schedule. See :func:`scale_by_swats` for the update in full.

    Unlike the local reference code, ``weight_decay`` (L2 into the gradient) and
    ``amsgrad`` are implemented rather than ignored, and a non-positive
    :math:`\Lambda` is not adopted unless ``require_positive=False``.

    Args:
      learning_rate: Adam-phase learning rate (float or schedule).
      b1: first-moment decay and SGD momentum.
      b2: second-moment decay and decay of the rate estimate.
      eps: added to the un-corrected :math:`\sqrt{v}`.
      switch_tol: absolute tolerance of the switch test (the local study used
        1e-5; the paper's 1e-9 rarely fires).
      sgd_scale: factor on the adopted rates (float or schedule).
      weight_decay: L2 coefficient added to the gradient.
      amsgrad: AMSGrad denominator in the Adam phase.
      nesterov: Nesterov momentum in the SGD phase.
      require_positive: refuse to adopt a non-positive rate.
      skip_nonfinite: ignore non-finite rate estimates.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with a :class:`SwatsState`.

    Example:
      >>> import jax.numpy as jnp, optax, swats_jax
      >>> opt = swats_jax.swats_local(learning_rate=1e-3)
      >>> params = {"w": jnp.ones(3)}
      >>> state = opt.init(params)
      >>> updates, state = opt.update({"w": jnp.full(3, 0.5)}, state, params)
      >>> params = optax.apply_updates(params, updates)

    References:
      Keskar & Socher, https://arxiv.org/abs/1712.07628, 2017; the local-switch
      study of AnirudhMaiya/Rethinking-SWATS-Optimizer (``SwatsLocal.py``).
    """
    return scale_by_swats(
        learning_rate,
        b1,
        b2,
        eps,
        mode="local",
        switch_atol=switch_tol,
        switch_rtol=0.0,
        require_positive=require_positive,
        sgd_scale=sgd_scale,
        weight_decay=weight_decay,
        amsgrad=amsgrad,
        nesterov=nesterov,
        skip_nonfinite=skip_nonfinite,
    )


def swats_global(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    switch_rtol: float = 1e-5,
    switch_atol: float = 1e-8,
    sgd_scale: optax.ScalarOrSchedule = 1.0,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
    nesterov: bool = False,
    momentum: Momentum = "paper",
    skip_nonfinite: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""SWATS as in the paper: the whole network switches to SGD at once.

    Every leaf runs the switch test of :func:`scale_by_swats`,
    :math:`|\Lambda - \gamma| \le` ``switch_atol`` + ``switch_rtol`` :math:`|\gamma|`
    with :math:`\Lambda > 0`. When one passes, every leaf takes SGD steps from the
    next step on, all with the :math:`\Lambda` of the triggering leaf (the first
    in pytree flatten order when several pass on the same step).

    Args:
      learning_rate: Adam-phase learning rate (float or schedule).
      b1: first-moment decay and SGD momentum.
      b2: second-moment decay and decay of the rate estimate.
      eps: added to the un-corrected :math:`\sqrt{v}`.
      switch_rtol: relative tolerance of the switch test (PyPI ``pytorch-swats``
        uses 1e-6).
      switch_atol: absolute tolerance of the switch test.
      sgd_scale: factor on the adopted rate (float or schedule).
      weight_decay: L2 coefficient added to the gradient in both phases.
      amsgrad: AMSGrad denominator in the Adam phase.
      nesterov: Nesterov momentum in the SGD phase.
      momentum: ``"paper"`` (default) or ``"reference"``, the SGD recursion of
        the reference global code (an aliasing bug that acts like momentum 0.09);
        the published global results were produced with it.
      skip_nonfinite: ignore non-finite rate estimates.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with a :class:`SwatsState`.

    Example:
      >>> import jax.numpy as jnp, swats_jax
      >>> opt = swats_jax.swats_global(learning_rate=1e-3)
      >>> state = opt.init({"w": jnp.ones(3)})

    References:
      Keskar & Socher, https://arxiv.org/abs/1712.07628, 2017.
    """
    return scale_by_swats(
        learning_rate,
        b1,
        b2,
        eps,
        mode="global",
        switch_atol=switch_atol,
        switch_rtol=switch_rtol,
        require_positive=True,
        sgd_scale=sgd_scale,
        weight_decay=weight_decay,
        amsgrad=amsgrad,
        nesterov=nesterov,
        momentum=momentum,
        skip_nonfinite=skip_nonfinite,
    )
