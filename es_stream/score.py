"""Deprecated module path: the reference scoring pass (Scorer, score_corpus, load_scorer) lives
in :mod:`es_stream.reference_scoring`; import it from there or from ``es_stream``."""

from __future__ import annotations

import warnings
from typing import Any

from . import reference_scoring as _new

warnings.warn("es_stream.score is deprecated: import from es_stream.reference_scoring (or es_stream)",
              DeprecationWarning, stacklevel=2)


def __getattr__(name: str) -> Any:
    return getattr(_new, name)
