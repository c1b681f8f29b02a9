"""Sphinx extension: the command-line reference, generated from ``train.cifar``'s parser.

A page holding the line ``<!-- cli-reference -->`` gets, in its place, one Markdown table per
group of options of ``python -m train.cifar`` (flag, default, what it does), read from the
parser that the command itself uses, whose run options are the fields of
``train.config.Config``: the page cannot drift from the code.
"""

import argparse

MARKER = "<!-- cli-reference -->"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("<", "&lt;").replace("\n", " ")


def _default(action: argparse.Action) -> str:
    default = action.default
    if default is None or default is argparse.SUPPRESS:
        return ""
    if isinstance(default, bool):
        return "off" if default is False else "on"
    if isinstance(default, tuple):
        return f"`{' '.join(map(str, default))}`"
    return f"`{default}`"


def _flag(action: argparse.Action) -> str:
    flag = action.option_strings[-1]
    if action.nargs == 0:  # a switch
        return f"`{flag}`"
    metavar = action.metavar or action.dest.upper()
    if isinstance(metavar, tuple):
        metavar = " ".join(metavar)
    elif isinstance(action.nargs, int):
        metavar = " ".join([metavar] * action.nargs)
    return f"`{flag} {metavar}`"


def _help(action: argparse.Action) -> str:
    text = (action.help or "").replace("%%", "%")
    if action.choices:
        text += "; one of " + ", ".join(f"`{choice}`" for choice in action.choices)
    return _cell(text)


def reference_markdown() -> str:
    """The Markdown tables of every option of ``python -m train.cifar``."""
    from train import cifar

    parser = cifar._parser()
    parts = []
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if a.option_strings and a.dest != "help"]
        if not actions:
            continue
        title = "general" if group.title == "options" else group.title
        rows = [f"| {_flag(a)} | {_default(a)} | {_help(a)} |" for a in actions]
        header = [f"## {title.capitalize()}", "", "| option | default | meaning |", "|---|---|---|"]
        parts.append("\n".join(header + rows))
    return "\n\n".join(parts)


def _source_read(app, docname, source):
    if MARKER in source[0]:
        source[0] = source[0].replace(MARKER, reference_markdown())


def setup(app):
    app.connect("source-read", _source_read)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
