"""Atomic file writes: other runs read what we write, so they must see the old file or the new
one, never half of either."""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterator

from .errors import naming


def _process_umask() -> int:
    mask = os.umask(0o022)   # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


#: read once at import (setting and restoring it per call would race with writer threads)
_UMASK = _process_umask()


def public_mode(path: str | os.PathLike, directory: bool = False) -> None:
    """Give ``path`` the mode ``open()``/``mkdir()`` would have (0666/0777 less the umask):
    ``mkstemp``/``mkdtemp`` make theirs private (0600/0700), and the renamed result is a file
    other users' runs read."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_UMASK)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path in the target's directory; on success fsync it and rename it over
    ``path``. On failure the temporary file is removed and ``path`` is untouched. An OS error
    that names no file (a full disk, a read-only mount, from a writer such as pyarrow) is raised
    naming ``path``."""
    path = os.fspath(path)
    with naming(path):
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                                   dir=directory)
        os.close(fd)
        public_mode(tmp)
        try:
            yield tmp
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        fsync_path(directory)


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or directory by path: for a directory, this makes the entries renamed into
    it durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
