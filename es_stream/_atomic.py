"""The former home of :mod:`es_stream.atomic`, kept importable (it was imported from outside)."""

from .atomic import _UMASK, atomic_write, fsync_path, public_mode  # noqa: F401
