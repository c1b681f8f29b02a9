"""XLA:CPU options the trainer sets for itself, because they make its step faster.

XLA reads ``XLA_FLAGS`` once, when JAX creates its first backend, so :func:`tune` must run
before the first computation (``python -m train.cifar`` calls it first thing, and
:func:`train.trainer.train_and_evaluate` calls it too, which helps where nothing ran before).

What is set, and why (measured in docs/benchmarks.md, "The training step on CPU against
PyTorch"): ``--xla_cpu_experimental_ynn_fusion_type=`` (an empty list) turns off XLA:CPU's
YNNPACK convolutions, so that convolutions and their gradients run on XLA's Eigen kernels,
which do the ResNet-18 training step 1.08-1.33x faster on the 2-core x86 development CPU at
widths 8 to 64. The option only concerns XLA:CPU: a GPU or TPU step is compiled as before.

The options are left alone when

- ``XLA_FLAGS`` already names the option (yours wins),
- the environment variable ``SWATS_JAX_XLA_DEFAULTS`` is ``1`` (XLA's own defaults, to
  measure or to rule this out),
- the installed jaxlib is not one the option was measured on (:data:`MEASURED_JAXLIB`): XLA
  aborts the process on an option it does not know, and a newer XLA may have better
  defaults,
- JAX's backends already exist (the option would not be read).
"""

import logging
import os
from collections.abc import MutableMapping

logger = logging.getLogger(__name__)

# (option, value): appended to XLA_FLAGS as --option=value.
FLAGS = (("xla_cpu_experimental_ynn_fusion_type", ""),)
# The jaxlib releases the options were measured on: from the first up to (not including)
# the second.
MEASURED_JAXLIB = ((0, 10, 2), (0, 11, 0))
OPT_OUT = "SWATS_JAX_XLA_DEFAULTS"


def _jaxlib_version() -> tuple[int, ...]:
    import jaxlib

    parts = []
    for part in jaxlib.__version__.split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())  # "2rc1" -> 2
        parts.append(int(digits or 0))
    return tuple(parts)


def measured_jaxlib() -> bool:
    """Whether the installed jaxlib is one the options were measured on."""
    low, high = MEASURED_JAXLIB
    return low <= _jaxlib_version() < high


def _backends_exist() -> bool:
    try:
        from jax._src import xla_bridge
    except ImportError:  # JAX moved it: assume the worst, that it is too late
        return True
    check = getattr(xla_bridge, "backends_are_initialized", None)
    return True if check is None else bool(check())


def tune(environ: MutableMapping[str, str] | None = None) -> list[str]:
    """Adds the trainer's XLA:CPU options to ``XLA_FLAGS`` where that is safe and useful.

    Args:
      environ: the environment to change (``os.environ`` by default).

    Returns:
      The options added, as written into ``XLA_FLAGS`` (empty when none was).
    """
    environ = os.environ if environ is None else environ
    if environ.get(OPT_OUT) == "1":
        return []
    if not measured_jaxlib():
        version = _jaxlib_version()
        logger.debug("XLA:CPU options not measured on jaxlib %s; XLA's defaults kept", version)
        return []
    current = environ.get("XLA_FLAGS", "")
    added = [f"--{name}={value}" for name, value in FLAGS if name not in current]
    if not added:
        return []
    if _backends_exist():
        logger.debug("JAX's backends already exist; XLA_FLAGS left as they are")
        return []
    environ["XLA_FLAGS"] = " ".join([*current.split(), *added])
    options = " ".join(added)
    logger.info("XLA:CPU options for a faster step: %s (%s=1 keeps XLA's)", options, OPT_OUT)
    return added
