"""Deprecated module path: :class:`FeedbackChannel` lives in :mod:`es_stream.device_channel`
(the host store <-> device transport); import it from there or from ``es_stream``."""

from __future__ import annotations

import warnings

from .device_channel import FeedbackChannel

__all__ = ["FeedbackChannel"]

warnings.warn("es_stream.feedback is deprecated: import FeedbackChannel from es_stream (or "
              "es_stream.device_channel)", DeprecationWarning, stacklevel=2)
