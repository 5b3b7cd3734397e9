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
