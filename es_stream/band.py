"""Deprecated module path: BandPolicy and ThresholdPolicy (pruning policies over reference
scores, decided once) live in :mod:`es_stream.reference_policy`; import them from there or from
``es_stream``."""

from __future__ import annotations

import warnings
from typing import Any

from . import reference_policy as _new

warnings.warn("es_stream.band is deprecated: import from es_stream.reference_policy (or es_stream)",
              DeprecationWarning, stacklevel=2)


def __getattr__(name: str) -> Any:
    return getattr(_new, name)
