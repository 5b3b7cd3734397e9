"""Whole objects in an object store: get, put and head, retried like ranged reads.

What reads and writes files beside the shards goes through here: an MDS dataset's
``index.json``, the corpus index saved into the bucket (``Corpus.save("s3://...")``), a
compressed MDS shard fetched whole, and the identity (size and ETag) of each remote shard that
an index records where there is no mtime.

Retries follow the :class:`~es_stream.remote.fetch.RetryPolicy` given (transient errors retried
with exponential backoff and full jitter until ``attempts`` or ``total_timeout``, permanent ones
at once); the error after them is a :class:`~es_stream.errors.ShardError` naming the URL.
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence, TypeVar

from ..errors import ShardError
from .fetch import RetryPolicy, retried
from .store import open_store

T = TypeVar("T")


def _retried(url: str, what: str, call: Callable[[Any, str], T], storage_options: dict | None,
             retry: RetryPolicy | None) -> T:
    """``call(store, path)`` for ``url``, retried by :func:`~es_stream.remote.fetch.retried`;
    a missing object is a ``FileNotFoundError`` naming it."""
    r = retry or RetryPolicy.from_env()

    def once() -> T:
        store, path = open_store(url, storage_options, request_timeout=r.request_timeout,
                                 connect_timeout=r.connect_timeout)
        return call(store, path)

    try:
        return retried(url, what, once, r)
    except ShardError as exc:
        cause = exc.__cause__
        if isinstance(cause, FileNotFoundError) or "NotFound" in type(cause).__name__:
            raise FileNotFoundError(f"{url}: no such object ({what}); check the URL") from cause
        raise


def get_object(url: str, storage_options: dict | None = None,
               retry: RetryPolicy | None = None) -> bytes:
    """The whole object at ``url``; ``FileNotFoundError`` naming it when there is none."""
    import obstore

    return _retried(url, "read it", lambda store, path: bytes(obstore.get(store, path).bytes()),
                    storage_options, retry)


def put_object(url: str, data: bytes, storage_options: dict | None = None,
               retry: RetryPolicy | None = None) -> None:
    """Write ``data`` as the object at ``url``. An object store's PUT is atomic: a reader sees
    the old object or the new one whole, never part of it (what ``es_stream.atomic`` does for
    a local file)."""
    import obstore

    _retried(url, "write it", lambda store, path: obstore.put(store, path, data),
             storage_options, retry)


def head_object(url: str, storage_options: dict | None = None,
                retry: RetryPolicy | None = None) -> tuple[int, str | None]:
    """``(size, ETag)`` of the object at ``url`` (the ETag None when the server sends none)."""
    import obstore

    meta = _retried(url, "read its size and ETag",
                    lambda store, path: dict(obstore.head(store, path)), storage_options, retry)
    return int(meta["size"]), meta.get("e_tag")


def head_objects(urls: Sequence[str], storage_options: dict | None = None,
                 retry: RetryPolicy | None = None, threads: int = 16
                 ) -> list[tuple[int, str | None]]:
    """:func:`head_object` of each URL, in order, ``threads`` requests in flight (an index of
    thousands of shards is checked in a few round trips' time, not thousands)."""
    if not urls:
        return []
    with ThreadPoolExecutor(min(threads, len(urls)), thread_name_prefix="es-stream-head") as pool:
        return list(pool.map(lambda u: head_object(u, storage_options, retry), urls))


class ObjectStream(io.RawIOBase):
    """The bytes of the object at ``url``, read forward once in chunks, never all held: how a
    tar shard in a bucket is scanned to index it (one GET, streamed). Opening is retried like
    every request; a stream that breaks midway is a :class:`ShardError` naming the URL (scan
    again: the index is written only once every shard was scanned)."""

    def __init__(self, url: str, storage_options: dict | None = None,
                 retry: RetryPolicy | None = None, chunk: int = 8 << 20) -> None:
        import obstore

        super().__init__()
        self.url = url
        result = _retried(url, "read it", lambda store, path: obstore.get(store, path),
                          storage_options, retry)
        self._chunks = iter(result.stream(min_chunk_size=chunk))
        self._chunk = memoryview(b"")
        self._done = False

    def readable(self) -> bool:
        return True

    def _next_chunk(self) -> bool:
        if self._done:
            return False
        try:
            self._chunk = memoryview(bytes(next(self._chunks)))
        except StopIteration:
            self._done = True
            return False
        except Exception as exc:  # the body broke off: obstore raises its own kinds
            raise ShardError(self.url, f"the download broke off ({exc}); index it again") from exc
        return True

    def read(self, size: int = -1) -> bytes:
        parts = []
        want = size if size is not None and size >= 0 else None
        while want is None or want > 0:
            if not len(self._chunk) and not self._next_chunk():
                break
            take = len(self._chunk) if want is None else min(want, len(self._chunk))
            parts.append(bytes(self._chunk[:take]))
            self._chunk = self._chunk[take:]
            if want is not None:
                want -= take
        return b"".join(parts)
