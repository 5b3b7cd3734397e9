"""Exceptions es-stream raises. Each message names the file, sample or argument at fault and
says what to do about it.

Every class here can be rebuilt from its message alone (``type(exc)(str(exc))``) and pickled:
PyTorch's DataLoader re-raises a worker's exception in the main process as
``exc_type(message)`` and falls back to a plain ``RuntimeError`` when that call fails, so an
error raised in a worker must survive that call to stay catchable by its own type
(``except es_stream.ShardError``). Rebuilt that way, the structured attributes (``shard``,
``sample``) are None: the message still names them.
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import Iterator


class ESStreamError(Exception):
    """Base class of every error es-stream raises on purpose."""


class ShardError(ESStreamError, OSError):
    """A shard is missing, truncated, corrupt or not what the index says it is.

    ``ShardError(shard, message, sample=id)`` prefixes the message with the shard and the
    sample id; ``ShardError(message)`` alone takes a complete message (how DataLoader workers
    and pickle rebuild it). Raised as is, a ShardError means the rest of the shard cannot be
    read (under ``on_error="skip"`` it is skipped for the rest of the epoch in that worker);
    its subclass :class:`SampleError` means one sample is bad and the rest of the shard is fine.
    """

    def __init__(self, shard: str, message: str | None = None, *,
                 sample: int | None = None) -> None:
        if message is None:  # rebuilt from its message (DataLoader worker, pickle)
            super().__init__(shard)
            self.shard: str | None = None
            self.sample = sample
            return
        where = shard if sample is None else f"{shard} (sample id {sample})"
        super().__init__(f"{where}: {message}")
        self.shard = shard
        self.sample = sample


class SampleError(ShardError):
    """One sample cannot be read or decoded, while the rest of its shard still can (a decode
    error, a sample missing a field, a bad header of one sample of a tar read by offset).
    Under ``on_error="skip"`` just that sample is skipped."""


class StaleIndexError(ESStreamError):
    """A cached corpus index no longer matches the shards on disk."""


class IndexFileError(ESStreamError, ValueError):
    """A saved es-stream corpus index (``Corpus.save`` / ``es-stream index -o``) is not one:
    not Parquet, truncated, or missing the metadata or columns es-stream writes."""


class ManifestError(ESStreamError, ValueError):
    """A pruning manifest is unfinished, from another corpus, or missing a shard."""


class ScoreError(ESStreamError, ValueError):
    """Scores that cannot be used: non-finite or (for ESWP) negative values, a score file that
    is not a score store or belongs to another corpus."""


class MissingExtraError(ImportError):
    """An optional dependency is needed; the message names the pip extra that installs it.

    ``MissingExtraError(feature, extra, package)``, or ``MissingExtraError(message)`` with a
    complete message (how DataLoader workers and pickle rebuild it).
    """

    def __init__(self, feature: str, extra: str | None = None, package: str | None = None) -> None:
        if extra is None or package is None:
            super().__init__(feature)
            return
        super().__init__(
            f"{feature} needs the '{package}' package: pip install 'es-stream[{extra}]'"
        )


class RankMismatchError(ESStreamError, RuntimeError):
    """Ranks of one ``torch.distributed`` run disagree on something that must be equal on all
    of them (the corpus, the seed, the meta-batch size, ...); raised on every rank, naming the
    field and each rank's value (see :func:`es_stream.agreement.check_ranks_agree`)."""


_ERRNO = re.compile(r"\[?errno (\d+)\]?", re.IGNORECASE)


def with_path(exc: OSError, path: str | os.PathLike) -> OSError:
    """``exc`` as an ``OSError`` that names ``path``: ``exc`` itself when it names a file
    already, else a new one with the same errno (read from the message when the raiser, e.g.
    pyarrow, only wrote it there). A full disk then reads ``[Errno 28] No space left on
    device: 'out/epoch=00001/shard=00003.parquet'`` rather than naming nothing."""
    if getattr(exc, "filename", None) is not None or isinstance(exc, ESStreamError):
        return exc
    number = exc.errno
    if number is None:
        found = _ERRNO.search(str(exc))
        number = int(found.group(1)) if found else None
    if number is None:
        return OSError(f"{os.fspath(path)}: {exc}")
    detail = os.strerror(number)
    text = str(exc)
    if exc.errno is None and text and text != detail:  # keep what the raiser said beyond errno
        detail = f"{detail} ({' '.join(text.split())})"
    return OSError(number, detail, os.fspath(path))


@contextlib.contextmanager
def naming(path: str | os.PathLike) -> Iterator[None]:
    """Run the block; an ``OSError`` from it that names no file is re-raised naming ``path``
    (see :func:`with_path`). For writes whose failures (a full disk, a read-only mount) would
    otherwise say only ``[Errno 28] No space left on device``."""
    try:
        yield
    except OSError as exc:
        named = with_path(exc, path)
        if named is exc:
            raise
        raise named from exc
