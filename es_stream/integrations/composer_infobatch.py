"""Deprecated: :class:`InfoBatch` lives in :mod:`es_stream.integrations.composer` (defined in its
``infobatch`` module); this name keeps working, with a warning."""

from __future__ import annotations

from typing import Any

from .._deprecated import warn_moved


def __getattr__(name: str) -> Any:
    # resolved on first access (PEP 562), so the warning names the importer's line
    if name == "InfoBatch":
        from .composer import InfoBatch

        warn_moved(f"{__name__}.InfoBatch", "es_stream.integrations.composer")
        return InfoBatch
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
