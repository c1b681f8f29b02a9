"""SWATS (switching from Adam to SGD) and AdaBound as Optax gradient transformations."""

from swats_jax.adabound import AdaBoundState, adabound, scale_by_adabound
from swats_jax.events import (
    SwitchDiagnostic,
    SwitchEvent,
    format_switch_table,
    num_switched,
    switch_diagnostics,
    switch_events,
)
from swats_jax.swats import PerLeaf, SwatsState, scale_by_swats, swats_global, swats_local

__version__ = "0.3.0"

__all__ = [
    "AdaBoundState",
    "PerLeaf",
    "SwatsState",
    "SwitchDiagnostic",
    "SwitchEvent",
    "adabound",
    "format_switch_table",
    "num_switched",
    "scale_by_adabound",
    "scale_by_swats",
    "swats_global",
    "swats_local",
    "switch_diagnostics",
    "switch_events",
]
