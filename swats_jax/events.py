"""Reading the switch points back out of an optimizer state."""

from __future__ import annotations

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
    is_swats = lambda x: isinstance(x, SwatsState)  # noqa: E731
    events = []
    for state in jax.tree.leaves(opt_state, is_leaf=is_swats):
        if not is_swats(state):
            continue
        steps, _ = jax.tree_util.tree_flatten_with_path(state.switch_step)
        sgd_lrs = jax.tree.leaves(state.sgd_lr)
        host_steps, host_sgd_lrs = jax.device_get(([s for _, s in steps], sgd_lrs))
        for (path, _), step, sgd_lr in zip(steps, host_steps, host_sgd_lrs):
            if int(step) >= 0:
                events.append(SwitchEvent(_leaf_path(path), int(step), float(sgd_lr)))
    return sorted(events, key=lambda event: event.step)


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
    states = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, SwatsState))
    flags = [jax.tree.leaves(s.switched) for s in states if isinstance(s, SwatsState)]
    return int(sum(np.sum(f) for f in jax.device_get(flags)))
