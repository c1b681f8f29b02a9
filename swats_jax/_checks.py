"""Validation of hyperparameters that tolerates traced values.

``optax.inject_hyperparams`` calls the optimizer factories with arrays (and,
under ``jit``, with tracers), so a check may only look at values it can read
on the host. Schedules are callables and are checked when they are called,
not here.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def _concrete(name: str, value: Any) -> float | None:
    """Returns ``value`` as a float when it is a known scalar, else ``None``.

    Raises ``TypeError`` for what is neither a number (or numeric array) nor a callable
    (a schedule), such as the string ``"1e-3"`` or ``None``.
    """
    if callable(value) or isinstance(value, jax.core.Tracer):
        return None
    array = np.asarray(value)
    if not np.issubdtype(array.dtype, np.number):
        raise TypeError(f"{name} must be a number or an Optax schedule, got {value!r}.")
    if array.ndim != 0:
        return None
    return float(array)


def _shown(value: Any, x: float) -> str:
    """The value as the user wrote it, or as a plain float for arrays."""
    return repr(value) if isinstance(value, (int, float)) else repr(x)


def check_nonnegative(name: str, value: Any) -> None:
    x = _concrete(name, value)
    if x is not None and not x >= 0:
        raise ValueError(f"{name} must be >= 0, got {_shown(value, x)}.")


def check_positive(name: str, value: Any) -> None:
    x = _concrete(name, value)
    if x is not None and not x > 0:
        raise ValueError(f"{name} must be > 0, got {_shown(value, x)}.")


def check_beta(name: str, value: Any) -> None:
    x = _concrete(name, value)
    if x is not None and not 0 <= x < 1:
        raise ValueError(f"{name} must be in [0, 1), got {_shown(value, x)}.")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}.")


def is_static_zero(value: Any) -> bool:
    """True for a Python/NumPy number equal to zero (never for arrays that may change)."""
    return isinstance(value, (int, float)) and value == 0
