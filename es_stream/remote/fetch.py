"""`RangeFetcher`: exact byte ranges of object-store shards, several requests in flight, retried.

A meta-batch's samples are byte ranges of a few shards. :meth:`RangeFetcher.read_ranges`
coalesces them (:func:`es_stream.remote.ranges.coalesce_ranges`), sends the requests from a
small thread pool (obstore releases the GIL for the whole request) with at most
``max_in_flight`` requests and ``max_buffered`` bytes outstanding, and slices each range out of
its request's bytes, returning exactly the bytes asked for, in the order asked.

**Faults.** A request that fails transiently (HTTP 5xx, throttling such as S3's 503 SlowDown or
429, a timeout, a connection refused or reset, a body cut short) is sent again after an
exponential backoff with full jitter (``uniform(0, min(max_backoff, backoff * 2**n))``, the
AWS-recommended form, so workers that failed together do not retry together), up to
``attempts`` tries and within ``total_timeout`` seconds of its first try. Then, or at once for
a permanent error (404, 403, 401, a 4xx, a response shorter than the range: the object is not
what the index says), :class:`~es_stream.errors.ShardError` names the URL, the byte range, the
attempts and the last error. A retry repeats the same ranged GET and keeps only its own
response, so a retry never duplicates nor shifts bytes.

**No hang.** Each try is cut by the client after ``request_timeout`` seconds (connect after
``connect_timeout``), and the caller waits for a request at most ``total_timeout +
request_timeout`` seconds from its submission, so a dead or silent server becomes a
``ShardError`` within that bound (with the defaults, 60 + 20 = 80 s; set both lower for
interactive use).
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np

from ..errors import ShardError
from .ranges import coalesce_ranges
from .store import ForkedClientError, open_store

# Ranges of one shard at most this many bytes apart share a request. Samples of a shard touch,
# so every hole between two wanted ranges is at least one unwanted (pruned, or another
# worker's) sample: any gap > 0 reads pruned samples. Measured on 127.0.0.1 behind the fault
# proxy (20 ms per request, 50 MB/s per response; tools/bench_remote.py gap), half of 4000
# samples of 4 KiB kept at random, 32 requests in flight: gap 0 -> 1002 requests, 8.2 MB
# (1.00x the kept bytes), 1.74 s; 4 KiB -> 491, 10.3 MB (1.26x), 0.81 s; 16 KiB -> 66, 14.8 MB
# (1.81x), 0.19 s; 64 KiB -> 2 requests, 16.4 MB (2.00x: the whole shard), 0.25 s. A gap of
# even one sample breaks the goal that a 50%-pruned epoch fetch <= 0.55x the bytes of an
# unpruned one, so the default is 0 and the latency is hidden by requests in flight instead
# (8 -> 32 in flight: 3.40 s -> 1.74 s at gap 0). Raise it for unpruned epochs of tiny
# samples scattered over a shard, where bytes are cheaper than round trips.
DEFAULT_GAP = 0
# requests a fetcher keeps in flight (its threads wait on the network, not the GIL)
DEFAULT_IN_FLIGHT = 32


@dataclass(frozen=True)
class RetryPolicy:
    """How hard a request is tried before it is a :class:`ShardError` (see the module doc).

    :meth:`from_env` reads overrides from ``ES_STREAM_RETRY_ATTEMPTS``,
    ``ES_STREAM_TOTAL_TIMEOUT`` and ``ES_STREAM_REQUEST_TIMEOUT`` (seconds), which DataLoader
    workers inherit: what readers made inside workers use.
    """

    attempts: int = 6
    backoff: float = 0.1
    max_backoff: float = 5.0
    total_timeout: float = 60.0
    request_timeout: float = 20.0
    connect_timeout: float = 5.0

    @classmethod
    def from_env(cls) -> "RetryPolicy":
        """The defaults, with the ``ES_STREAM_*`` variables that are set."""
        kwargs: dict[str, Any] = {}
        for var, name, kind in (("ES_STREAM_RETRY_ATTEMPTS", "attempts", int),
                                ("ES_STREAM_TOTAL_TIMEOUT", "total_timeout", float),
                                ("ES_STREAM_REQUEST_TIMEOUT", "request_timeout", float)):
            raw = os.environ.get(var)
            if raw is not None:
                try:
                    kwargs[name] = kind(raw)
                except ValueError:
                    raise ValueError(f"environment variable {var}={raw!r} must be a "
                                     f"{kind.__name__}; fix or unset it") from None
        return cls(**kwargs)

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {self.attempts}")
        for name in ("backoff", "max_backoff", "total_timeout", "request_timeout",
                     "connect_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


class _Permanent(Exception):
    """An error a retry cannot fix."""


def _permanent(exc: BaseException) -> bool:
    """Whether an obstore error is not worth retrying: not found, no permission, a bad path or
    configuration, or an HTTP 4xx other than 408 (timeout) and 429 (throttling)."""
    try:
        from obstore import exceptions as ox
    except ImportError:  # pragma: no cover - open_store already required obstore
        return False
    if isinstance(exc, (FileNotFoundError, PermissionError, ox.NotFoundError, ox.PermissionDeniedError, ox.UnauthenticatedError,
                        ox.InvalidPathError, ox.NotSupportedError, ox.PreconditionError,
                        ox.UnknownConfigurationKeyError)):
        return True
    text = str(exc)
    for code in range(400, 500):
        if code not in (408, 429) and f"status {code}" in text:
            return True
    return False


def _brief(exc: BaseException) -> str:
    """The error in one short line (obstore appends a long debug dump; it is dropped)."""
    text = " ".join(str(exc).split()).split(" Debug source:")[0]
    return f"{type(exc).__name__}: {text[:240]}"


T = TypeVar("T")
_RNG = random.Random(int.from_bytes(os.urandom(8), "little"))


def retried(url: str, what: str, call: Callable[[], T], retry: RetryPolicy, *,
            stop: threading.Event | None = None, rng: random.Random | None = None) -> T:
    """``call()`` (one request about ``url``), tried again per ``retry`` after a transient
    error (see the module doc); after the last try, or at once for a permanent error, a
    :class:`ShardError` naming ``url``, ``what`` could not be done, the attempts, what stopped
    them and the last error. ``stop`` set (the reader is closing) ends the retries. The one
    retry loop of every request es-stream sends to an object store."""
    rng = rng or _RNG
    deadline = time.monotonic() + retry.total_timeout
    errors: list[str] = []
    attempt = 0
    while True:
        attempt += 1
        try:
            return call()
        except Exception as exc:
            errors.append(_brief(exc))
            permanent = (isinstance(exc, (_Permanent, ValueError, ForkedClientError))
                         or _permanent(exc))
            pause = rng.uniform(0, min(retry.max_backoff, retry.backoff * 2 ** (attempt - 1)))
            out_of_time = time.monotonic() + pause >= deadline
            if permanent or attempt >= retry.attempts or out_of_time or (stop and stop.is_set()):
                why = ("a permanent error" if permanent else "the retry deadline "
                       f"({retry.total_timeout:g} s)" if out_of_time else f"{attempt} attempts")
                earlier = (f" (and {len(errors) - 1} earlier: "
                           f"{'; '.join(sorted(set(e.split(':')[0] for e in errors[:-1])))})"
                           if len(errors) > 1 else "")
                raise ShardError(url, f"cannot {what} after {attempt} attempt(s), stopped by "
                                 f"{why}; last error: {errors[-1]}{earlier}; check the URL, the "
                                 "endpoint and credentials, or raise RetryPolicy limits for a "
                                 "flaky store") from exc
            if stop is not None:
                stop.wait(pause)
            else:
                time.sleep(pause)


class RangeFetcher:
    """Reads byte ranges of object-store URLs (``s3://``, ``gs://``, ``http(s)://``).

    Create it in the process that reads (a DataLoader worker): it owns a thread pool, made
    again after a fork. ``requests``, ``attempts`` and ``bytes_fetched`` count what went over
    the network (``bytes_fetched`` includes the gaps read between coalesced ranges).

    Args:
        storage_options: see :func:`es_stream.remote.store.open_store`.
        max_in_flight: requests outstanding at once (per fetcher, so per worker).
        max_buffered: bytes of requests outstanding at once (one larger request still goes
            alone): the memory a fetcher holds beyond what the caller keeps.
        gap: coalescing gap in bytes (:data:`DEFAULT_GAP`; 0 reads only what is asked).
        max_request: bytes window a request stays within (see ``coalesce_ranges``).
        retry: a :class:`RetryPolicy`.
    """

    def __init__(self, storage_options: dict[str, Any] | None = None, *, max_in_flight: int = DEFAULT_IN_FLIGHT,
                 max_buffered: int = 64 << 20, gap: int = DEFAULT_GAP, max_request: int = 8 << 20,
                 retry: RetryPolicy | None = None) -> None:
        if max_in_flight < 1 or max_buffered < 1:
            raise ValueError(f"max_in_flight and max_buffered must be >= 1, got "
                             f"{max_in_flight} and {max_buffered}")
        self.storage_options = dict(storage_options or {})
        self.max_in_flight, self.max_buffered = max_in_flight, max_buffered
        self.gap, self.max_request = gap, max_request
        self.retry = retry or RetryPolicy.from_env()
        self.requests = 0
        self.attempts = 0
        self.bytes_fetched = 0
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = -1
        self._rng = random.Random(int.from_bytes(os.urandom(8), "little"))

    # ---------------------------------------------------------------- one request
    def _store(self, url: str) -> tuple[Any, str]:
        r = self.retry
        return open_store(url, self.storage_options, request_timeout=r.request_timeout,
                          connect_timeout=r.connect_timeout)

    def _get(self, url: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of ``url``, retried per :class:`RetryPolicy`."""
        import obstore

        if end <= start:
            return b""

        def once() -> bytes:
            with self._lock:
                self.attempts += 1
            store, path = self._store(url)
            data = obstore.get_range(store, path, start=start, end=end)
            if len(data) != end - start:
                raise _Permanent(f"the server returned {len(data)} of the {end - start} bytes "
                                 "asked for: the object is shorter than the index says "
                                 "(rewritten since indexing?) — re-index it")
            with self._lock:
                self.requests += 1
                self.bytes_fetched += len(data)
            return bytes(data)

        return retried(url, f"read bytes [{start}, {end})", once, self.retry, stop=self._closed,
                       rng=self._rng)

    # ---------------------------------------------------------------- many requests
    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None or self._pool_pid != os.getpid():
            self._pool = ThreadPoolExecutor(self.max_in_flight, thread_name_prefix="es-stream-fetch")
            self._pool_pid = os.getpid()
            self._closed.clear()
        return self._pool

    def _wait(self, future: Future, url: str, start: int, end: int) -> bytes:
        limit = self.retry.total_timeout + self.retry.request_timeout
        try:
            return future.result(timeout=limit)
        except FutureTimeout:
            raise ShardError(url, f"no answer for bytes [{start}, {end}) within {limit:g} s "
                             "(total_timeout + request_timeout): the server hangs; check it, or "
                             "lower RetryPolicy.request_timeout") from None

    def submit(self, url: str, start: int, end: int) -> Future:
        """Start reading bytes ``[start, end)`` of ``url`` now (retried like every request) and
        return its future, for :meth:`result`: how a reader fetches the next meta-batch's
        ranges while the current one is used. Unlike :meth:`iter_requests` nothing bounds
        how many are outstanding: the caller keeps it to a meta-batch or two."""
        return self._executor().submit(self._get, url, start, end)

    def result(self, future: Future, url: str, start: int, end: int) -> bytes | ShardError:
        """The bytes of a :meth:`submit` future, or the :class:`ShardError` that ended it (a
        request that does not finish within the retry deadline is one too)."""
        return self._wait_or_error(future, url, start, end)

    def iter_requests(self, requests: Iterable[tuple[str, int, int]], *,
                      return_errors: bool = False) -> Iterator[bytes | ShardError]:
        """The bytes of each ``(url, start, end)`` request, in order, with at most
        ``max_in_flight`` requests and ``max_buffered`` bytes outstanding. On the first
        :class:`ShardError` the requests not yet started are cancelled and it is raised; with
        ``return_errors`` each failed request yields its ShardError instead, and the others
        go on (a reader then applies ``on_error`` request by request)."""
        if return_errors:
            yield from self._iter_requests(requests, self._wait_or_error)
        else:
            yield from self._iter_requests(requests, self._wait)

    def _wait_or_error(self, future: Future, url: str, start: int, end: int) -> bytes | ShardError:
        try:
            return self._wait(future, url, start, end)
        except ShardError as exc:
            return exc

    def _iter_requests(self, requests: Iterable[tuple[str, int, int]], wait: Any) -> Iterator[Any]:
        pool = self._executor()
        pending: deque[tuple[Future, str, int, int]] = deque()
        buffered = 0
        try:
            for url, start, end in requests:
                size = max(end - start, 0)
                while pending and (len(pending) >= self.max_in_flight
                                   or buffered + size > self.max_buffered):
                    future, u, s, e = pending.popleft()
                    buffered -= e - s
                    yield wait(future, u, s, e)
                pending.append((pool.submit(self._get, url, start, end), url, start, end))
                buffered += size
            while pending:
                future, u, s, e = pending.popleft()
                yield wait(future, u, s, e)
        finally:
            for future, *_ in pending:
                future.cancel()

    def read_ranges(self, urls: Sequence[str], offsets: Any, sizes: Any) -> list[bytes]:
        """Exactly bytes ``[offsets[i], offsets[i] + sizes[i])`` of ``urls[i]`` for each i, in
        the order given, fetched as coalesced requests. Raises :class:`ShardError` naming the
        URL of the first request that fails (see the module doc)."""
        names = list(dict.fromkeys(urls))
        index = {u: k for k, u in enumerate(names)}
        keys = np.fromiter((index[u] for u in urls), dtype=np.int64, count=len(urls))
        offsets = np.asarray(offsets, dtype=np.int64)
        sizes = np.asarray(sizes, dtype=np.int64)
        plan = coalesce_ranges(keys, offsets, sizes, gap=self.gap, max_request=self.max_request)
        bufs = list(self.iter_requests(
            (names[k], s, e) for k, s, e in zip(plan.keys.tolist(), plan.starts.tolist(),
                                                plan.ends.tolist())))
        return [bufs[r][w:w + n] for r, w, n in zip(plan.request.tolist(), plan.within.tolist(),
                                                     sizes.tolist())]

    def where(self, url: str) -> str:
        """``url`` with the endpoint it is read from: the same ``s3://`` key on two endpoints
        (two S3-compatible stores) is two objects."""
        from .store import _endpoint

        scheme = url.split("://", 1)[0].lower()
        endpoint = _endpoint("s3" if scheme == "s3a" else scheme,
                             {("endpoint" if k in ("endpoint_url", "aws_endpoint_url",
                                               "aws_endpoint") else k): v
                              for k, v in self.storage_options.items()})
        return f"{url} via {endpoint}" if endpoint else url

    def read(self, url: str, offset: int, size: int) -> bytes:
        """Exactly bytes ``[offset, offset + size)`` of ``url`` (one request, retried)."""
        return next(self.iter_requests([(url, offset, offset + size)]))

    def size(self, url: str) -> int:
        """The object's size in bytes (a HEAD request, retried like a read)."""
        import obstore

        future = self._executor().submit(self._head, url, obstore)
        return self._wait(future, url, 0, 0)["size"]

    def _head(self, url: str, obstore: Any) -> dict[str, Any]:
        return retried(url, "read its size", lambda: dict(obstore.head(*self._store(url))),
                       self.retry, stop=self._closed, rng=self._rng)

    def close(self) -> None:
        """Stop retries in progress and shut the thread pool (requests in flight end by their
        timeout)."""
        self._closed.set()
        if self._pool is not None and self._pool_pid == os.getpid():
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = None

    def __enter__(self) -> "RangeFetcher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
