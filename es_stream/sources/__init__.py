"""Shard readers, one per format, behind one protocol (:class:`ShardReader`) and chosen from
:data:`READERS` by the corpus's format. They read samples by (shard, position); the plan of what
to read lives elsewhere (:mod:`es_stream.plan`). A new format is one reader class and one entry
in :data:`READERS`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence, runtime_checkable

import numpy as np

from ..errors import ShardError
from ..mds_index import check_safe_columns
from ..remote.store import reads_by_range
from .mds import MDSShardReader
from .wds import WDSShardReader

if TYPE_CHECKING:
    from ..corpus import Corpus


@runtime_checkable
class ShardReader(Protocol):
    """Random access to the samples of one indexed corpus.

    Made by ``READERS[corpus.format](corpus)`` inside the process that reads (a DataLoader
    worker): it may hold open files and maps, released by :meth:`close`.
    """

    def read(self, shard: int, position: int, sample_id: int) -> Any:
        """The sample at ``position`` of ``shard`` (global id ``sample_id``), undecoded; a
        :class:`~es_stream.errors.ShardError` (or its subclass ``SampleError``) naming the shard
        when it cannot be read."""

    def read_batch(self, ids: np.ndarray, shards: np.ndarray,
                   skip_shards: set[int] = frozenset()) -> list[Any | ShardError | None]:
        """Read the samples ``ids`` (of ``shards``) of one meta-batch together, where that is
        cheaper than one by one. One entry per id, in order: what :meth:`read` returns, the
        ``ShardError`` it would raise (returned, not raised: the caller applies its error policy
        in the meta-batch's order), or None for a sample left to :meth:`read` (any sample of
        ``skip_shards`` among them)."""

    def will_read(self, batches: Sequence[np.ndarray], node_ids: Callable[[], np.ndarray]) -> None:
        """Told before an iteration: the meta-batches (id arrays) it will ask for, in order, and
        a function giving the ids this machine's ranks read this epoch. A reader that fetches
        over a network reads ahead from it; local readers ignore it."""

    def close(self) -> None:
        """Release what the reader holds; it may be used again afterwards (reopening)."""


#: format -> reader class, as ``Corpus.format`` names it
READERS: dict[str, Callable[["Corpus"], ShardReader]] = {
    "wds": WDSShardReader,
    "mds": MDSShardReader,
}


def open_reader(corpus: "Corpus", *, allow_unsafe_types: bool = False) -> ShardReader:
    """A reader for ``corpus``'s format, to be created in the process that reads.

    An MDS corpus with a ``pkl`` column (read by unpickling: it runs code) is refused with a
    ``ValueError`` unless ``allow_unsafe_types``."""
    if corpus.mds is not None:
        check_safe_columns(corpus.mds.index, corpus.mds.local, allow_unsafe_types,
                           "allow_unsafe_types=True")
    if corpus.mds is not None and corpus.mds.remote is not None and \
            reads_by_range(corpus.mds.remote):
        from ..remote.mds import RemoteMDSReader  # raw shards by byte range, compressed cached

        return RemoteMDSReader(corpus)
    if corpus.format == "wds" and any(reads_by_range(s.name) for s in corpus.shards):
        from ..remote.tar import RemoteTarReader  # object-store shards, read by byte range

        return RemoteTarReader(corpus)
    try:
        make = READERS[corpus.format]
    except KeyError:
        raise ValueError(f"no shard reader for format {corpus.format!r}; known: "
                         f"{sorted(READERS)}") from None
    return make(corpus)
