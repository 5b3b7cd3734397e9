"""`ShardCache`: whole object-store shards staged on local disk, for the shards an epoch reads
nearly whole.

Reading by byte range pays when an epoch reads part of a shard (pruned samples never cross the
network). When it reads nearly all of it, one request per sample wastes round trips that a
whole-object download does not: that is what mosaicml-streaming and webdataset do every time.
So a reader stages a shard when the share of its samples that this node reads this epoch is at
least :attr:`CachePolicy.stage_above` (0.8 by default), and reads the others by range.

**Layout and sharing.** Staged files live in ``directory`` (default ``$ES_STREAM_CACHE``, else
``<tmp>/es-stream-cache-<uid>``), named by a hash of the URL, the endpoint it is read from, the
ETag the index records (when it has one) and the size, so a rewritten object, or the same key
on another store, is never served from a stale copy. DataLoader workers, and
ranks on one machine, share the directory: each download holds the file's lock
(:func:`~es_stream.sources.mds.shard_lock`), so a shard is fetched once per machine; whoever
waited finds the file. A download is written to a temporary name and renamed: a staged file is
whole or absent.

**In the background.** :meth:`ShardCache.request` starts a download in a background thread
(``downloads`` at a time) and returns at once, so a reader asks for the shards of the coming
meta-batches ahead of their use; :meth:`ShardCache.ready` gives the staged path only once it is
complete, :meth:`ShardCache.wait` waits for it.

**Bounded.** After each download the least recently used files beyond ``limit_bytes`` (default
4 GiB, ``$ES_STREAM_CACHE_LIMIT``) are removed, never the one just staged; a reader that has a
removed file open keeps reading it (POSIX unlink semantics), and a later reader stages it again.
Files other than staged shards (names ``es-shard-*``) are never touched. Across epochs a staged
shard is reused while it stays in the cache: the cache for reading the same data many epochs.
A download that fails leaves nothing behind; its shard stays on range reads and the error is
kept for :meth:`ShardCache.error`, so range reads report it as usual if the store is down.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from ..sources.mds import shard_lock
from .fetch import RangeFetcher

#: prefix of every staged file: eviction only ever considers these
STAGED_PREFIX = "es-shard-"
#: meta-batches ahead of the current one whose dense shards are asked to be staged
STAGE_LOOKAHEAD = 8


def _env_number(name: str, default: float, kind: type) -> Any:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} must be a {kind.__name__}; fix "
                         "or unset it") from None


@dataclass(frozen=True)
class CachePolicy:
    """When and where whole shards are staged (see the module doc).

    ``stage_above``: the share of a shard's samples this node reads this epoch from which the
    shard is staged whole (``> 1`` never stages: range reads only). Staging a shard of which a
    share f is read fetches 1/f of the bytes used: the default 0.8 bounds that at 1.25x, and
    below it range reads keep the unread (pruned) samples off the network, at a request per run
    of read samples (on a store that answers few requests at once, a lower value trades bytes
    for time: ``tools/bench_remote.py compare``). ``directory`` and
    ``limit_bytes``: where, and how much disk at most. :meth:`from_env` reads
    ``ES_STREAM_STAGE_ABOVE``, ``ES_STREAM_CACHE`` and ``ES_STREAM_CACHE_LIMIT``.
    """

    stage_above: float = 0.8
    directory: str | None = None
    limit_bytes: int = 4 << 30
    downloads: int = 4

    @classmethod
    def from_env(cls) -> "CachePolicy":
        """The defaults, with the ``ES_STREAM_*`` variables that are set."""
        return cls(stage_above=_env_number("ES_STREAM_STAGE_ABOVE", cls.stage_above, float),
                   directory=os.environ.get("ES_STREAM_CACHE") or None,
                   limit_bytes=_env_number("ES_STREAM_CACHE_LIMIT", cls.limit_bytes, int))

    def __post_init__(self) -> None:
        if not self.stage_above > 0:
            raise ValueError(f"stage_above must be > 0 (above 1 turns staging off), got "
                             f"{self.stage_above}")
        if self.limit_bytes < 0 or self.downloads < 1:
            raise ValueError(f"limit_bytes must be >= 0 and downloads >= 1, got "
                             f"{self.limit_bytes} and {self.downloads}")

    def where(self) -> str:
        """The cache directory (created if missing)."""
        path = self.directory or os.path.join(tempfile.gettempdir(),
                                              f"es-stream-cache-{os.getuid()}")
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot create the cache of staged shards {path} "
                          f"({exc.strerror}); set ES_STREAM_CACHE to a writable local "
                          "directory, or ES_STREAM_STAGE_ABOVE=2 to read by range only") from exc
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(f"the cache of staged shards {path} is not writable; set "
                                  "ES_STREAM_CACHE to a writable local directory, or "
                                  "ES_STREAM_STAGE_ABOVE=2 to read by range only")
        return path


class ShardCache:
    """Stages whole object-store shards in a local directory (see the module doc).

    Made in the process that reads (it owns threads); ``fetcher`` downloads (its retries and
    counters apply). ``staged`` counts the downloads this cache made.
    """

    def __init__(self, fetcher: RangeFetcher, policy: CachePolicy | None = None) -> None:
        self.fetcher = fetcher
        self.policy = policy or CachePolicy.from_env()
        self.directory = self.policy.where()
        self.staged = 0
        self._jobs: dict[str, Future] = {}
        self._started: set[str] = set()
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def path(self, url: str, size: int, version: str | None = None) -> str:
        """Where ``url`` (of ``size`` bytes, ETag ``version`` if known) is staged, whether or
        not it is there yet."""
        key = f"{self.fetcher.where(url)}\0{version or ''}"
        digest = hashlib.blake2b(key.encode(), digest_size=12).hexdigest()
        return os.path.join(self.directory, f"{STAGED_PREFIX}{digest}-{size}")

    def ready(self, url: str, size: int, version: str | None = None) -> str | None:
        """The staged file of ``url`` if it is complete, else None."""
        path = self.path(url, size, version)
        try:
            if os.stat(path).st_size == size:
                return path
        except FileNotFoundError:
            pass
        return None

    def request(self, url: str, size: int, version: str | None = None) -> None:
        """Start staging ``url`` in the background unless it is staged or on its way."""
        with self._lock:
            if url in self._jobs or self.ready(url, size, version):
                return
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.policy.downloads,
                                                thread_name_prefix="es-stream-stage")
            self._jobs[url] = self._pool.submit(self._stage, url, size, version)

    def started(self, url: str) -> bool:
        """Whether the download of ``url`` has begun (or ended): no longer queued behind
        others."""
        return url in self._started

    def error(self, url: str) -> BaseException | None:
        """The error that ended staging ``url``, if it failed."""
        job = self._jobs.get(url)
        if job is None or not job.done() or job.cancelled():
            return None
        return job.exception()

    def wait(self, url: str) -> None:
        """Block until staging ``url`` ends (tests and benchmarks); re-raises its error."""
        job = self._jobs.get(url)
        if job is not None:
            job.result()

    def _stage(self, url: str, size: int, version: str | None) -> str:
        self._started.add(url)
        path = self.path(url, size, version)
        with shard_lock(path):
            if self.ready(url, size, version):  # another worker or rank staged it while we waited
                os.utime(path)
                return path
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".staging-")
            try:
                chunk = self.fetcher.max_request
                requests = [(url, s, min(s + chunk, size)) for s in range(0, size, chunk)]
                for (_, start, _), data in zip(requests, self.fetcher.iter_requests(requests)):
                    os.pwrite(fd, data, start)
                os.close(fd)
                fd = -1
                os.replace(tmp, path)
            except BaseException:
                if fd >= 0:
                    os.close(fd)
                os.unlink(tmp)
                raise
        self.staged += 1
        self._evict(keep=path)
        return path

    def _evict(self, keep: str) -> None:
        """Remove the least recently used staged files beyond the limit, except ``keep``."""
        files = []
        with os.scandir(self.directory) as entries:
            for entry in entries:
                if entry.name.startswith(STAGED_PREFIX) and entry.path != keep:
                    try:
                        st = entry.stat()
                    except FileNotFoundError:
                        continue  # another process removed it
                    files.append((st.st_mtime, st.st_size, entry.path))
        total = sum(f[1] for f in files) + os.stat(keep).st_size
        for _, size, path in sorted(files):
            if total <= self.policy.limit_bytes:
                break
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            total -= size

    def touch(self, path: str) -> None:
        """Mark a staged file used now (eviction removes the least recently used first)."""
        try:
            os.utime(path)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        """Cancel downloads not started; those running end with their fetcher."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = None
        self._jobs.clear()
        self._started.clear()


class StagingPlan:
    """Which object-store shards of a corpus one reader stages whole this epoch, and when.

    ``urls``, ``sizes`` and ``versions``: each shard's URL (None for a local shard), size in
    bytes and ETag as indexed (None where unknown);
    ``shard_of``: ids -> shard indices; ``shard_counts``: samples per shard. After
    :meth:`plan`, a shard is *dense* when this machine reads at least
    ``cache.policy.stage_above`` of its samples; dense shards are asked of the cache
    :data:`STAGE_LOOKAHEAD` meta-batches before their first use (:meth:`advance`), and
    :meth:`path` gives a dense shard's staged file, waiting for a download that has begun.
    """

    def __init__(self, cache: ShardCache, urls: Sequence[str | None], sizes: Sequence[int],
                 versions: Sequence[str | None], shard_of: Callable[[np.ndarray], np.ndarray],
                 shard_counts: Any) -> None:
        self.cache, self.urls, self.sizes = cache, list(urls), list(sizes)
        self.versions = list(versions)
        self.shard_of = shard_of
        self.counts = np.asarray(shard_counts, dtype=np.float64)
        self.remote = np.array([u is not None for u in self.urls], dtype=bool)
        self.dense = np.zeros(len(self.urls), dtype=bool)
        self._first_use = self._first_shard = np.empty(0, dtype=np.int64)
        self._requested = 0
        self._staged: dict[int, str] = {}
        self._batches: list[np.ndarray] = []  # this reader's meta-batches, in order
        self._next = 0  # the one it reads next

    def plan(self, batches: Sequence[np.ndarray], node_ids: Callable[[], np.ndarray]) -> None:
        """Decide the dense shards from ``node_ids()`` (what this machine reads this epoch) and
        ask for those the first meta-batches of ``batches`` (this reader's, in order) need."""
        self._batches, self._next = list(batches), 0
        batches = self._batches
        self.dense[:] = False
        self._first_use = self._first_shard = np.empty(0, dtype=np.int64)
        self._requested = 0
        if self.cache.policy.stage_above > 1 or not len(batches) or not self.remote.any():
            return
        node = np.bincount(self.shard_of(node_ids()), minlength=len(self.counts))
        self.dense = self.remote & (node >= self.cache.policy.stage_above
                                    * np.maximum(self.counts, 1))
        if not self.dense.any():
            return
        ends = np.cumsum([len(b) for b in batches])
        seen, first = np.unique(self.shard_of(np.concatenate(batches)), return_index=True)
        keep = self.dense[seen]
        batch_of = np.searchsorted(ends, first[keep], side="right")
        order = np.argsort(batch_of, kind="stable")
        self._first_use, self._first_shard = batch_of[order], seen[keep][order]
        self.advance(0)

    def reached(self, ids: np.ndarray) -> np.ndarray | None:
        """The reader is reading meta-batch ``ids``: if it is the planned next one, ask for the
        dense shards needed up to lookahead and return the meta-batch after it (for the reader
        to fetch ahead); None after the last, or for a meta-batch outside the plan."""
        if self._next >= len(self._batches) or not np.array_equal(self._batches[self._next], ids):
            return None
        self.advance(self._next)
        self._next += 1
        return self._batches[self._next] if self._next < len(self._batches) else None

    def advance(self, batch: int) -> None:
        """Meta-batch ``batch`` is next: ask for the dense shards needed up to lookahead."""
        stop = int(np.searchsorted(self._first_use, batch + STAGE_LOOKAHEAD, side="right"))
        for shard in self._first_shard[self._requested:stop].tolist():
            self.cache.request(self.urls[shard], self.sizes[shard], self.versions[shard])
        self._requested = max(self._requested, stop)

    def path(self, shard: int, wait: bool = True) -> str | None:
        """The staged file of a dense shard, waiting (``wait``) for its download once it has
        begun; None for a shard read by range: not dense, still queued behind other downloads
        (read by range meanwhile, so the first meta-batch does not wait for every shard), or
        whose download failed (range reads then report the error as usual)."""
        path = self._staged.get(shard)
        if path is None and self.dense[shard]:
            url, size, version = self.urls[shard], self.sizes[shard], self.versions[shard]
            path = self.cache.ready(url, size, version)
            if path is None and wait:
                self.cache.request(url, size, version)
                if not self.cache.started(url):
                    return None
                try:
                    self.cache.wait(url)
                except Exception:  # noqa: BLE001 - kept by the cache; range reads report it
                    self.dense[shard] = False
                    return None
                path = self.cache.ready(url, size, version)
            if path is not None:
                self._staged[shard] = path
                self.cache.touch(path)
        return path

    def close(self) -> None:
        self._staged.clear()
        self._batches, self._next = [], 0
        self.cache.close()


class StagedReads:
    """What a remote reader with a :class:`StagingPlan` (its ``staging``) offers the dataset:
    the :meth:`will_read` hook of :class:`~es_stream.sources.ShardReader`, and its cache."""

    staging: StagingPlan

    def will_read(self, batches: Sequence[np.ndarray], node_ids: Callable[[], np.ndarray]) -> None:
        """The meta-batches this reader will be asked for, in order, and a function giving the
        ids this machine (the ranks of this node) reads this epoch: shards of which it reads at
        least ``cache.policy.stage_above`` are staged whole as they come up, the others read by
        range."""
        self.staging.plan(batches, node_ids)

    @property
    def cache(self) -> ShardCache:
        """The local cache shards read whole are staged in."""
        return self.staging.cache
