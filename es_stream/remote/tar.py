"""WebDataset tar shards in an object store, read by byte range like local ones.

:class:`RemoteTarReader` is :class:`~es_stream.sources.wds.WDSShardReader` whose reads of
``s3://``, ``gs://`` and ``http(s)://`` shards go through a :class:`RangeFetcher` instead of
``pread``: a meta-batch's samples are sorted and coalesced exactly as for a local shard (runs of
samples that touch; a pruned sample is never part of a run), and all of the meta-batch's runs
are fetched at once, several requests in flight, before the local path slices and checks them.
Header checks, errors and ``on_error`` are those of the local reader: a request that fails
after its retries is the :class:`ShardError` the local ``pread`` would raise for that run.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence

import numpy as np

from ..corpus import Corpus
from ..errors import ShardError
from ..sources.wds import WDSShardReader, _coalesce
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


class RemoteTarReader(WDSShardReader):
    """A tar reader that reads object-store shards by byte range (see the module doc).

    ``fetcher``: the :class:`RangeFetcher` to use (default: one with ``storage_options`` and
    the environment's retry settings); its ``requests`` and ``bytes_fetched`` count the network
    side, ``bytes_read`` what the reader used.
    """

    def __init__(self, corpus: Corpus, fetcher: RangeFetcher | None = None,
                 storage_options: dict[str, Any] | None = None) -> None:
        super().__init__(corpus)
        self.remote = np.array([is_remote_url(s.name) for s in corpus.shards], dtype=bool)
        self.local = self.local | self.remote  # read by offset, in batches, like local shards
        if fetcher is None:
            options = storage_options or getattr(corpus, "storage_options", None)
            fetcher = RangeFetcher(options, retry=getattr(corpus, "retry", None))
        self.fetcher = fetcher
        self._prefetched: dict[tuple[int, int, int], bytes | ShardError] = {}

    def _pread(self, shard: int, length: int, offset: int, sample_id: int) -> bytes:
        if self.remote[shard]:
            return self._pread_local(shard, length, offset)
        return super()._pread(shard, length, offset, sample_id)

    def _pread_local(self, shard: int, length: int, offset: int) -> bytes:
        if not self.remote[shard]:
            return super()._pread_local(shard, length, offset)
        got = self._prefetched.pop((shard, offset, length), None)
        if got is None:
            got = self.fetcher.read(self.corpus.shards[shard].name, offset, length)
        if isinstance(got, ShardError):
            raise got
        return got

    def _read_runs(self, ids: np.ndarray, shards: np.ndarray, order: np.ndarray,
                   o_shards: np.ndarray, offs: np.ndarray, lens: np.ndarray, out: list
                   ) -> tuple[list[bytes], np.ndarray, np.ndarray]:
        # the runs the local path is about to read one by one: fetch the remote ones together
        firsts, run_ends = _coalesce(o_shards, offs, lens)
        runs = [(s, o, e) for s, o, e in zip(o_shards[firsts].tolist(), offs[firsts].tolist(),
                                             run_ends.tolist()) if self.remote[s]]
        names = self.corpus.shards
        got = self.fetcher.iter_requests([(names[s].name, o, e) for s, o, e in runs],
                                         return_errors=True)
        self._prefetched = {(s, o, e - o): data for (s, o, e), data in zip(runs, got)}
        try:
            return super()._read_runs(ids, shards, order, o_shards, offs, lens, out)
        finally:
            self._prefetched = {}

    def close(self) -> None:
        super().close()
        self.fetcher.close()
