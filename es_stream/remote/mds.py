"""MDS shards in an object store: uncompressed ones read by byte range, compressed ones fetched
whole into a bounded local cache.

**By range.** A raw MDS shard starts with its sample-offset table (uint32 count, then count + 1
uint32 offsets), so sample i is bytes ``[off[i], off[i + 1])``. :class:`RemoteMDSReader` fetches
that header once per shard (one ranged GET of ``4 * (count + 2)`` bytes, checked against
``index.json`` as the local reader checks its memory map), then reads a meta-batch's samples
together: sorted and coalesced into runs of samples that touch (the fetcher's gap, 0 by
default: a pruned sample is never part of a run, so it never crosses the network), the runs sent
several at a time through :class:`~es_stream.remote.fetch.RangeFetcher`, each sample decoded by
streaming's own ``MDSReader.decode_sample`` as :class:`~es_stream.sources.mds.MDSShardReader`
does. A request that fails after its retries is the :class:`~es_stream.errors.ShardError`
(naming the URL) of each sample it held, returned from :meth:`RemoteMDSReader.read_batch`, so
``on_error`` treats it as a local shard that cannot be read.

A raw shard already in the corpus's local directory (streaming's ``local=`` cache, filled by a
``StreamingDataset`` or a copy) is memory-mapped from there instead, as the local reader does.
A raw shard this machine reads nearly whole this epoch (an unpruned epoch) is staged whole on
local disk ahead of its use and memory-mapped from there (:mod:`es_stream.remote.cache`), so it
costs one download instead of a request per sample.

**Compressed shards** cannot be read by range: as streaming does, the compressed object is
fetched whole once (through the same fetcher: retries, deadline) and decompressed, bounded by
its declared raw size, into the corpus's local directory under the per-shard lock of
:func:`~es_stream.sources.mds.shard_lock`, then memory-mapped. That cache is bounded by
``cache_limit`` bytes (default ``$ES_STREAM_MDS_CACHE_LIMIT``, unset: unbounded, as
streaming's ``cache_limit=None``): past it the least recently opened decompressed shards of the
corpus are removed (files this cache made from a compressed shard, never a raw shard the
dataset ships; one in use by another process is skipped, and a process that has it mapped keeps
reading its map).
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from collections import OrderedDict
from typing import Any

import numpy as np

from ..errors import SampleError, ShardError
from ..sources.decompress import decompress_bounded
from ..sources.handles import MAX_OPEN_SHARDS
from ..sources.mds import MDSShardReader, header_size, sample_offsets, shard_lock
from .cache import CachePolicy, ShardCache, StagedReads, StagingPlan
from .fetch import RangeFetcher
from .index import remote_join
from .ranges import coalesce_ranges

#: shards whose offset tables a reader keeps (8 bytes a sample each; least recently used first)
MAX_HEADERS = 4096


def _cache_limit_from_env() -> int | None:
    raw = os.environ.get("ES_STREAM_MDS_CACHE_LIMIT")
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"environment variable ES_STREAM_MDS_CACHE_LIMIT={raw!r} must be a "
                         "byte count; fix or unset it") from None
    if value < 1:
        raise ValueError(f"ES_STREAM_MDS_CACHE_LIMIT must be >= 1 byte, got {value}")
    return value


class RemoteMDSReader(StagedReads, MDSShardReader):
    """Reads the MDS corpus of ``corpus.mds.remote`` (an object store) by byte range.

    ``fetcher``: the :class:`RangeFetcher` to use (default: one with the corpus's
    ``storage_options`` and ``retry``); its ``requests`` and ``bytes_fetched`` count the network
    side. ``cache_limit``: bytes of decompressed shards kept in the local directory (see the
    module doc). ``cache``: when and where raw shards read nearly whole are staged
    (:class:`~es_stream.remote.cache.CachePolicy`, default from the environment). Create it in
    the process that reads, as any reader.
    """

    def __init__(self, corpus: Any, fetcher: RangeFetcher | None = None,
                 max_open: int = MAX_OPEN_SHARDS, cache_limit: int | None = None,
                 cache: CachePolicy | None = None) -> None:
        super().__init__(corpus, max_open)
        info = corpus.mds
        if info.remote is None:
            raise ValueError("RemoteMDSReader needs an MDS corpus with a remote; a local one is "
                             "read by MDSShardReader")
        entries = info.index["shards"]
        self.urls = [remote_join(info.remote, info.split, e["raw_data"]["basename"])
                     for e in entries]
        #: shards read by byte range (raw in the store); the others are compressed there
        self.by_range = np.array([e["zip_data"] is None for e in entries], dtype=bool)
        self.fetcher = fetcher or RangeFetcher(corpus.storage_options, retry=corpus.retry)
        self.cache_limit = cache_limit if cache_limit is not None else _cache_limit_from_env()
        if self.cache_limit is not None and self.cache_limit < 1:
            raise ValueError(f"cache_limit must be >= 1 byte or None, got {self.cache_limit}")
        self._offsets: OrderedDict[int, np.ndarray] = OrderedDict()
        self._in_local: dict[int, bool] = {}
        self.staging = StagingPlan(
            ShardCache(self.fetcher, cache), [u if r else None for u, r in
                                              zip(self.urls, self.by_range.tolist())],
            [r.raw_data.bytes for r in self.readers], [s.etag for s in corpus.shards],
            lambda ids: corpus.locate(ids)[0],
            corpus.shard_counts)

    def shard_path(self, shard: int) -> str:
        staged = self.staging.path(shard) if self.by_range[shard] else None
        return staged or super().shard_path(shard)

    def in_local(self, shard: int) -> bool:
        """Whether raw shard ``shard`` is already in the local directory (as streaming's
        ``local=`` cache holds it, fetched by a StreamingDataset or copied there): it is then
        memory-mapped like a local shard, not fetched. Looked up once per shard and reader."""
        got = self._in_local.get(shard)
        if got is None:
            got = self._in_local[shard] = os.path.isfile(self.corpus.local_path(shard))
        return got or self.staging.path(shard) is not None

    # ------------------------------------------------------------------ headers
    def _remember(self, shard: int, offsets: np.ndarray) -> np.ndarray:
        self._offsets[shard] = offsets
        self._offsets.move_to_end(shard)
        while len(self._offsets) > MAX_HEADERS:
            self._offsets.popitem(last=False)
        return offsets

    def _parse(self, shard: int, header: bytes) -> np.ndarray:
        reader = self.readers[shard]
        return sample_offsets(header, reader.samples, reader.raw_data.bytes, self.urls[shard])

    def offsets(self, shard: int) -> np.ndarray:
        """Sample offsets of by-range shard ``shard`` (its header fetched on first use)."""
        got = self._offsets.get(shard)
        if got is not None:
            self._offsets.move_to_end(shard)
            return got
        header = self.fetcher.read(self.urls[shard], 0, header_size(self.readers[shard].samples))
        return self._remember(shard, self._parse(shard, header))

    def _headers(self, shards: list[int]) -> dict[int, ShardError]:
        """Fetch the headers of ``shards`` not known yet, together; the errors by shard."""
        todo = [s for s in shards if s not in self._offsets]
        errors: dict[int, ShardError] = {}
        got = self.fetcher.iter_requests(
            [(self.urls[s], 0, header_size(self.readers[s].samples)) for s in todo],
            return_errors=True)
        for shard, header in zip(todo, got):
            if isinstance(header, ShardError):
                errors[shard] = header
                continue
            try:
                self._remember(shard, self._parse(shard, header))
            except ShardError as exc:
                errors[shard] = exc
        return errors

    # ------------------------------------------------------------------ samples
    def read(self, shard: int, position: int, sample_id: int) -> dict[str, Any]:
        """One sample: by range for a raw shard in the store, from the local cache for a
        compressed one (fetched and decompressed on first use)."""
        if not self.by_range[shard] or self.in_local(shard):
            return super().read(shard, position, sample_id)
        off = self.offsets(shard)
        start, end = int(off[position]), int(off[position + 1])
        data = self.fetcher.read(self.urls[shard], start, end - start)
        return self.decode(shard, data, sample_id, self.urls[shard])

    def read_batch(self, ids: np.ndarray, shards: np.ndarray,
                   skip_shards: set[int] = frozenset()) -> list[dict[str, Any] | ShardError | None]:
        """The samples of a meta-batch in raw shards of the store, fetched together (see the
        module doc); None for samples of compressed shards and of raw shards already in the
        local directory (left to :meth:`read`, a memory map), and of ``skip_shards``. A failed
        request's ShardError, or a sample's SampleError, in place of each sample it concerns."""
        ids = np.asarray(ids, dtype=np.int64)
        shards = np.asarray(shards, dtype=np.int64)
        self.staging.reached(ids)
        out: list[Any] = [None] * len(ids)
        wanted = self.by_range[shards]
        for shard in set(shards[wanted].tolist()):
            if self.in_local(shard):
                wanted &= shards != shard
        if skip_shards:
            wanted &= ~np.isin(shards, list(skip_shards))
        rows = np.flatnonzero(wanted)
        if not len(rows):
            return out
        errors = self._headers(sorted(set(shards[rows].tolist())))
        keep = []
        for row in rows.tolist():
            error = errors.get(int(shards[row]))
            if error is not None:
                out[row] = error
            else:
                keep.append(row)
        if not keep:
            return out
        rows = np.array(keep, dtype=np.int64)
        positions = ids[rows] - self.corpus.shard_starts[shards[rows]]
        starts = np.empty(len(rows), dtype=np.int64)
        ends = np.empty(len(rows), dtype=np.int64)
        for j, (shard, pos) in enumerate(zip(shards[rows].tolist(), positions.tolist())):
            off = self._offsets[shard]
            starts[j], ends[j] = off[pos], off[pos + 1]
        plan = coalesce_ranges(shards[rows], starts, ends - starts, gap=self.fetcher.gap,
                               max_request=self.fetcher.max_request)
        # the samples of each request, so each response is decoded as it arrives and dropped
        by_request = np.argsort(plan.request, kind="stable")
        bounds = np.searchsorted(plan.request[by_request], np.arange(plan.num_requests + 1))
        got = self.fetcher.iter_requests(
            [(self.urls[k], s, e) for k, s, e in zip(plan.keys.tolist(), plan.starts.tolist(),
                                                     plan.ends.tolist())], return_errors=True)
        for r, buf in enumerate(got):
            for j in by_request[bounds[r]:bounds[r + 1]].tolist():
                row = int(rows[j])
                if isinstance(buf, ShardError):
                    out[row] = buf
                    continue
                shard = int(shards[row])
                w = int(plan.within[j])
                try:
                    out[row] = self.decode(shard, buf[w:w + int(ends[j] - starts[j])],
                                           int(ids[row]), self.urls[shard])
                except SampleError as exc:
                    out[row] = exc
        return out

    # ------------------------------------------------------------------ compressed shards
    def _map(self, shard: int) -> Any:
        opened = super()._map(shard)
        if not self.by_range[shard]:
            try:  # its use, for the cache's least-recently-used order
                os.utime(self.corpus.local_path(shard))
            except OSError:
                pass
        return opened

    def _fetch(self, shard: int, path: str) -> None:
        """Fetch compressed shard ``shard`` whole from the store and decompress it to ``path``,
        once across processes (under :func:`shard_lock`), then keep the cache within its
        limit."""
        reader = self.readers[shard]
        raw_info, zip_info = reader.file_pairs[0]
        url = remote_join(self.corpus.mds.remote, self.corpus.mds.split, zip_info.basename)
        where = os.path.dirname(path)
        try:
            os.makedirs(where, exist_ok=True)
        except OSError as exc:
            raise ShardError(path, f"cannot create the cache directory {where} ({exc}); give "
                             "Corpus.from_mds a writable local=") from exc
        with shard_lock(path):
            if os.path.isfile(path):  # another worker, rank or run made it while we waited
                return
            data = self.fetcher.read(url, 0, zip_info.bytes)
            fd, zip_path = tempfile.mkstemp(prefix=f".{zip_info.basename}.", dir=where)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                del data
                decompress_bounded(reader.compression, zip_path, path, raw_info.bytes,
                                   zip_info.bytes)
            except ShardError as exc:
                raise ShardError(url, f"cannot decompress the shard fetched from here ({exc})"
                                 ) from exc
            finally:
                os.remove(zip_path)  # the temporary copy this call made
        if self.cache_limit is not None:
            self._evict(keep=shard)

    def _evict(self, keep: int) -> None:
        """Remove least recently opened decompressed shards until the cache fits its limit."""
        cached = []
        for shard in np.flatnonzero(~self.by_range).tolist():
            path = self.corpus.local_path(shard)
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue
            cached.append((st.st_mtime_ns, st.st_size, shard, path))
        total = sum(size for _, size, _, _ in cached)
        for _, size, shard, path in sorted(cached):
            if total <= self.cache_limit:
                return
            if shard == keep:
                continue
            if self._remove_unlocked(path):
                opened = self.open_shards.handles.pop(shard, None)
                if opened is not None:
                    self.open_shards.close_handle(opened)
                total -= size

    @staticmethod
    def _remove_unlocked(path: str) -> bool:
        """Remove ``path`` unless another process holds its shard lock (it is being made)."""
        lock_path = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.es-stream-lock")
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        try:
            os.remove(path)
            return True
        except OSError:
            return False
        finally:
            os.close(fd)

    def close(self) -> None:
        super().close()
        self._offsets.clear()
        self._in_local.clear()
        self.staging.close()
        self.fetcher.close()
