"""Deprecated: :class:`ESStreamingDataset` is an integration with mosaicml-streaming and lives in
:mod:`es_stream.integrations.streaming_dataset`; this name keeps working, with a warning."""

from __future__ import annotations

from typing import Any

from .._deprecated import warn_moved


def __getattr__(name: str) -> Any:
    # resolved on first access only (PEP 562), so the core imports no integration
    if name == "ESStreamingDataset":
        from ..integrations.streaming_dataset import ESStreamingDataset

        warn_moved(f"{__name__}.ESStreamingDataset", "es_stream.integrations.streaming_dataset")
        return ESStreamingDataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
