"""SWATS: switching from Adam to SGD, as Optax gradient transformations.

The phase of every parameter array (leaf) lives in the optimizer state and is
updated with ``jnp.where``: the switch compiles into the jitted update, with no
host synchronisation and no Python branching on traced values. docs/algorithm.md
defines what is computed; the update reads as its sections: the Adam candidate and the
moments (section 1), the SGD candidate (section 3), the switch statistics and test
(section 2), and the switch decision, local or global (section 5).
"""

import functools
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from swats_jax import _checks, _core

Mode = Literal["local", "global"]
Momentum = Literal["paper", "reference"]


class PerLeaf(NamedTuple):
    """The per-leaf scalars of :class:`SwatsState`, one vector entry per leaf.

    Entry ``i`` belongs to the ``i``-th leaf in pytree flatten order. Every field of a fresh
    state is zero (``switch_step`` 0: no switch, since steps count from 1), so a state rebuilt
    as zeros (``optax.tree_utils.tree_zeros_like``) is a fresh state. Float vectors have the
    widest accumulation dtype of the leaves (float32, or float64 when a leaf is float64); each
    entry holds a value computed in its own leaf's accumulation dtype, exactly.
    :class:`SwatsState`'s properties of the same names give the per-leaf view.
    """

    lam: jax.Array
    sgd_lr: jax.Array
    switched: jax.Array
    switch_step: jax.Array
    estimate: jax.Array
    gamma: jax.Array


def _leaf_view_property(name: str) -> property:
    """A :class:`SwatsState` property: field ``name`` of ``per_leaf`` as a per-leaf pytree."""
    return property(
        lambda state: state.leaf_view(getattr(state.per_leaf, name)),
        doc=f"``per_leaf.{name}`` as a pytree with the structure of the parameters.",
    )


class SwatsState(NamedTuple):
    r"""State of :func:`scale_by_swats`.

    ``mu``, ``nu`` and ``nu_max`` are the only pytrees with the structure of the parameters,
    and they are parameter-shaped, as in ``optax.adam``'s state: optax's tree utilities
    (``tree_map_params`` for sharding, ``tree_zeros_like`` for a reset, ``tree_get``) treat
    them as they treat Adam's moments. The per-leaf scalars live in ``per_leaf``, one vector
    entry per leaf, so that the switch test runs once on small vectors rather than as kernels
    of its own for every leaf (docs/algorithm.md, section 4). Every array of a fresh state is
    zero: a state reset to zeros is exactly a fresh one. The properties ``lam``, ``sgd_lr``,
    ``switched``, ``switch_step``, ``estimate`` and ``gamma`` read them as pytrees with the
    structure of the parameters, in each leaf's accumulation dtype.

    Attributes:
      count: number of completed updates (int32 scalar).
      mu: Adam's first moment while a leaf is in the Adam phase; the SGD
        momentum buffer once it has switched (the first moment is never used
        again, so the buffer reuses its storage).
      nu: Adam's second moment (frozen once a leaf has switched).
      nu_max: running maximum of ``nu`` when ``amsgrad=True``, else ``None``.
      per_leaf: the per-leaf scalars as vectors (:class:`PerLeaf`).

    Properties:
      lam: exponential moving average of the projected SGD rate (float32; float64 for
        float64 leaves).
      sgd_lr: adopted SGD rate, before ``sgd_scale`` (0 until the switch).
      switched: bool, True once the leaf takes SGD steps (from the step after its switch).
      switch_step: int32, the 1-based step on which this leaf's own switch test passed and
        caused a switch; 0 otherwise. In global mode only the leaf that triggered the switch
        has one (or each leaf that passed on that step with exactly the adopted rate, as
        identical leaves do).
      estimate: the bias-corrected estimate :math:`\Lambda` = ``lam / (1 - b2**k)`` of the
        last step whose switch test ran (an Adam step with :math:`p^\top g \ne 0` and, with
        ``skip_nonfinite``, a finite :math:`\gamma`); 0 before the first one. Skipped steps
        and SGD steps leave it unchanged, so a switched leaf keeps the value of its switch
        step. Same dtype as ``lam``.
      gamma: the projected rate :math:`\gamma` of that same step; 0 before the first one (a
        test that runs never has :math:`\gamma = 0`). ``|estimate - gamma|`` is the gap that
        step's test compared with its tolerance; :func:`swats_jax.switch_diagnostics` reads
        both (NaN where no test ran yet).
    """

    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates
    nu_max: optax.Updates | None
    per_leaf: PerLeaf

    def leaf_view(self, vector: jax.Array | np.ndarray) -> optax.Updates:
        """``vector`` (one entry per leaf, e.g. a field of ``per_leaf``, on the host or not) as
        a pytree with the structure of the parameters (that of ``mu``). Float entries are in
        each leaf's accumulation dtype, read from ``mu``'s dtypes."""
        moments, treedef = jax.tree.flatten(self.mu)
        if jnp.issubdtype(vector.dtype, jnp.floating):
            dtypes = [_core.accumulation_dtype(m.dtype) for m in moments]
            return treedef.unflatten([vector[i].astype(d) for i, d in enumerate(dtypes)])
        return treedef.unflatten([vector[i] for i in range(len(moments))])

    lam = _leaf_view_property("lam")
    sgd_lr = _leaf_view_property("sgd_lr")
    switched = _leaf_view_property("switched")
    switch_step = _leaf_view_property("switch_step")
    estimate = _leaf_view_property("estimate")
    gamma = _leaf_view_property("gamma")


class _Config(NamedTuple):
    """The static settings of one :func:`scale_by_swats` (hashable: a jit static argument)."""

    mode: str
    inclusive_tol: bool  # the test passes at gap == tolerance (global mode)
    momentum: str
    nesterov: bool
    amsgrad: bool
    weight_decay: bool  # whether L2 is added to the gradient
    relative_tol: bool  # whether switch_rtol can be nonzero
    require_positive: bool
    skip_nonfinite: bool


class _StepConstants(NamedTuple):
    """The scalars of one step shared by every leaf of one accumulation dtype."""

    adam: _core.AdamConstants
    after_first: jax.Array  # k > 1
    neg_adam_step: jax.Array  # -lr * sqrt(1 - b2**k) / (1 - b1**k)
    sgd_scale: jax.Array
    atol: jax.Array
    rtol: jax.Array


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
    use_weight_decay = _core.check_adam_hyperparameters(learning_rate, b1, b2, eps, weight_decay)
    _checks.check_nonnegative("switch_atol", switch_atol)
    _checks.check_nonnegative("switch_rtol", switch_rtol)
    _checks.check_nonnegative("sgd_scale", sgd_scale)
    require_positive = require_positive or mode == "global"

    def init_fn(params: optax.Params) -> SwatsState:
        leaves = jax.tree.leaves(params)
        wide = _widest_accumulation_dtype(leaves)
        num_leaves = len(leaves)

        def vector(value, dtype):  # a buffer per field: a donated state holds no buffer twice
            return jnp.full([num_leaves], value, dtype)

        return SwatsState(
            **_core.init_adam(params, amsgrad),
            per_leaf=PerLeaf(
                lam=vector(0, wide),
                sgd_lr=vector(0, wide),
                switched=vector(False, jnp.bool_),
                switch_step=vector(0, jnp.int32),  # steps count from 1: 0 is "none"
                # 0 until a test runs: no test that runs has gamma == 0 (docs/algorithm.md,
                # section 2). Not NaN, which jax_debug_nans and multi-process device_put reject.
                estimate=vector(0, wide),
                gamma=vector(0, wide),
            ),
        )

    config = _Config(
        mode=mode,
        inclusive_tol=mode == "global",
        momentum=momentum,
        nesterov=nesterov,
        amsgrad=amsgrad,
        weight_decay=use_weight_decay,
        relative_tol=not _checks.is_static_zero(switch_rtol),
        require_positive=require_positive,
        skip_nonfinite=skip_nonfinite,
    )

    def update_leaves(treedef, grads, leaves_params, state: SwatsState):
        count = state.count
        step = optax.safe_increment(count)
        if not grads:
            return treedef.unflatten(grads), state._replace(count=step)
        mu, nu = treedef.flatten_up_to(state.mu), treedef.flatten_up_to(state.nu)
        nu_max = _core.flatten(treedef, state.nu_max)
        vectors = state.per_leaf
        if any(jnp.shape(v) != (len(grads),) for v in vectors):
            shapes = {name: jnp.shape(v) for name, v in vectors._asdict().items()}
            raise ValueError(
                f"scale_by_swats: the state's per-leaf vectors have shapes {shapes}, expected "
                f"({len(grads)},) for {len(grads)} leaves; was the state made by init() for "
                "these parameters?"
            )

        lr = _core.value_at(learning_rate, count)
        scale = _core.value_at(sgd_scale, count)
        hyper = (b1, b2, eps, weight_decay, switch_atol, switch_rtol)
        constants = _core.per_dtype(lambda acc: _step_constants(acc, count, lr, scale, *hyper))

        first_sgd_step = _first_sgd_steps(config, count, vectors.switch_step)
        new_updates, new_mu, new_nu, new_nu_max, pg, pp = _core.map_leaves(
            lambda g, *leaf: _leaf_step(
                config,
                constants(g),
                g,
                *leaf,
                vectors.sgd_lr,
                vectors.switched,
                first_sgd_step,
            ),
            6,
            grads,
            leaves_params,
            mu,
            nu,
            nu_max,
            _leaf_indices(len(grads), count),
        )
        tested = _switch_tests(config, constants, grads, pg, pp, vectors)
        per_leaf = _switch(config, step, vectors, *tested)

        unflatten = treedef.unflatten
        new_state = SwatsState(
            count=step,
            mu=unflatten(new_mu),
            nu=unflatten(new_nu),
            nu_max=unflatten(new_nu_max) if amsgrad else None,
            per_leaf=per_leaf,
        )
        return unflatten(new_updates), new_state

    return _core.transformation("scale_by_swats", init_fn, update_leaves, use_weight_decay)


def _step_constants(acc, count, lr, scale, b1, b2, eps, weight_decay, atol, rtol):
    """The scalars of this step shared by every leaf of accumulation dtype ``acc``."""
    adam = _core.adam_constants(acc, count, lr, b1, b2, eps, weight_decay)
    return _StepConstants(
        adam=adam,
        after_first=adam.k > 1,
        neg_adam_step=-adam.step_size,
        sgd_scale=jnp.asarray(scale, acc),
        atol=jnp.asarray(atol, acc),
        rtol=jnp.asarray(rtol, acc),
    )


def _widest_accumulation_dtype(leaves) -> jnp.dtype:
    """float64 when a leaf accumulates in float64, else float32: the dtype of the float
    vectors of :class:`PerLeaf` (each entry is exact in it)."""
    dtypes = {_core.accumulation_dtype(leaf.dtype) for leaf in leaves}
    return max(dtypes, key=lambda d: d.itemsize, default=jnp.dtype(jnp.float32))


def _first_sgd_steps(config: _Config, count: jax.Array, switch_step: jax.Array) -> jax.Array:
    """Per leaf (a vector), whether this step is its first in the SGD phase (its buffer
    starts at 0).

    A leaf's first SGD step follows the step its switch test passed on. In global mode
    every leaf shares the phase and only the leaf that triggered holds the switch step
    (0 everywhere before the switch, and steps count from 1).
    """
    if config.mode == "local":
        return (switch_step > 0) & (count == switch_step)
    last = jnp.max(switch_step)
    return jnp.broadcast_to((last > 0) & (count == last), switch_step.shape)


def _leaf_indices(num_leaves: int, count: jax.Array) -> tuple[jax.Array, ...]:
    """Each leaf's entry in the per-leaf vectors (its position in flatten order), as int32
    scalars that XLA cannot see as constants.

    A leaf's kernels read its entries at this index. Were it a constant, XLA would fold it
    into each leaf's kernels and compile distinct kernels for every leaf, which multiplies the
    compile time of a many-leaf tree such as DenseNet-121's. Here each index comes out of one
    variadic sort, as element 0 of a constant pair ``[i, n]`` sorted stably by two equal
    keys made from ``count``: the order never changes, but XLA can neither fold a sort on
    run-time keys nor fuse it into its consumers, so every leaf's kernels read their index
    from an operand at the same position, and leaves of one shape share their kernels. (An
    ``optimization_barrier`` is removed before fusion; a conditional would make XLA:GPU read
    its predicate on the host every step.) The indices are made here rather than kept in
    the state, so that nothing in the state can point a leaf at another leaf's entries.
    """
    keys = jnp.stack([count, count])
    # Constants that are not splats: XLA would materialise a splat with a kernel of its own.
    pairs = tuple(np.array([i, num_leaves], np.int32) for i in range(num_leaves))
    _, *sorted_pairs = jax.lax.sort((keys, *pairs), num_keys=1, is_stable=True)
    return tuple(pair[0] for pair in sorted_pairs)


# The per-leaf function is jitted: inside the optimizer's own jit it is traced and lowered
# once per distinct leaf signature rather than once per leaf.
@functools.partial(jax.jit, static_argnums=0)
def _leaf_step(config, const, g, param, m, v, v_max, index, sgd_lrs, phases, first_sgd_steps):
    """One leaf's parameter-sized arithmetic: both phases, the current one selected.

    ``sgd_lrs``, ``phases`` (``switched``) and ``first_sgd_steps`` are vectors over the leaves; this
    leaf's entries are read at ``index``, an operand (not a constant), so that every leaf of
    one shape runs the same compiled kernels. Both phases are written as one expression
    wherever that is exact, so that the compiled kernels stay about as small as Adam's.
    Returns the update, the new moments and the two sums of the switch statistics.
    """

    def at(vector):
        return jax.lax.dynamic_index_in_dim(vector, index, keepdims=False)

    adam = const.adam
    sgd_lr = at(sgd_lrs).astype(adam.b1.dtype)
    switched, first_sgd_step = at(phases), at(first_sgd_steps)
    g_acc = _core.gradient(adam, g, param)
    new_m, new_v, new_v_max, v_denominator = _moments(
        config, adam, g_acc, m, v, v_max, switched, first_sgd_step
    )
    # The update below reads only the new moments and the gradient, so that the old moments
    # can be overwritten in place (no copies under donation).
    adam_update = const.neg_adam_step * new_m / _core.denominator(adam, v_denominator)
    sgd_update = _sgd_candidate(config, const, g_acc, new_m, sgd_lr, first_sgd_step)
    update = jnp.where(switched, sgd_update, adam_update)
    pg, pp = _switch_statistics(update, g_acc)
    if config.amsgrad:
        new_v_max = new_v_max.astype(v_max.dtype)
    return update.astype(g.dtype), new_m.astype(m.dtype), new_v.astype(v.dtype), new_v_max, pg, pp


def _moments(config, adam, g, m, v, v_max, switched, first_sgd_step):
    """Adam's moments in the Adam phase; the SGD momentum buffer in ``m`` after the switch.

    The buffer lives in the first moment's storage and starts from zero on the first SGD
    step: ``b1 m + (1 - b1) g`` before the switch, ``b1 B + g`` after it
    (docs/algorithm.md, section 4). ``v`` (and its AMSGrad maximum) freeze at the switch.
    Returns the new ``m``, ``v``, AMSGrad maximum (``None`` without AMSGrad) and the
    second moment of Adam's denominator.
    """
    acc = g.dtype
    g_weight = jnp.where(switched, jnp.ones([], acc), adam.one_minus_b1)
    new_m = _core.moment(adam.b1, jnp.where(first_sgd_step, 0, m.astype(acc)), g_weight, g)
    if config.momentum == "reference":
        # The reference stores the scaled step in the buffer, except on the first SGD
        # step, where it stores a fresh copy of the gradient.
        kept = adam.one_minus_b1 * (1 + adam.b1) if config.nesterov else adam.one_minus_b1
        new_m = jnp.where(switched & ~first_sgd_step, kept, jnp.ones([], acc)) * new_m
    v = v.astype(acc)
    v_adam = _core.second_moment(adam, v, g)
    new_v = jnp.where(switched, v, v_adam)
    if not config.amsgrad:
        return new_m, new_v, None, new_v
    new_v_max = jnp.where(switched, v_max, _core.running_max(v_max, v_adam))
    return new_m, new_v, new_v_max, new_v_max


def _sgd_candidate(config, const, g, new_m, sgd_lr, first_sgd_step):
    """The SGD-phase update from the buffer ``new_m`` (docs/algorithm.md, section 3)."""
    neg_sgd_lr = -(sgd_lr * const.sgd_scale)
    b1, one_minus_b1 = const.adam.b1, const.adam.one_minus_b1
    if config.momentum == "paper":
        return neg_sgd_lr * one_minus_b1 * (g + b1 * new_m if config.nesterov else new_m)
    if config.nesterov:
        return neg_sgd_lr * new_m
    return neg_sgd_lr * jnp.where(first_sgd_step, one_minus_b1 * new_m, new_m)


def _switch_statistics(update, g):
    """The sums ``p·g`` and ``p·p`` of the switch test, in the accumulation dtype.

    In the Adam phase the update is ``p``; after the switch the sums are ignored.
    """
    return jnp.sum(update * g, dtype=g.dtype), jnp.sum(update * update, dtype=g.dtype)


def _switch_tests(config, constants, grads, pg, pp, vectors: PerLeaf):
    """Every leaf's switch test, run on vectors: once per accumulation dtype of the leaves
    (once, unless float64 and narrower leaves are mixed).

    Returns, as vectors in leaf order (floats in the dtype of ``vectors``): the new ``lam``,
    whether the test passed, this step's estimate, and the estimate and projected rate to
    keep in the state.
    """
    groups: dict[jnp.dtype, list[int]] = {}
    for i, g in enumerate(grads):
        groups.setdefault(_core.accumulation_dtype(g.dtype), []).append(i)
    wide = vectors.lam.dtype
    results = []
    for acc, positions in groups.items():
        group = np.asarray(positions)

        def take(x, group=group):  # the whole vector when every leaf is in the group
            return x if len(groups) == 1 else x[group]

        tested = _switch_test(
            config,
            constants(grads[positions[0]]),
            take(vectors.lam).astype(acc),
            take(vectors.switched),
            jnp.stack([pg[i] for i in positions]),
            jnp.stack([pp[i] for i in positions]),
            take(vectors.estimate).astype(acc),
            take(vectors.gamma).astype(acc),
        )
        results.append([x.astype(wide) if x.dtype == acc else x for x in tested])
    if len(results) == 1:
        return results[0]
    # Mixed accumulation dtypes: put each group's entries back in leaf order.
    order = np.argsort(np.concatenate([np.asarray(p) for p in groups.values()]))
    return [jnp.concatenate(field)[order] for field in zip(*results)]


# Jitted, so that an eager update too runs the test as compiled kernels, which round like
# those of a jitted update where XLA fuses alike (XLA:CPU contracts multiply-adds into FMAs
# within a kernel; op by op, the test would round differently).
@functools.partial(jax.jit, static_argnums=0)
def _switch_test(config, const, lam, switched, pg, pp, last_estimate, last_gamma):
    """The switch test (docs/algorithm.md, section 2), on vectors of leaves of one
    accumulation dtype.

    Returns the new ``lam``, whether the test passed, this step's bias-corrected estimate,
    and the estimate and projected rate to keep in the state: this step's where its test
    ran, ``last_estimate`` and ``last_gamma`` where it was skipped.
    """
    adam = const.adam
    gamma = pp / -pg
    valid = _test_runs(config, pg, switched, gamma)
    new_lam = jnp.where(valid, adam.b2 * lam + adam.one_minus_b2 * gamma, lam)
    # A true division for every entry: XLA turns a division by a broadcast scalar into a
    # multiplication by its reciprocal (one rounding more) where it sees one, and whether
    # it does would depend on the number of leaves and on the surrounding program.
    estimate = new_lam / jax.lax.optimization_barrier(jnp.broadcast_to(adam.bc2, new_lam.shape))
    gap = jnp.abs(estimate - gamma)
    tolerance = const.atol
    if config.relative_tol:
        tolerance = tolerance + const.rtol * jnp.abs(gamma)
    close = gap <= tolerance if config.inclusive_tol else gap < tolerance
    passed = valid & const.after_first & close
    if config.require_positive:
        passed &= estimate > 0
    estimate_kept = jnp.where(valid, estimate, last_estimate)
    gamma_kept = jnp.where(valid, gamma, last_gamma)
    return new_lam, passed, estimate, estimate_kept, gamma_kept


def _test_runs(config, pg, switched, gamma):
    """Whether the switch test runs on this step: in the Adam phase, with ``pg != 0`` and
    (with ``skip_nonfinite``) a finite ``gamma``; skipped steps leave ``lam`` unchanged."""
    valid = (pg != 0) & ~switched
    if config.skip_nonfinite:
        valid &= jnp.isfinite(gamma)
    return valid


def _switch(config, step, vectors, new_lam, passed, estimate, estimate_kept, gamma_kept):
    """The switch (docs/algorithm.md, section 5): the new per-leaf vectors.

    Local mode: each leaf whose test passed adopts its own estimate. Global mode: the
    first leaf (in flatten order) whose test passed switches every leaf to its estimate.
    """
    if config.mode == "local":
        sgd_lr = jnp.where(passed, estimate, vectors.sgd_lr)
        switched = vectors.switched | passed
        switch_step = jnp.where(passed, step, vectors.switch_step)
    else:
        triggered = jnp.any(passed)
        adopted = estimate[jnp.argmax(passed)]
        sgd_lr = jnp.where(triggered, adopted, vectors.sgd_lr)
        switched = vectors.switched | triggered
        # Every leaf that passed with exactly the adopted rate records the switch (identical
        # leaves do; docs/algorithm.md, section 5).
        switch_step = jnp.where(passed & (estimate == adopted), step, vectors.switch_step)
    return PerLeaf(
        lam=new_lam,
        sgd_lr=sgd_lr,
        switched=switched,
        switch_step=switch_step,
        estimate=estimate_kept,
        gamma=gamma_kept,
    )


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
    _checks.check_nonnegative("switch_tol", switch_tol)  # by the name the caller used
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
