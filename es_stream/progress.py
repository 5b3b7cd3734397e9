"""The one rule for progress bars: drawn on stderr only when stderr is a terminal, and never
when the user said no (``--no-progress``, ``progress=False``).

A bar redraws itself with ``\\r`` many times a second: on a terminal that is one line, in a log
file or a pipe it is thousands of lines of noise. So every bar es-stream draws goes through
:func:`progress`.
"""

from __future__ import annotations

import sys
from typing import Any, Iterable, TextIO

__all__ = ["progress", "show_progress"]


def show_progress(disabled: bool = False, stream: TextIO | None = None) -> bool:
    """Whether to draw a bar: not ``disabled``, and ``stream`` (default: ``sys.stderr``) is a
    terminal."""
    if disabled:
        return False
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress(iterable: Iterable | None = None, *, disable: bool = False, **kwargs: Any):
    """``tqdm(iterable, **kwargs)`` on stderr, shown only under :func:`show_progress`'s rule;
    otherwise a tqdm that draws nothing (so ``update``/``close`` still work). Takes tqdm's
    arguments (``total``, ``desc``, ``unit``, ``initial``, ...)."""
    from tqdm import tqdm

    stream = kwargs.pop("file", None) or sys.stderr
    return tqdm(iterable, file=stream, disable=not show_progress(disable, stream), **kwargs)
