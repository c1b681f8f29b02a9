"""Reading the switch points, and how far each leaf is from its switch, out of an optimizer
state."""

from typing import Any, NamedTuple

import jax
import numpy as np

from swats_jax.swats import SwatsState


class SwitchEvent(NamedTuple):
    """One leaf's switch from Adam to SGD.

    Attributes:
      path: the leaf's pytree path joined with ``/`` (e.g. ``layer1/0/conv1/kernel``).
      step: the 1-based step on which the switch test passed; SGD starts on the next.
      sgd_lr: the adopted SGD rate, before ``sgd_scale`` (the state's ``sgd_lr``).
    """

    path: str
    step: int
    sgd_lr: float


def _key_name(key: Any) -> str:
    for attribute in ("key", "idx", "name"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def path_to_str(path: tuple[Any, ...]) -> str:
    """Joins a ``jax.tree_util`` key path with ``/``."""
    return "/".join(_key_name(key) for key in path)


def _leaf_path(path: tuple[Any, ...]) -> str:
    """The leaf's path, without the trailing ``value`` attribute of a Flax NNX variable."""
    last = path[-1] if path else None
    if isinstance(last, jax.tree_util.GetAttrKey) and last.name == "value":
        path = path[:-1]
    return path_to_str(path)


def _swats_states(opt_state: Any) -> list[SwatsState]:
    """The :class:`SwatsState` values inside ``opt_state``, in pytree flatten order.

    Raises ``ValueError`` where the switches cannot be read: under ``jit`` (traced values), for
    a state without its per-leaf vectors or its first moments, or for a state that holds none
    but looks like one restored without a target (a plain dict).
    """
    is_swats = lambda x: isinstance(x, SwatsState)  # noqa: E731
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(opt_state)):
        raise ValueError(
            "The switches are read from concrete arrays on the host: call switch_events, "
            "switch_diagnostics and num_switched outside jit (e.g. once per epoch), not on "
            "traced values."
        )
    states = [s for s in jax.tree.leaves(opt_state, is_leaf=is_swats) if is_swats(s)]
    if not states and _holds_raw_swats_state(opt_state):
        raise ValueError(
            "This optimizer state holds SWATS fields (per_leaf, mu, ...) in plain containers, "
            "not a SwatsState: it was restored without a target (e.g. by Orbax's restore "
            "without `target`/`item`), which loses the types the switches are read from. "
            "Restore it with a target, e.g. the state of `opt.init(params)` (or "
            "`jax.eval_shape(opt.init, params)`)."
        )
    for state in states:
        per_leaf = state.per_leaf
        if not isinstance(per_leaf, tuple) or any(v is None for v in per_leaf):
            raise ValueError(
                "This SwatsState has no per-leaf vectors (SwatsState.per_leaf); was it "
                "stripped of its non-scalar arrays? Keep `per_leaf` and `mu`."
            )
        if state.mu is None or len(jax.tree.leaves(state.mu)) != len(per_leaf.lam):
            raise ValueError(
                "This SwatsState has no first moments (SwatsState.mu) matching its per-leaf "
                "vectors; the leaves' names and dtypes are read from `mu`, so keep it (a tree "
                "of scalars of the moments' dtypes does)."
            )
    return states


def _holds_raw_swats_state(tree: Any) -> bool:
    """Whether ``tree`` has a dict with the fields of a :class:`SwatsState` (what a restore
    without a target makes of one)."""
    if isinstance(tree, dict):
        if {"per_leaf", "mu", "count"} <= set(tree):
            return True
        return any(_holds_raw_swats_state(value) for value in tree.values())
    if isinstance(tree, (list, tuple)):
        return any(_holds_raw_swats_state(value) for value in tree)
    return False


def switch_events(opt_state: Any) -> list[SwitchEvent]:
    """Lists the switches recorded in a SWATS state, sorted by step.

    Works on the state of :func:`~swats_jax.swats_local`,
    :func:`~swats_jax.swats_global` or any chain, mask, ``MultiSteps`` or
    ``inject_hyperparams`` wrapper that contains one. Everything is read from the
    state (one host transfer per call), so call it outside ``jit``, e.g. once per
    epoch. A global SWATS state yields one event, for the leaf that triggered (one per
    leaf if several triggered on that step with exactly the adopted rate).

    Args:
      opt_state: an optimizer state containing one or more :class:`SwatsState`.

    Returns:
      The events, sorted by step (ties keep pytree flatten order).
    """
    events = []
    for paths, fields in _per_leaf_on_host(opt_state, ("switch_step", "sgd_lr")):
        for path, step, sgd_lr in zip(paths, *fields):
            if int(step) > 0:
                events.append(SwitchEvent(path, int(step), float(sgd_lr)))
    return sorted(events, key=lambda event: event.step)


def _per_leaf_on_host(opt_state: Any, names: tuple[str, ...]) -> list[tuple[list[str], list]]:
    """For every SWATS state in ``opt_state``: its leaf paths and, per name in ``names``, the
    per-leaf values of that field of ``SwatsState.per_leaf`` (floats in each leaf's
    accumulation dtype), all read with one host transfer."""
    states = _swats_states(opt_state)
    vectors = jax.device_get([tuple(getattr(s.per_leaf, n) for n in names) for s in states])
    return [
        (_leaf_paths(state.mu), [jax.tree.leaves(state.leaf_view(v)) for v in fields])
        for state, fields in zip(states, vectors)
    ]


def _leaf_paths(tree: Any) -> list[str]:
    """The path of every leaf of ``tree``, in flatten order (see :func:`_leaf_path`)."""
    return [_leaf_path(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


class SwitchDiagnostic(NamedTuple):
    r"""How far one leaf is from switching: its last switch test, read from the state.

    Attributes:
      path: the leaf's pytree path joined with ``/``, as in :class:`SwitchEvent`.
      phase: ``"adam"`` or ``"sgd"``.
      switch_step: the 1-based step on which this leaf's own test passed and caused a
        switch (as in :class:`SwitchEvent`); ``None`` for a leaf still in Adam, and in
        global mode for the leaves switched by another leaf's test.
      estimate: the bias-corrected rate estimate :math:`\Lambda` = ``lam / (1 - b2**k)``
        of the last step whose test ran; NaN before the first one (the state holds 0).
      gamma: the projected rate :math:`\gamma` of that step; NaN before the first one.
      relative_gap: ``absolute_gap / |gamma|``.
      absolute_gap: ``|estimate - gamma|``, what that step's test compared with its
        tolerance.
    """

    path: str
    phase: str
    switch_step: int | None
    estimate: float
    gamma: float
    relative_gap: float
    absolute_gap: float


def switch_diagnostics(opt_state: Any) -> list[SwitchDiagnostic]:
    r"""Reports, for every leaf, how far its switch test is from passing.

    Every step in the Adam phase compares the running estimate :math:`\Lambda` with
    the projected rate :math:`\gamma` (docs/algorithm.md, section 2). The state keeps
    both as the last step whose test ran left them (a skipped step, with
    :math:`p^\top g = 0` or a non-finite :math:`\gamma`, keeps the previous ones; a
    switched leaf keeps those of its switch step), and this function reads them with
    their gaps. Read the gaps against the tolerance the optimizer was built with:

    - :func:`~swats_jax.swats_local`: a leaf switches on the first step (after the
      first) whose ``absolute_gap < switch_tol``, with ``estimate > 0`` unless
      ``require_positive=False``. ``absolute_gap / switch_tol`` is how far it is: the
      leaf switches once this falls below 1.
    - :func:`~swats_jax.swats_global`: every leaf switches once one leaf has
      ``absolute_gap <= switch_atol + switch_rtol * |gamma|`` and ``estimate > 0``;
      where ``|gamma|`` is well above ``switch_atol / switch_rtol`` (1e-3 with the
      defaults), that is ``relative_gap <= switch_rtol``.

    The gaps are those of the last step only; a step-1 test always has a gap of 0 and
    never passes. They are computed in the state's dtype (float32, or float64 for
    float64 leaves), as the test computed them.

    Works on any state :func:`switch_events` reads (chains, masks, ``MultiSteps``,
    ``inject_hyperparams``; Flax NNX paths without their ``value`` suffix), with one
    host transfer: call it outside ``jit``, e.g. once per epoch.

    Args:
      opt_state: an optimizer state containing one or more :class:`SwatsState`.

    Returns:
      One row per leaf of every SWATS state, in pytree flatten order.

    Example:
      >>> import jax.numpy as jnp, optax, swats_jax
      >>> opt = optax.chain(optax.clip_by_global_norm(1.0), swats_jax.swats_local())
      >>> params = {"b": jnp.zeros(2), "w": jnp.zeros(3)}
      >>> state = opt.init(params)
      >>> for k in range(1, 4):  # "b": a constant gradient; "w": a growing one
      ...     grads = {"b": jnp.array([0.2, -0.1]), "w": jnp.array([0.1, 0.2, 0.3]) * k}
      ...     _, state = opt.update(grads, state)
      >>> for row in swats_jax.switch_diagnostics(state):
      ...     print(row.path, row.phase, row.switch_step, row.absolute_gap < 1e-5)
      b sgd 2 True
      w adam None False
      >>> w = swats_jax.switch_diagnostics(state)[1]
      >>> print(f"w: gap {w.absolute_gap / 1e-5:.0f}x switch_tol, {w.relative_gap:.0%} of gamma")
      w: gap 124x switch_tol, 67% of gamma
    """
    rows = []
    names = ("switched", "switch_step", "estimate", "gamma")
    for paths, fields in _per_leaf_on_host(opt_state, names):
        for path, switched, step, estimate, gamma in zip(paths, *fields):
            if gamma == 0:  # no test ran yet (docs/algorithm.md, section 2)
                estimate, gamma = np.full(2, np.nan, gamma.dtype)
            with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
                absolute_gap = np.abs(estimate - gamma)
                relative_gap = absolute_gap / np.abs(gamma)
            rows.append(
                SwitchDiagnostic(
                    path=path,
                    phase="sgd" if bool(switched) else "adam",
                    switch_step=int(step) if int(step) > 0 else None,
                    estimate=float(estimate),
                    gamma=float(gamma),
                    relative_gap=float(relative_gap),
                    absolute_gap=float(absolute_gap),
                )
            )
    return rows


def format_switch_table(events: list[SwitchEvent], fmt: str = "markdown") -> str:
    """Formats switch events as the per-layer table of the SWATS papers.

    Args:
      events: from :func:`switch_events`.
      fmt: ``"markdown"`` or ``"csv"``.

    Returns:
      The table as text, one row per event: layer path, step, adopted SGD rate (``sgd_lr``).
    """
    if fmt == "csv":
        rows = ["layer,step,sgd_lr"] + [f"{e.path},{e.step},{e.sgd_lr:.6g}" for e in events]
    elif fmt == "markdown":
        rows = ["| layer | step | sgd_lr |", "|---|---:|---:|"]
        rows += [f"| `{e.path}` | {e.step} | {e.sgd_lr:.4g} |" for e in events]
    else:
        raise ValueError(f"fmt must be 'markdown' or 'csv', got {fmt!r}.")
    return "\n".join(rows) + "\n"


def num_switched(opt_state: Any) -> int:
    """Number of leaves in the SGD phase, over every SWATS state in ``opt_state``."""
    flags = [s.per_leaf.switched for s in _swats_states(opt_state)]
    return int(sum(np.sum(f) for f in jax.device_get(flags)))
