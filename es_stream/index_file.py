"""The saved corpus index file: Parquet, one row per sample, with es-stream's metadata under
:data:`META_KEY` (format, shards, paths rule, and for MDS the ``index.json`` it was built from).
This module reads the file and checks its metadata; :class:`es_stream.Corpus` builds on it."""

from __future__ import annotations

import json
import os
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import IndexFileError
from .mds_index import MDSIndexProblem, check_mds_index
from .shard_identity import is_check
from .shard_paths import RELATIVE_TO_INDEX

META_KEY = b"es_stream.corpus"


def index_error(path: str, problem: str) -> IndexFileError:
    """The error for an index file that cannot be used: names it and says how to re-create it."""
    return IndexFileError(f"{path}: {problem}; this is not a usable es-stream corpus index — "
                          f"re-create it with `es-stream index SHARDS -o {path}`")


def read_index_table(path: str) -> pa.Table:
    """The Parquet table of the index file ``path``; :func:`index_error` when it is not one."""
    if os.path.isdir(path):  # pq.read_table would read a directory as a Parquet dataset
        raise index_error(path, "is a directory, not an index file")
    try:
        return pq.read_table(path)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{path}: no corpus index here; create it with "
                                f"`es-stream index SHARDS -o {path}`") from exc
    except (pa.ArrowException, OSError) as exc:  # not Parquet, truncated, unreadable
        raise index_error(path, f"cannot be read as Parquet ({exc})") from exc


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_SHARD_FIELDS = {"name": lambda v: isinstance(v, str) and v != "",
                 "num_samples": lambda v: _is_int(v) and v >= 0,
                 "size": _is_int, "mtime_ns": _is_int}
# written by later versions only; an index without them loads with the ShardInfo default
_OPTIONAL_SHARD_FIELDS = {"dropped": lambda v: v is None or (_is_int(v) and v >= 0),
                          "check": is_check,
                          "etag": lambda v: v is None or isinstance(v, str)}


def is_index_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file :meth:`Corpus.save` (``es-stream index``) wrote: Parquet whose
    schema carries es-stream's metadata. Reads only the file's footer; False for a missing path,
    a directory, or a file that is not Parquet."""
    if not os.path.isfile(path):
        return False
    try:
        metadata = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowException):
        return False
    return META_KEY in metadata


def index_meta(table: pa.Table, path: str) -> dict[str, Any]:
    """The checked ``es_stream.corpus`` metadata of a saved index (see :meth:`Corpus.save`)."""
    raw = (table.schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise index_error(path, f"it has no {META_KEY.decode()} metadata")
    try:
        meta = json.loads(raw)
    except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8
        raise index_error(path, f"its {META_KEY.decode()} metadata is not JSON ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") not in ("wds", "mds"):
        raise index_error(path, f"its {META_KEY.decode()} metadata has no 'format' "
                           "'wds' or 'mds'")
    shards = meta.get("shards")
    if not isinstance(shards, list):
        raise index_error(path, "its metadata has no 'shards' list")
    for i, shard in enumerate(shards):
        if not isinstance(shard, dict) or not set(_SHARD_FIELDS) <= set(shard) <= (
                set(_SHARD_FIELDS) | set(_OPTIONAL_SHARD_FIELDS)):
            raise index_error(path, f"metadata shard {i} must have the keys "
                               f"{sorted(_SHARD_FIELDS)} (and optionally "
                               f"{sorted(_OPTIONAL_SHARD_FIELDS)}), got {shard!r:.120}")
        for key, ok in {**_SHARD_FIELDS, **_OPTIONAL_SHARD_FIELDS}.items():
            if key in shard and not ok(shard[key]):
                raise index_error(path, f"metadata shard {i}: bad {key!r} {shard[key]!r:.80}")
    if meta.get("paths", RELATIVE_TO_INDEX) != RELATIVE_TO_INDEX:
        raise index_error(path, f"its metadata's 'paths' must be {RELATIVE_TO_INDEX!r}, got "
                          f"{meta['paths']!r:.80}")
    if meta["format"] == "mds":
        _check_mds_meta(meta, path)
    _check_remote_meta(meta, path)
    return meta


def _check_remote_meta(meta: dict[str, Any], path: str) -> None:
    """The optional ``remote`` entry: ``storage_options`` (plain values) and ``retry`` (the
    numbers of a RetryPolicy, or null)."""
    remote = meta.get("remote")
    if remote is None:
        return
    from .remote.index import retry_from_numbers

    options = remote.get("storage_options", {}) if isinstance(remote, dict) else None
    if not isinstance(options, dict) or not all(
            isinstance(v, (str, int, float, bool)) for v in options.values()):
        raise index_error(path, "its metadata's 'remote' must hold 'storage_options', an object "
                          f"of plain values, got {remote!r:.120}")
    try:
        retry_from_numbers(remote.get("retry"))
    except (ValueError, TypeError) as exc:
        raise index_error(path, f"its metadata's remote retry policy is invalid: {exc}") from exc


def _check_mds_meta(meta: dict[str, Any], path: str) -> None:
    m = meta.get("mds")
    # local is null for a remote corpus cached where the loading machine's default cache is
    local_ok = isinstance(m, dict) and (isinstance(m.get("local"), str) or (
        m.get("local") is None and isinstance(m.get("remote"), str)))
    if not local_ok or \
            any(not (m.get(k) is None or isinstance(m.get(k), str)) for k in ("remote", "split")):
        raise index_error(path, "its metadata has no 'mds' object with 'local', 'remote', "
                           "'split' and 'index'")
    try:
        check_mds_index(m.get("index"))
    except MDSIndexProblem as exc:
        raise index_error(path, f"the MDS index.json saved in its metadata is invalid: {exc}"
                           ) from exc
    listed = [(s["name"], s["num_samples"]) for s in meta["shards"]]
    indexed = [(e["raw_data"]["basename"], e["samples"]) for e in m["index"]["shards"]]
    if listed != indexed:
        raise index_error(path, "its metadata's shard list and saved MDS index.json disagree")
