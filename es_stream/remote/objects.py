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

import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence, TypeVar

from ..errors import ShardError
from .fetch import RetryPolicy, _brief, _permanent
from .store import ForkedClientError, open_store

T = TypeVar("T")
_rng = random.Random()


def _retried(url: str, what: str, call: Callable[[Any, str], T], storage_options: dict | None,
             retry: RetryPolicy | None) -> T:
    """``call(store, path)`` for ``url``, retried per ``retry``; a ShardError saying ``what``
    could not be done otherwise."""
    r = retry or RetryPolicy.from_env()
    deadline = time.monotonic() + r.total_timeout
    attempt = 0
    while True:
        attempt += 1
        try:
            store, path = open_store(url, storage_options, request_timeout=r.request_timeout,
                                     connect_timeout=r.connect_timeout)
            return call(store, path)
        except Exception as exc:
            permanent = isinstance(exc, (ValueError, ForkedClientError)) or _permanent(exc)
            pause = _rng.uniform(0, min(r.max_backoff, r.backoff * 2 ** (attempt - 1)))
            if permanent or attempt >= r.attempts or time.monotonic() + pause >= deadline:
                if isinstance(exc, FileNotFoundError) or "NotFound" in type(exc).__name__:
                    raise FileNotFoundError(f"{url}: no such object ({what}); check the URL"
                                            ) from exc
                raise ShardError(url, f"cannot {what} after {attempt} attempt(s): {_brief(exc)}; "
                                 "check the URL, the endpoint and credentials") from exc
            time.sleep(pause)


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
