"""One-line descriptions of other libraries' exceptions, for log lines and error messages.

TensorFlow Datasets, Orbax and TensorStore raise errors whose text runs over many lines
(JSON specs, reprs of bound methods of C++ objects); a user needs the kind of error and
what went wrong, on one line.
"""

from __future__ import annotations

import re

MAX_CHARS = 300

# A repr such as "<bound method pybind11_detail_function_record_v1_....spec of TensorStore({",
# with what introduces it, and a "[tensorstore_spec='{...}']" suffix: internals, not news.
_INTERNALS = re.compile(
    r"\s*(?:See full TensorStore details:\s*)?<bound method\b.*$"
    r"|\s*\[tensorstore_spec=.*$"
)


def describe_error(error: BaseException, *, with_file: bool = True) -> str:
    """The one line the command line prints for ``error``: an ``OSError``'s reason and
    file (``No space left on device (runs/x/metrics.jsonl.tmp)``; the reason alone without
    ``with_file``, for a message that names the file), else its message."""
    if isinstance(error, OSError):
        where = f" ({error.filename})" if error.filename and with_file else ""
        return f"{error.strerror or error}{where}"
    return str(error)


def one_line(error: BaseException, *, limit: int = MAX_CHARS) -> str:
    """``"ErrorClass: first line of its message"``, without library internals, at most
    about ``limit`` characters (longer text is cut and ends with ``...``)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = _INTERNALS.sub("", lines[0]).rstrip(" .:") if lines else ""
    if len(text) > limit:
        text = text[:limit].rstrip() + "..."
    name = type(error).__name__
    return f"{name}: {text}" if text else name
