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


def _concrete(value: Any) -> float | None:
    """Returns ``value`` as a float when it is a known scalar, else ``None``."""
    if callable(value) or isinstance(value, jax.core.Tracer):
        return None
    array = np.asarray(value)
    if array.ndim != 0 or not np.issubdtype(array.dtype, np.number):
        return None
    return float(array)


def check_nonnegative(name: str, value: Any) -> None:
    x = _concrete(value)
    if x is not None and not x >= 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}.")


def check_positive(name: str, value: Any) -> None:
    x = _concrete(value)
    if x is not None and not x > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}.")


def check_beta(name: str, value: Any) -> None:
    x = _concrete(value)
    if x is not None and not 0 <= x < 1:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}.")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}.")


def is_static_zero(value: Any) -> bool:
    """True for a Python/NumPy number equal to zero (never for arrays that may change)."""
    return isinstance(value, (int, float)) and value == 0
