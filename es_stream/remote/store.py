"""Object-store URLs -> an ``obstore`` store and a path in it.

**Why obstore.** obstore (Python bindings of the Rust ``object_store`` crate used by Arrow,
Polars and DataFusion) is one small wheel with no Python dependencies that speaks S3, GCS,
Azure and plain HTTP(S), reads the standard environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``-free static keys, ``GOOGLE_APPLICATION_CREDENTIALS``,
...) and releases the GIL for the whole request, so the threads of one DataLoader worker keep
several ranged GETs in flight. fsspec's s3fs was the other candidate; it needs aiobotocore,
which pins botocore to a narrow range that excludes the botocore the lock pins for
mosaicml-streaming (pip resolves ``s3fs`` to the 2020 release 0.4.2 beside it). Measured
against the same servers on 127.0.0.1 (``tools/bench_remote.py clients``, 8 requests in
flight, a 4 MiB object): moto's S3 API, 16 KiB ranges: obstore 386 req/s, boto3 254; 256 KiB
ranges: obstore 87.5 MB/s, boto3 62.3 MB/s. The Range HTTP server, 16 KiB: obstore 3422
req/s, fsspec's aiohttp HTTP filesystem 3141; 256 KiB: obstore 677 MB/s, fsspec 443 MB/s.

obstore's own retries are turned off (``max_retries=0``): :mod:`es_stream.remote.fetch` retries
itself, so it can count the attempts, name them in the error, and apply one total deadline.
"""

from __future__ import annotations

import os
import threading
from datetime import timedelta
from typing import Any
from urllib.parse import unquote, urlparse

from ..errors import MissingExtraError

REMOTE_SCHEMES = ("s3", "s3a", "gs", "gcs", "http", "https")

# keys of storage_options that configure the HTTP client rather than the store
_CLIENT_KEYS = {"allow_http", "allow_invalid_certificates", "connect_timeout", "default_headers",
                "http1_only", "http2_only", "pool_idle_timeout", "pool_max_idle_per_host",
                "proxy_url", "timeout", "user_agent", "read_timeout"}

_stores: dict[tuple, Any] = {}
_used_in: int | None = None  # the process that made obstore's runtime (its first store)
_stores_lock = threading.Lock()
_stores_pid = os.getpid()


def is_remote_url(url: str) -> bool:
    """True for the object-store URLs es-stream reads by byte range (``s3://``, ``gs://``,
    ``http(s)://``)."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    return scheme in REMOTE_SCHEMES


class ForkedClientError(RuntimeError):
    """obstore's runtime was started in a parent process that then forked this one: it does
    not survive a fork (a request would hang), so the child must not use it."""


def obstore_used_here() -> bool:
    """Whether this process has started obstore's runtime: a DataLoader must then start its
    workers by ``forkserver`` or ``spawn``, not ``fork`` (:func:`es_stream.loader` does)."""
    return _used_in == os.getpid()


#: prefixes of the environment variables that configure object stores and es-stream's reads
STORE_ENV_PREFIXES = ("AWS_", "GOOGLE_", "AZURE_", "S3_", "ES_STREAM_")


class StoreEnvironment:
    """The store-related environment variables of the process that made a DataLoader, applied
    in each of its workers (their ``worker_init_fn``).

    A ``forkserver`` worker is forked from a server started at the first such DataLoader, so it
    sees the environment of *then*: an endpoint or credentials set afterwards (a second job step,
    a test fixture) would silently be ignored. This carries the values of now, removes those
    since unset, and then calls ``then`` (a user's ``worker_init_fn``)."""

    def __init__(self, then: Any = None) -> None:
        self.values = {k: v for k, v in os.environ.items() if k.startswith(STORE_ENV_PREFIXES)}
        self.then = then

    def __call__(self, worker_id: int) -> None:
        for key in [k for k in os.environ if k.startswith(STORE_ENV_PREFIXES)]:
            if key not in self.values:
                del os.environ[key]
        os.environ.update(self.values)
        if self.then is not None:
            self.then(worker_id)


def reads_by_range(url: str) -> bool:
    """True for an object-store URL when obstore is installed: es-stream then reads it by
    byte range. Without obstore such a URL is streamed through webdataset's ``gopen``, as
    before the ``remote`` extra existed."""
    if not is_remote_url(url):
        return False
    global _have_obstore
    if _have_obstore is None:
        import importlib.util

        _have_obstore = importlib.util.find_spec("obstore") is not None
    return _have_obstore


_have_obstore: bool | None = None


def _obstore():
    try:
        import obstore
        import obstore.store
    except ImportError as exc:
        raise MissingExtraError("reading s3://, gs:// and https:// shards", "remote",
                                "obstore") from exc
    return obstore


def split_url(url: str) -> tuple[str, str]:
    """``(store root, path in it)``: ``s3://bucket/a/b.tar`` -> ``("s3://bucket", "a/b.tar")``,
    ``https://host:8080/d/b.tar`` -> ``("https://host:8080", "d/b.tar")`` (percent-escapes
    decoded: obstore encodes the path itself)."""
    parsed = urlparse(url)
    scheme = parsed.scheme.lower()
    if scheme not in REMOTE_SCHEMES or not parsed.netloc:
        raise ValueError(f"{url!r} is not an object-store URL: expected s3://BUCKET/KEY, "
                         "gs://BUCKET/KEY or https://HOST/PATH")
    scheme = {"s3a": "s3", "gcs": "gs"}.get(scheme, scheme)
    return f"{scheme}://{parsed.netloc}", unquote(parsed.path.lstrip("/"))


def _endpoint(scheme: str, options: dict[str, Any]) -> str | None:
    if scheme != "s3":
        return None
    if options.get("endpoint"):
        return str(options["endpoint"])
    return (os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            or os.environ.get("AWS_ENDPOINT"))


def open_store(url: str, storage_options: dict[str, Any] | None = None, *,
               request_timeout: float = 30.0, connect_timeout: float = 5.0) -> tuple[Any, str]:
    """``(store, path)`` for an object-store URL; one store per (root, options) and process.

    Credentials, region and endpoint come from the standard environment, as the cloud's own
    tools read it (``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``, ``AWS_ACCESS_KEY_ID``,
    ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION``; ``GOOGLE_*`` for GCS).
    ``storage_options`` adds or overrides store settings by obstore's names (``endpoint``,
    ``region``, ``access_key_id``, ``skip_signature``, ...); client settings among them
    (``timeout``, ``connect_timeout``, ``allow_http``, ``proxy_url``, ...) go to the HTTP
    client. An ``http://`` endpoint is allowed without ``allow_http`` (a local or private S3
    such as MinIO or moto). Each request is cut after ``request_timeout`` seconds.

    Stores are made again after a fork (a DataLoader worker never uses its parent's client).
    """
    global _stores_pid, _used_in
    obstore = _obstore()
    if _used_in is not None and _used_in != os.getpid():
        raise ForkedClientError(
            f"cannot read {url}: obstore was used in the parent process (pid {_used_in}) before "
            "it forked this one (a DataLoader worker?), and its runtime does not survive a fork "
            "— a request would hang. Iterate through es_stream.loader (it starts workers by "
            "forkserver then), or pass DataLoader(multiprocessing_context='forkserver')")
    root, path = split_url(url)
    scheme = root.split("://", 1)[0]
    options = dict(storage_options or {})
    for alias in ("endpoint_url", "aws_endpoint_url", "aws_endpoint"):  # boto3's / env names
        if alias in options:
            options["endpoint"] = options.pop(alias)
    client = {k: options.pop(k) for k in list(options) if k in _CLIENT_KEYS}
    client.setdefault("timeout", timedelta(seconds=request_timeout))
    client.setdefault("connect_timeout", timedelta(seconds=connect_timeout))
    endpoint = _endpoint(scheme, options)
    if scheme == "http" or (endpoint or "").startswith("http://"):
        client.setdefault("allow_http", True)
    key = (root, repr(sorted(options.items())), repr(sorted(client.items())))
    with _stores_lock:
        if _stores_pid != os.getpid():
            _stores.clear()
            _stores_pid = os.getpid()
        store = _stores.get(key)
        if store is None:
            kwargs: dict[str, Any] = {"client_options": client, "retry_config": {"max_retries": 0}}
            if scheme in ("s3", "gs") and options:
                kwargs["config"] = options
            elif options:
                raise ValueError(f"storage_options {sorted(options)} do not apply to {scheme}:// "
                                 f"URLs; only client settings {sorted(_CLIENT_KEYS)} do")
            if scheme == "s3" and endpoint and "endpoint" not in options:
                kwargs.setdefault("config", {})["endpoint"] = endpoint
            store = obstore.store.from_url(root, **kwargs)
            _stores[key] = store
            _used_in = os.getpid()
    return store, path
