"""Shared test configuration and fixtures: strict JAX numerics, a compilation cache, x64,
and the trainer's XLA:CPU options for the whole session.

Helpers that tests import live in ``helpers.py``, not here.
"""

import os
import tempfile

import jax
import pytest

from train import xla_cpu

# tests/multidevice needs four host devices, fixed when JAX starts: test_multidevice.py runs
# it in a process of its own, which sets this variable.
collect_ignore = [] if os.environ.get("SWATS_JAX_MULTIDEVICE") else ["multidevice"]

# The XLA:CPU options python -m train.cifar sets (train/xla_cpu.py), set before JAX's first
# computation, so that every test runs the kernels users get, whichever test comes first.
xla_cpu.tune()

jax.config.update("jax_numpy_rank_promotion", "raise")
# Trainer tests build the same tiny programs in several runs (e.g. a run and its resumed
# twin): a compilation cache for the session compiles each of them once.
jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="swats-jax-xla-cache-"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


@pytest.fixture
def x64():
    """Runs the test with 64-bit JAX types."""
    with jax.enable_x64(True):
        yield
