"""A corpus index beside the data: saved into and loaded from the bucket, and what it records of
remote shards so that a changed object is found where there is no mtime.

* :func:`write_index_table` / :func:`read_index_table_at` put and get the Parquet index at an
  ``s3://``, ``gs://`` (or, for reading, ``https://``) URL, so ranks, DataLoader workers and
  later jobs load the index and never re-scan the shards.
* :func:`shard_identities` (at indexing) and :func:`check_identities` (at load) compare each
  remote shard's size and ETag with the index: an object rewritten since is a
  :class:`~es_stream.errors.StaleIndexError` naming its URL.
* :func:`storable_options` is what of ``storage_options`` an index may hold: never credentials.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import asdict, fields
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import ShardError, StaleIndexError
from .fetch import RetryPolicy
from .objects import get_object, head_object, head_objects, put_object

# storage_options an index may record: where the store is and how to talk to it, never who is
# asking. Anything else (keys, secrets, tokens, session tokens, service-account files, headers
# that may carry an Authorization, a proxy URL that may carry a password) stays with the caller.
_STORABLE = {"endpoint", "endpoint_url", "aws_endpoint_url", "aws_endpoint", "region",
             "allow_http", "skip_signature", "virtual_hosted_style_request", "unsigned_payload",
             "s3_express", "checksum_algorithm", "request_payer", "conditional_put",
             "timeout", "connect_timeout", "http1_only", "http2_only", "user_agent",
             "allow_invalid_certificates", "pool_idle_timeout", "pool_max_idle_per_host"}


def storable_options(options: dict[str, Any] | None) -> dict[str, Any]:
    """The entries of ``options`` an index file may hold: the settings named in ``_STORABLE``
    with plain values (str, int, float, bool), an endpoint only without user or password in it.
    Credentials are never written into an index; readers take them from the environment or
    from ``storage_options`` passed to :meth:`es_stream.Corpus.load`."""
    out = {}
    for key, value in (options or {}).items():
        if key.lower() not in _STORABLE or not isinstance(value, (str, int, float, bool)):
            continue
        if isinstance(value, str) and "@" in value.split("://", 1)[-1].split("/", 1)[0]:
            continue  # https://user:password@host: a credential in the URL
        out[key] = value
    return out


def with_env_endpoint(url: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with the S3 endpoint the environment names for ``url`` (``AWS_ENDPOINT_URL_S3``
    or ``AWS_ENDPOINT_URL``) when they name none: what the corpus was indexed against."""
    from .store import _endpoint, split_url

    scheme = split_url(url)[0].split("://", 1)[0]
    if scheme != "s3" or any(k in options for k in ("endpoint", "endpoint_url",
                                                      "aws_endpoint_url", "aws_endpoint")):
        return options
    endpoint = _endpoint(scheme, options)
    return {**options, "endpoint": endpoint} if endpoint else options


def retry_numbers(retry: RetryPolicy | None) -> dict[str, float] | None:
    """A retry policy as the plain numbers an index records (None: the environment's)."""
    return None if retry is None else asdict(retry)


def retry_from_numbers(numbers: Any) -> RetryPolicy | None:
    """The :class:`RetryPolicy` of :func:`retry_numbers`; ``ValueError`` for anything else."""
    if numbers is None:
        return None
    names = {f.name for f in fields(RetryPolicy)}
    if not isinstance(numbers, dict) or not set(numbers) <= names or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers.values()):
        raise ValueError(f"'retry' must map some of {sorted(names)} to numbers, got "
                         f"{numbers!r:.120}")
    return RetryPolicy(**numbers)


def write_index_table(url: str, table: pa.Table, storage_options: dict | None = None,
                      retry: RetryPolicy | None = None) -> None:
    """Write the index ``table`` as Parquet to the object ``url`` (one PUT: atomic)."""
    buf = io.BytesIO()
    pq.write_table(table, buf)
    put_object(url, buf.getvalue(), storage_options, retry)


def read_index_table_at(url: str, storage_options: dict | None = None,
                        retry: RetryPolicy | None = None) -> pa.Table:
    """The Parquet table of the object ``url``. ``FileNotFoundError`` when there is none;
    ``pyarrow``'s error when it is not Parquet (the caller names the file)."""
    return pq.read_table(pa.BufferReader(get_object(url, storage_options, retry)))


def shard_identities(urls: Sequence[str], sizes: Sequence[int], storage_options: dict | None,
                     retry: RetryPolicy | None) -> list[str | None]:
    """Each object's ETag (None when the store sends none), by one HEAD each, after checking
    that its size is the ``sizes`` entry the index has for it: a :class:`StaleIndexError`
    naming the first object that differs (the bucket's copy is not the one indexed)."""
    found = head_objects(list(urls), storage_options, retry)
    for url, size, (now, _) in zip(urls, sizes, found):
        if size >= 0 and now != size:
            raise StaleIndexError(f"{url}: {now} bytes in the store, the index says {size}: not "
                                  "the object that was indexed; re-index it from the store")
    return [etag for _, etag in found]


def check_identities(urls: Sequence[str], sizes: Sequence[int], etags: Sequence[str | None],
                     storage_options: dict | None, retry: RetryPolicy | None,
                     advice: str) -> None:
    """Raise :class:`StaleIndexError` naming the first object whose size, or ETag where the
    index records one, is not what the index says (one HEAD per object, several in flight)."""
    found = head_objects(list(urls), storage_options, retry)
    for url, size, etag, (now_size, now_etag) in zip(urls, sizes, etags, found):
        what = None
        if size >= 0 and now_size != size:
            what = f"size {size} -> {now_size}"
        elif etag is not None and now_etag != etag:
            what = f"ETag {etag} -> {now_etag}"
        if what is not None:
            raise StaleIndexError(f"{url}: object changed since it was indexed ({what}); its "
                                  f"samples are not the ones the index lists; {advice}")


def default_cache_dir(remote: str, split: str | None) -> str:
    """Where a remote MDS corpus given without ``local`` keeps what must be local (compressed
    shards, decompressed): ``$ES_STREAM_CACHE`` or ``~/.cache/es-stream``, then ``mds/`` and a
    hash of the remote and split — the same directory in every worker, rank and later job on
    this machine, so they share it (under a per-shard lock) instead of fetching again."""
    root = os.environ.get("ES_STREAM_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "es-stream")
    key = hashlib.blake2s(f"{remote.rstrip('/')}\0{split or ''}".encode(), digest_size=8)
    return os.path.join(root, "mds", key.hexdigest())


def remote_join(remote: str, split: str | None, name: str) -> str:
    """The URL of file ``name`` of an MDS dataset at ``remote`` (in ``split``, if any)."""
    parts = [p.strip("/") for p in (split or "", name) if p.strip("/")]
    return "/".join([remote.rstrip("/")] + parts)


def mds_object(remote: str, split: str | None, entry: dict[str, Any]) -> tuple[str, int]:
    """``(URL, size)`` of the object that holds the MDS shard ``entry`` (of ``index.json``) in
    ``remote``: its raw file, or its compressed file when it has one (``MDSWriter`` uploads
    only that)."""
    info = entry["zip_data"] or entry["raw_data"]
    return remote_join(remote, split, info["basename"]), int(info["bytes"])


def holds_mds(location: str, storage_options: dict | None = None) -> bool:
    """Whether ``location`` holds an MDS dataset (an ``index.json``): a local directory, or an
    object-store prefix read by range (one HEAD); what ``es-stream index`` tells MDS from tar
    shards by."""
    from .store import reads_by_range

    if not reads_by_range(location):
        return os.path.exists(os.path.join(location, "index.json"))
    if location.endswith(".tar") or "{" in location:
        return False
    try:
        head_object(remote_join(location, None, "index.json"), storage_options)
    except (FileNotFoundError, ShardError):
        return False
    return True


def fetch_mds_index(remote: str, split: str | None, local: str,
                    storage_options: dict | None, retry: RetryPolicy | None) -> dict[str, Any]:
    """The parsed and checked ``index.json`` of the MDS dataset at ``remote``, read from the
    store (not from a copy cached in ``local``, which may be older); a
    :class:`~es_stream.errors.ShardError` naming its URL when it is unreadable or invalid."""
    from ..mds_index import check_streaming_reads, parse_mds_index

    url = remote_join(remote, split, "index.json")
    try:
        raw = get_object(url, storage_options, retry)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{url}: no index.json there: not an MDS dataset written by "
                                "streaming.MDSWriter — check the remote URL and split") from exc
    index = parse_mds_index(raw, url)
    check_streaming_reads(index, local, split, url)
    return index
