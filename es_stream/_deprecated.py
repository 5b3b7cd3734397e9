"""Old import paths kept working: a name that moved warns once per access, naming its new home."""

from __future__ import annotations

import warnings


def warn_moved(old: str, new: str) -> None:
    """Warn that ``old`` (``module.Name``) is deprecated in favour of ``new``; called from the
    old module's ``__getattr__`` (or top level), so the warning points at the importer."""
    warnings.warn(f"{old} is deprecated and will be removed: import it from {new}",
                  DeprecationWarning, stacklevel=3)
