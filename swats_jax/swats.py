"""SWATS: switching from Adam to SGD, as Optax gradient transformations.

The phase of every parameter array (leaf) lives in the optimizer state and is
updated with ``jnp.where``: the switch compiles into the jitted update, with no
host synchronisation and no Python branching on traced values.
"""

from __future__ import annotations

import functools
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
        the leaf that triggered the switch has one (or each leaf that passed on that
        step with exactly the adopted rate, as identical leaves do).
    """

    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates
    nu_max: optax.Updates | None
    lam: optax.Updates
    sgd_lr: optax.Updates
    switched: optax.Updates
    switch_step: optax.Updates


class _Config(NamedTuple):
    """The static settings of one :func:`scale_by_swats` (hashable: a jit static argument)."""

    mode: str
    momentum: str
    nesterov: bool
    amsgrad: bool
    weight_decay: bool  # whether L2 is added to the gradient
    relative_tol: bool  # whether switch_rtol can be nonzero
    require_positive: bool
    skip_nonfinite: bool


class _StepConstants(NamedTuple):
    """The scalars of one step shared by every leaf of one accumulation dtype."""

    c1: jax.Array  # b1
    c2: jax.Array  # b2
    one_minus_c1: jax.Array
    one_minus_c2: jax.Array
    bc2: jax.Array  # 1 - b2**k
    after_first: jax.Array  # k > 1
    neg_adam_step: jax.Array  # -lr * sqrt(1 - b2**k) / (1 - b1**k)
    scale: jax.Array  # sgd_scale
    eps: jax.Array
    weight_decay: jax.Array
    atol: jax.Array
    rtol: jax.Array


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

    config = _Config(
        mode=mode,
        momentum=momentum,
        nesterov=nesterov,
        amsgrad=amsgrad,
        weight_decay=use_weight_decay,
        relative_tol=not _checks.is_static_zero(switch_rtol),
        require_positive=require_positive,
        skip_nonfinite=skip_nonfinite,
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
            # Every leaf shares the phase; the step of the switch is held by the leaf that
            # triggered it (-1 everywhere before the switch). The barrier keeps XLA from
            # unrolling the maximum into every leaf's kernel.
            global_switch_step = jnp.max(jax.lax.optimization_barrier(jnp.stack(switch_step)))
            first_sgd_steps = [count == global_switch_step] * len(grads)
        else:
            first_sgd_steps = [count == s for s in switch_step]

        lr = _value_at(learning_rate, count)
        scale = _value_at(sgd_scale, count)
        hyper = (b1, b2, eps, weight_decay, switch_atol, switch_rtol)
        constants = {}

        def constants_for(leaf):
            acc = _accumulation_dtype(leaf.dtype)
            if acc not in constants:
                constants[acc] = _step_constants(acc, count, lr, scale, *hyper)
            return constants[acc]

        steps = [
            _leaf_step(config, constants_for(leaf[0]), *leaf)
            for leaf in zip(grads, leaves_params, mu, nu, nu_max, sgd_lr, switched, first_sgd_steps)
        ]
        new_updates, new_mu, new_nu, new_nu_max, pg, pp = map(list, zip(*steps))
        tests = [
            _switch_test(config, constants_for(leaf[0]), step, *leaf)
            for leaf in zip(lam, sgd_lr, switched, switch_step, pg, pp)
        ]
        new_lam, new_sgd_lr, new_switched, new_switch_step, passed, estimates = map(
            list, zip(*tests)
        )

        if mode == "global":
            # The first leaf (in flatten order) whose test passed switches every leaf to its
            # rate. The barriers keep XLA from copying every leaf's test into every leaf's
            # bookkeeping, which made the program grow with the square of the leaf count.
            passed_any = jax.lax.optimization_barrier(jnp.stack(passed))
            triggered = jnp.any(passed_any)
            wide = jnp.result_type(*estimates)
            rate = jax.lax.optimization_barrier(jnp.stack([e.astype(wide) for e in estimates]))
            rate = rate[jnp.argmax(passed_any)]
            new_sgd_lr = [jnp.where(triggered, rate.astype(r.dtype), r) for r in sgd_lr]
            new_switched = [s | triggered for s in switched]
            # The leaf that triggered is recognised by its rate rather than by its position,
            # so that every leaf's bookkeeping compiles to the same kernel (a kernel per
            # leaf position made DenseNet-121 compile 5 s longer).
            new_switch_step = [
                jnp.where(p & (e.astype(wide) == rate), step, s)
                for p, e, s in zip(passed, estimates, switch_step)
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

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _step_constants(acc, count, lr, scale, b1, b2, eps, weight_decay, atol, rtol):
    """The scalars of this step shared by every leaf of accumulation dtype ``acc``."""
    c1, c2 = jnp.asarray(b1, acc), jnp.asarray(b2, acc)
    k = (count + 1).astype(acc)
    bc1, bc2 = 1 - c1**k, 1 - c2**k
    return _StepConstants(
        c1=c1,
        c2=c2,
        one_minus_c1=1 - c1,
        one_minus_c2=1 - c2,
        bc2=bc2,
        after_first=k > 1,
        neg_adam_step=-(jnp.asarray(lr, acc) * jnp.sqrt(bc2) / bc1),
        scale=jnp.asarray(scale, acc),
        eps=jnp.asarray(eps, acc),
        weight_decay=jnp.asarray(weight_decay, acc),
        atol=jnp.asarray(atol, acc),
        rtol=jnp.asarray(rtol, acc),
    )


# The per-leaf functions are jitted: inside the optimizer's own jit they are traced and
# lowered once per distinct leaf shape rather than once per leaf.
@functools.partial(jax.jit, static_argnums=0)
def _leaf_step(config, const, g, param, m, v, vmax, rate, switched, first_sgd_step):
    """One leaf's parameter-sized arithmetic: both phases, the current one selected.

    Both phases are written as one expression wherever that is exact, so that the compiled
    kernels stay about as small as Adam's. Returns the update, the new moments and the two
    sums of the switch statistics, p·g and p·p.
    """
    acc = const.c1.dtype

    ga = g.astype(acc)
    if config.weight_decay:
        ga = ga + const.weight_decay * param.astype(acc)
    ma, va = m.astype(acc), v.astype(acc)

    # The first moment (spec section 1) or, after the switch, the momentum buffer (section
    # 3), which starts from zero on the first SGD step: c1 m + (1 - c1) g, or c1 B + g.
    g_weight = jnp.where(switched, jnp.ones([], acc), const.one_minus_c1)
    new_m = const.c1 * jnp.where(first_sgd_step, 0, ma) + g_weight * ga
    if config.momentum == "reference":
        # The reference stores the scaled step in the buffer, except on the first SGD
        # step, where it stores a fresh copy of the gradient.
        kept = const.one_minus_c1 * (1 + const.c1) if config.nesterov else const.one_minus_c1
        new_m = jnp.where(switched & ~first_sgd_step, kept, jnp.ones([], acc)) * new_m
    v_adam = const.c2 * va + const.one_minus_c2 * ga * ga
    new_v = jnp.where(switched, va, v_adam)
    v_denominator = new_v
    new_vmax = None
    if config.amsgrad:
        new_vmax = jnp.where(switched, vmax, jnp.maximum(vmax.astype(acc), v_adam))
        v_denominator = new_vmax

    # The update below reads only the new moments and the gradient, so that the old moments
    # can be overwritten in place (no copies under donation).
    neg_sgd_rate = -(rate * const.scale)
    sgd_factor = neg_sgd_rate * const.one_minus_c1

    adam_update = const.neg_adam_step * new_m / (jnp.sqrt(v_denominator) + const.eps)
    if config.momentum == "paper":
        sgd_update = sgd_factor * (ga + const.c1 * new_m if config.nesterov else new_m)
    elif config.nesterov:
        sgd_update = neg_sgd_rate * new_m
    else:
        first_step = const.one_minus_c1 * new_m
        sgd_update = neg_sgd_rate * jnp.where(first_sgd_step, first_step, new_m)
    update = jnp.where(switched, sgd_update, adam_update)

    # The sums of the switch statistics (spec section 2): in the Adam phase the update is
    # p; after the switch they are ignored.
    pg = jnp.sum(update * ga, dtype=acc)
    pp = jnp.sum(update * update, dtype=acc)

    if config.amsgrad:
        new_vmax = new_vmax.astype(vmax.dtype)
    return update.astype(g.dtype), new_m.astype(m.dtype), new_v.astype(v.dtype), new_vmax, pg, pp


@functools.partial(jax.jit, static_argnums=0)
def _switch_test(config, const, step, lam, rate, switched, switch_step, pg, pp):
    """One leaf's switch test (spec section 2) and, in local mode, its switch.

    Returns the new ``lam``, ``sgd_lr``, ``switched`` and ``switch_step`` of the leaf
    (unchanged but ``lam`` in global mode, where the caller decides), whether the test
    passed, and the bias-corrected estimate.
    """
    gamma = pp / -pg
    valid = (pg != 0) & ~switched
    if config.skip_nonfinite:
        valid &= jnp.isfinite(gamma)
    new_lam = jnp.where(valid, const.c2 * lam + const.one_minus_c2 * gamma, lam)
    estimate = new_lam / const.bc2
    gap = jnp.abs(estimate - gamma)
    tolerance = const.atol
    if config.relative_tol:
        tolerance = tolerance + const.rtol * jnp.abs(gamma)
    close = gap <= tolerance if config.mode == "global" else gap < tolerance
    passed = valid & const.after_first & close
    if config.require_positive:
        passed &= estimate > 0
    if config.mode == "local":
        rate = jnp.where(passed, estimate, rate)
        switched = switched | passed
        switch_step = jnp.where(passed, step, switch_step)
    return new_lam, rate, switched, switch_step, passed, estimate


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
    in pytree flatten order when several pass on the same step; those that pass with
    exactly that :math:`\Lambda`, as identical leaves do, all record the switch).

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
