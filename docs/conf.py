"""Sphinx configuration of the swats-jax documentation.

Build: ``python -m sphinx -W -n -b html docs docs/_build/html`` (warnings are errors, and
every cross-reference must resolve). Pages are Markdown (MyST); the API pages come from the
docstrings (autodoc + napoleon: Google-style sections with reST roles, as in Optax); the
command-line reference is generated from ``train.cifar``'s parser (``_ext/cli_reference.py``).
"""

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path[:0] = [str(DOCS.parent), str(DOCS / "_ext")]

import swats_jax  # noqa: E402  (after the path)

project = "swats-jax"
author = "the swats-jax authors"
copyright = "2026, the swats-jax authors"
release = version = swats_jax.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.intersphinx",
    "cli_reference",
]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_ext", "figures/README*"]
myst_enable_extensions = ["dollarmath", "deflist"]
myst_heading_anchors = 3

# API pages: signatures as written, members in source order, types in the signature only.
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_attr_annotations = False  # the unions of optax.Updates, not worth a line each
napoleon_custom_sections = [("Properties", "params_style")]  # SwatsState's per-leaf views

# No network at build time: names of other libraries are written out, not linked.
intersphinx_mapping = {}
nitpicky = True
nitpick_ignore_regex = [
    # Third-party types in signatures (no intersphinx inventories offline).
    ("py:class", r"(jax|jaxlib|optax|flax|numpy|np|jnp|chex|orbax)(\..*)?"),
    ("py:class", r"(Array|ArrayTree|Params|Updates|OptState|Schedule|ScalarOrSchedule)"),
    ("py:class", r"(os\.PathLike|Path|pathlib\..*|collections\.abc\..*|typing\..*)"),
    ("py:class", r"(Mode|Momentum|Literal|NamedTuple|Any|Mapping|Sequence|Callable)"),
]

html_theme = "furo"
html_title = "swats-jax"
html_static_path = []


def _short_aliases(app, what, name, obj, options, signature, return_annotation):
    """Writes Optax's type aliases (``optax.ScalarOrSchedule``, ``optax.Updates``) as such,
    not as the unions they stand for."""
    for text, alias in _ALIASES:
        signature = signature and signature.replace(text, alias)
        return_annotation = return_annotation and return_annotation.replace(text, alias)
    return signature, return_annotation


def _aliases():
    import optax
    from sphinx.util.typing import stringify_annotation

    names = {"optax.ScalarOrSchedule": optax.ScalarOrSchedule, "optax.Updates": optax.Updates}
    modes = ("fully-qualified-except-typing", "smart")
    return [(stringify_annotation(t, m), name) for name, t in names.items() for m in modes]


_ALIASES = _aliases()


def setup(app):
    app.connect("autodoc-process-signature", _short_aliases)
