"""Exceptions es-stream raises. Each message names the file, sample or argument at fault and
says what to do about it."""

from __future__ import annotations


class ESStreamError(Exception):
    """Base class of every error es-stream raises on purpose."""


class ShardError(ESStreamError, OSError):
    """A shard is missing, truncated, corrupt or not what the index says it is."""

    def __init__(self, shard: str, message: str, *, sample: int | None = None) -> None:
        where = shard if sample is None else f"{shard} (sample id {sample})"
        super().__init__(f"{where}: {message}")
        self.shard = shard
        self.sample = sample


class StaleIndexError(ESStreamError):
    """A cached corpus index no longer matches the shards on disk."""


class ManifestError(ESStreamError, ValueError):
    """A pruning manifest is unfinished, from another corpus, or missing a shard."""


class ScoreError(ESStreamError, ValueError):
    """Scores that cannot be used: non-finite or (for ESWP) negative values, a score file that
    is not a score store or belongs to another corpus."""


class MissingExtraError(ImportError):
    """An optional dependency is needed; the message names the pip extra that installs it."""

    def __init__(self, feature: str, extra: str, package: str) -> None:
        super().__init__(
            f"{feature} needs the '{package}' package: pip install 'es-stream[{extra}]'"
        )
