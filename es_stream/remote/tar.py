"""WebDataset tar shards in an object store, read by byte range like local ones.

:class:`RemoteTarReader` is :class:`~es_stream.sources.wds.WDSShardReader` whose reads of
``s3://``, ``gs://`` and ``http(s)://`` shards go through a :class:`RangeFetcher` instead of
``pread``: a meta-batch's samples are sorted and coalesced exactly as for a local shard (runs of
samples that touch; a pruned sample is never part of a run), and all of the meta-batch's runs
are fetched at once, several requests in flight, before the local path slices and checks them.
Header checks, errors and ``on_error`` are those of the local reader: a request that fails
after its retries is the :class:`ShardError` the local ``pread`` would raise for that run.

**Ahead of the loop.** The dataset tells the reader its worker's meta-batches in advance
(:meth:`~es_stream.remote.cache.StagedReads.will_read`). The next meta-batch's requests are sent while the current
one is used (one meta-batch ahead: its bytes are the memory this costs), so the network waits
overlap training instead of adding to it. A shard this node reads nearly whole this epoch is
staged on local disk (:mod:`es_stream.remote.cache`): its download starts
:data:`~es_stream.remote.cache.STAGE_LOOKAHEAD` meta-batches before its first use, and reads of it wait for the
download, so an unpruned epoch costs one download per shard, like webdataset and
mosaicml-streaming (and, like theirs, the first meta-batch waits for the shards it draws from:
lower ``block_size`` to draw from fewer). A pruned shard is still read sample by sample. If a
download fails, the shard falls back to range reads, which report the error as usual.
"""

from __future__ import annotations

import os
from concurrent.futures import Future
from dataclasses import replace
from typing import Any, Sequence

import numpy as np

from ..corpus import Corpus
from ..errors import ShardError
from ..sources.handles import OpenShards
from ..sources.wds import WDSShardReader, _coalesce
from .cache import CachePolicy, ShardCache, StagedReads, StagingPlan
from .fetch import RangeFetcher, RetryPolicy
from .index import with_env_endpoint
from .store import is_remote_url


def remote_corpus(corpus: Corpus, urls: Sequence[str], *,
                  storage_options: dict[str, Any] | None = None,
                  retry: RetryPolicy | None = None) -> Corpus:
    """``corpus`` (a tar corpus indexed anywhere, e.g. from a local copy) with its shards at
    ``urls``, one per shard in order: same layout, ids and fingerprint (which is of base names,
    sizes and counts). The shards' mtimes are unknown there (-1), so ``check_fresh`` skips them;
    :func:`check_remote_sizes` compares their sizes instead.

    ``storage_options`` and ``retry`` travel with the corpus (pickled into DataLoader workers),
    so the readers made in workers use them: prefer them to environment variables, which a
    ``forkserver`` worker takes from when its server started, not from now."""
    if corpus.format != "wds" or corpus.tar is None:
        raise ValueError("remote_corpus: a WebDataset tar corpus is needed (MDS corpora name "
                         "their remote in Corpus.from_mds)")
    urls = list(urls)
    if len(urls) != corpus.num_shards:
        raise ValueError(f"remote_corpus: {len(urls)} URLs for {corpus.num_shards} shards")
    shards = [replace(s, name=u, mtime_ns=-1) for s, u in zip(corpus.shards, urls)]
    out = Corpus("wds", shards, tar=corpus.tar)
    # the endpoint of the environment travels too: a forkserver worker sees the environment
    # of when its server started, not this one
    out.storage_options = with_env_endpoint(urls[0], dict(storage_options or {})) if urls and \
        is_remote_url(urls[0]) else dict(storage_options or {})
    out.retry = retry
    return out


def check_remote_sizes(corpus: Corpus, fetcher: RangeFetcher | None = None) -> None:
    """Raise :class:`~es_stream.errors.StaleIndexError` naming the first remote shard whose
    size differs from the index's (one HEAD request per shard)."""
    from ..errors import StaleIndexError

    fetcher = fetcher or RangeFetcher()
    for shard in corpus.shards:
        if is_remote_url(shard.name) and shard.size >= 0:
            size = fetcher.size(shard.name)
            if size != shard.size:
                raise StaleIndexError(f"{shard.name}: {size} bytes, the index says {shard.size}: "
                                      "the shard changed since it was indexed; re-index it")


class RemoteTarReader(StagedReads, WDSShardReader):
    """A tar reader that reads object-store shards by byte range (see the module doc).

    ``fetcher``: the :class:`RangeFetcher` to use (default: one with ``storage_options`` and
    the environment's retry settings); its ``requests`` and ``bytes_fetched`` count the network
    side, ``bytes_read`` what the reader used. ``cache``: when and where whole shards are staged
    (:class:`~es_stream.remote.cache.CachePolicy`, default from the environment).
    """

    def __init__(self, corpus: Corpus, fetcher: RangeFetcher | None = None,
                 storage_options: dict[str, Any] | None = None,
                 cache: CachePolicy | None = None) -> None:
        super().__init__(corpus)
        self.remote = np.array([is_remote_url(s.name) for s in corpus.shards], dtype=bool)
        self.local = self.local | self.remote  # read by offset, in batches, like local shards
        if fetcher is None:
            options = storage_options or getattr(corpus, "storage_options", None)
            fetcher = RangeFetcher(options, retry=getattr(corpus, "retry", None))
        self.fetcher = fetcher
        self.staging = StagingPlan(
            ShardCache(fetcher, cache), [s.name if r else None for s, r in
                                         zip(corpus.shards, self.remote.tolist())],
            [s.size for s in corpus.shards], [s.etag for s in corpus.shards],
            lambda ids: corpus.locate(ids)[0],
            corpus.shard_counts)
        self.staged_files: OpenShards[int] = OpenShards(self._open_staged, os.close)
        self._ahead: dict[tuple[int, int, int], Future] = {}
        self._prefetched: dict[tuple[int, int, int], bytes | ShardError] = {}

    def _open_staged(self, shard: int) -> int:
        return os.open(self.staging.path(shard), os.O_RDONLY)

    # ------------------------------------------------------------------ reads
    def _pread(self, shard: int, length: int, offset: int, sample_id: int) -> bytes:
        if self.remote[shard]:
            return self._pread_local(shard, length, offset)
        return super()._pread(shard, length, offset, sample_id)

    def _pread_local(self, shard: int, length: int, offset: int) -> bytes:
        if not self.remote[shard]:
            return super()._pread_local(shard, length, offset)
        got = self._prefetched.pop((shard, offset, length), None)
        if got is None:
            if self.staging.path(shard) is not None:
                return os.pread(self.staged_files.get(shard), length, offset)
            got = self.fetcher.read(self.corpus.shards[shard].name, offset, length)
        if isinstance(got, ShardError):
            raise got
        return got

    def _remote_runs(self, ids: np.ndarray, shards: np.ndarray,
                     skip_shards: set[int] = frozenset(), ahead: bool = False
                     ) -> list[tuple[int, int, int]]:
        """``(shard, start, end)`` of the coalesced runs of ``ids`` (of ``shards``) that go over
        the network (remote, not staged, not in ``skip_shards``), as :meth:`read_batch` cuts
        them; ``ahead`` (the next meta-batch): without waiting for downloads, leaving their
        shards out."""
        wanted = self.remote[shards]
        out = [s for s in np.unique(shards[wanted]).tolist() if s in skip_shards or (
            self.staging.dense[s] if ahead else self.staging.path(s) is not None)]
        if out:
            wanted &= ~np.isin(shards, out)
        if not wanted.any():
            return []
        t = self.table
        sel = np.flatnonzero(wanted)
        order = sel[np.lexsort((t.offsets[ids[sel]], shards[sel]))]
        o_shards, offs, lens = shards[order], t.offsets[ids[order]], t.lengths[ids[order]]
        firsts, run_ends = _coalesce(o_shards, offs, lens)
        return list(zip(o_shards[firsts].tolist(), offs[firsts].tolist(), run_ends.tolist()))

    def _submit(self, runs: list[tuple[int, int, int]]) -> dict[tuple[int, int, int], Future]:
        names = self.corpus.shards
        return {run: self._ahead.pop(run, None) or self.fetcher.submit(names[run[0]].name, *run[1:])
                for run in runs}

    def read_batch(self, ids: np.ndarray, shards: np.ndarray,
                   skip_shards: set[int] = frozenset()) -> list[Any]:
        following = self.staging.reached(ids)
        futures = self._submit(self._remote_runs(ids, shards, skip_shards))
        for future in self._ahead.values():  # sent for a meta-batch that did not come
            future.cancel()
        self._ahead = {}
        if following is not None:  # the next meta-batch, sent now
            self._ahead = self._submit(self._remote_runs(
                following, self.corpus.locate(following)[0], skip_shards, ahead=True))
        names = self.corpus.shards
        self._prefetched = {(s, o, e - o): self.fetcher.result(f, names[s].name, o, e)
                            for (s, o, e), f in futures.items()}
        try:
            return super().read_batch(ids, shards, skip_shards)
        finally:
            self._prefetched = {}

    def close(self) -> None:
        for future in self._ahead.values():
            future.cancel()
        self._ahead = {}
        super().close()
        self.staged_files.close()
        self.staging.close()
        self.fetcher.close()
