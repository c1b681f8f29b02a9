"""The docstring examples of swats_jax run as doctests in the default test command."""

import doctest
import importlib
import pkgutil

import pytest

import swats_jax

MODULES = sorted(
    [swats_jax.__name__]
    + [info.name for info in pkgutil.walk_packages(swats_jax.__path__, f"{swats_jax.__name__}.")]
)


def test_the_examples_are_found():
    found = sum(
        bool(test.examples)
        for name in MODULES
        for test in doctest.DocTestFinder().find(importlib.import_module(name))
    )
    assert found >= 3  # swats_local, swats_global and adabound at least


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    failed, _ = doctest.testmod(module, optionflags=flags, report=False)
    assert failed == 0, f"{failed} docstring example(s) of {name} failed (see the output)"
