"""The index of a MosaicML MDS dataset: ``index.json`` parsed and checked, fetched from a remote
by streaming's own ``Stream`` when needed. Nothing here reads a shard (that is
:mod:`es_stream.sources.mds`): the corpus index and the readers both build on this module.

The structural checks are pure Python; what only streaming knows (encodings, the keys its
``MDSReader`` takes) is checked with streaming, imported on first use.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

from .errors import MissingExtraError, ShardError

_REWRITE = "re-create the dataset with streaming.MDSWriter (or re-fetch it from its remote)"


def import_streaming():
    """streaming's ``(Stream, World, reader_from_json)``; :class:`MissingExtraError` naming the
    ``mds`` extra when mosaicml-streaming is not installed."""
    try:
        import streaming  # noqa: F401
        from streaming.base.format import reader_from_json
        from streaming.base.stream import Stream
        from streaming.base.world import World
    except ImportError as exc:
        raise MissingExtraError("Reading MDS shards", "mds", "mosaicml-streaming") from exc
    return Stream, World, reader_from_json


def make_stream(local: str, remote: str | None, split: str | None):
    """A streaming ``Stream`` with the defaults ``StreamingDataset`` would apply."""
    Stream, _, _ = import_streaming()
    stream = Stream(remote=remote, local=local, split=split)
    stream.apply_default({"split": split, "download_retry": 2, "download_timeout": 60,
                          "validate_hash": None, "keep_zip": False})
    return stream


class MDSIndexProblem(ValueError):
    """What is wrong with a parsed MDS index, without the file name: the caller knows whether
    it came from ``index.json`` or from a saved es-stream corpus index, and what to advise."""


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_plain_name(value: Any) -> bool:
    # a shard's file name is joined to the local directory: it must not name another place
    seps = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    return (isinstance(value, str) and value not in ("", ".", "..") and "\0" not in value
            and not any(sep in value for sep in seps))


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _is_opt_str(value: Any) -> bool:
    return value is None or isinstance(value, str)


def _is_size_limit(value: Any) -> bool:
    return value is None or isinstance(value, str) or _is_count(value)


def _is_sizes(value: Any) -> bool:
    return isinstance(value, list) and all(v is None or _is_count(v) for v in value)


# key -> (check, what the value must be); every key streaming's MDSReader.from_json needs
_FILE_KEYS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "basename": (_is_plain_name, "a plain file name (no directory part, not '..')"),
    "bytes": (_is_count, "a non-negative integer"),
    "hashes": (lambda v: isinstance(v, dict), "an object (algorithm -> hash)"),
}
_SHARD_KEYS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "version": (lambda v: v == 2 and not isinstance(v, bool), "2 (the MDS index version)"),
    "format": (lambda v: v == "mds", "'mds' (es-stream reads MDS shards only)"),
    "samples": (_is_count, "a non-negative integer"),
    "raw_data": (lambda v: isinstance(v, dict), "an object with 'basename', 'bytes', 'hashes'"),
    "zip_data": (lambda v: v is None or isinstance(v, dict),
                 "null or an object with 'basename', 'bytes', 'hashes'"),
    "compression": (_is_opt_str, "null or a compression name such as 'zstd'"),
    "column_names": (_is_str_list, "a list of column names"),
    "column_encodings": (_is_str_list, "a list of MDS encodings"),
    "column_sizes": (_is_sizes, "a list of sizes (integers or null)"),
    "hashes": (_is_str_list, "a list of hash algorithm names"),
    "size_limit": (_is_size_limit, "null, a byte count or a size string"),
}


def _check_keys(entry: Any, keys: dict[str, tuple[Callable[[Any], bool], str]],
                where: str) -> None:
    if not isinstance(entry, dict):
        raise MDSIndexProblem(f"{where} must be an object, got {type(entry).__name__}")
    for key, (ok, wanted) in keys.items():
        if key not in entry:
            raise MDSIndexProblem(f"{where} has no key {key!r} (it must be {wanted})")
        if not ok(entry[key]):
            raise MDSIndexProblem(f"{where}: key {key!r} must be {wanted}, got {entry[key]!r:.80}")


def _check_shard_entry(i: int, entry: Any) -> None:
    where = f"shard entry {i}"
    _check_keys(entry, _SHARD_KEYS, where)
    _check_keys(entry["raw_data"], _FILE_KEYS, f"{where} raw_data")
    if entry["zip_data"] is not None:
        _check_keys(entry["zip_data"], _FILE_KEYS, f"{where} zip_data")
        if entry["compression"] is None:
            raise MDSIndexProblem(f"{where}: has zip_data but key 'compression' is null, so the "
                                  "shard cannot be decompressed")
    names, encodings = entry["column_names"], entry["column_encodings"]
    if len(names) != len(encodings) or len(entry["column_sizes"]) != len(names):
        raise MDSIndexProblem(f"{where}: keys 'column_names', 'column_encodings' and "
                              f"'column_sizes' must have equal lengths, got {len(names)}, "
                              f"{len(encodings)} and {len(entry['column_sizes'])}")


def check_mds_index(index: Any) -> None:
    """Check the structure of a parsed MDS ``index.json``; raise :class:`MDSIndexProblem`
    naming the shard entry and key at fault.

    It must be an object with ``"version": 2`` and a ``"shards"`` list, and every shard entry
    must hold what ``streaming.MDSWriter`` writes and ``MDSReader`` reads, with sane values:
    non-negative counts, shard file names without a directory part (a name like
    ``../x.mds`` would read, or decompress onto, a file outside the dataset directory), one
    encoding and size per column, each shard file named once. Pure Python: no streaming needed.
    """
    if not isinstance(index, dict):
        raise MDSIndexProblem(f"the index must be a JSON object with 'version' and 'shards', "
                              f"got a JSON {type(index).__name__}")
    if index.get("version") != 2 or isinstance(index.get("version"), bool):
        raise MDSIndexProblem(f"key 'version' must be 2 (es-stream reads MDS version 2 "
                              f"datasets), got {index.get('version')!r}")
    if not isinstance(index.get("shards"), list):
        raise MDSIndexProblem(f"key 'shards' must be a list of shard entries, got "
                              f"{index.get('shards')!r:.80}")
    seen: dict[str, int] = {}
    for i, entry in enumerate(index["shards"]):
        _check_shard_entry(i, entry)
        files = [entry["raw_data"]["basename"]]
        if entry["zip_data"] is not None:
            files.append(entry["zip_data"]["basename"])
        for name in files:
            if name in seen:
                raise MDSIndexProblem(f"shard entry {i} names file {name!r}, as shard entry "
                                      f"{seen[name]} does: each shard needs its own files")
            seen[name] = i


def _check_streaming_reads(index: dict[str, Any], local: str, split: str | None) -> None:
    """What only streaming knows: every column encoding exists, and ``MDSReader`` accepts each
    entry (no key it does not take). Done once here so no DataLoader worker fails on it later."""
    _, _, reader_from_json = import_streaming()
    from streaming.base.format.mds.encodings import is_mds_encoding

    for i, entry in enumerate(index["shards"]):
        for name, encoding in zip(entry["column_names"], entry["column_encodings"]):
            if not is_mds_encoding(encoding):
                raise MDSIndexProblem(f"shard entry {i}: column {name!r} has encoding "
                                      f"{encoding!r}, which streaming does not know")
        try:
            reader_from_json(local, split, entry)
        except Exception as exc:  # TypeError on an unknown key, ValueError, ...
            raise MDSIndexProblem(f"shard entry {i}: streaming's MDSReader refuses it "
                                  f"({type(exc).__name__}: {exc})") from exc


def read_mds_index_file(filename: str) -> dict[str, Any]:
    """Parse and check one local ``index.json``; a :class:`ShardError` naming it otherwise."""
    try:
        with open(filename, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise
    except OSError as exc:  # a directory, unreadable
        raise ShardError(filename, f"cannot read index.json ({exc}); {_REWRITE}") from exc
    return parse_mds_index(raw, filename)


def parse_mds_index(raw: bytes, where: str) -> dict[str, Any]:
    """Parse and check the bytes of an ``index.json`` (a local file, or an object fetched from
    a remote); a :class:`ShardError` naming ``where`` otherwise."""
    try:
        index = json.loads(raw)
    except ValueError as exc:  # not UTF-8, not JSON
        raise ShardError(where, f"cannot read index.json ({exc}); {_REWRITE}") from exc
    try:
        check_mds_index(index)
    except MDSIndexProblem as exc:
        raise ShardError(where, f"invalid index.json: {exc}; {_REWRITE}") from exc
    return index


def check_streaming_reads(index: dict[str, Any], local: str, split: str | None,
                          where: str) -> None:
    """What only streaming knows about ``index`` (see ``_check_streaming_reads``); a
    :class:`ShardError` naming ``where`` when streaming would refuse it."""
    try:
        _check_streaming_reads(index, local, split)
    except MDSIndexProblem as exc:
        raise ShardError(where, f"invalid index.json: {exc}; {_REWRITE}") from exc


def load_mds_index(local: str, remote: str | None, split: str | None) -> dict[str, Any]:
    """Return the parsed and checked ``index.json`` of an MDS dataset, fetching it from
    ``remote`` first when given (the way ``StreamingDataset`` does).

    A malformed index raises :class:`ShardError` naming ``index.json``, the shard entry and the
    key, before any shard is read.
    """
    _, World, _ = import_streaming()
    filename = os.path.join(local, split or "", "index.json")
    if remote is not None and not os.path.exists(filename):
        try:
            make_stream(local, remote, split).get_shards(World.detect(), False)
        except Exception as exc:
            raise ShardError(os.path.join(remote, split or "", "index.json"),
                             f"cannot fetch index.json ({exc})") from exc
    if not os.path.exists(filename):
        where = f" (remote {remote!r})" if remote else ""
        raise ShardError(filename, f"no index.json{where}: not an MDS dataset written by "
                         "streaming.MDSWriter — check local_dir/remote")
    index = read_mds_index_file(filename)
    check_streaming_reads(index, local, split, filename)
    return index


def mds_identity(entry: dict[str, Any]) -> tuple[Any, ...]:
    """What makes an MDS shard the same shard: its file, sample count, size and the hashes
    ``MDSWriter`` recorded, if any (the raw file may not be fetched yet, so what ``index.json``
    says stands in for the file on disk)."""
    raw = entry["raw_data"]
    return raw["basename"], entry["samples"], raw["bytes"], json.dumps(raw["hashes"],
                                                                      sort_keys=True)


#: MDS encodings whose decoding runs code (streaming's own list of unsafe encodings)
UNSAFE_ENCODINGS = frozenset({"pkl"})


def check_safe_columns(index: dict[str, Any], where: str, allow_unsafe_types: bool,
                       opt_in: str) -> None:
    """Refuse an MDS index with a column whose decoding unpickles (``pkl``), unless
    ``allow_unsafe_types``: a ``ValueError`` naming ``where``, the column and ``opt_in``, the
    argument that allows it. streaming's ``StreamingDataset`` refuses them the same way."""
    if allow_unsafe_types:
        return
    for i, entry in enumerate(index["shards"]):
        for name, encoding in zip(entry["column_names"], entry["column_encodings"]):
            if encoding in UNSAFE_ENCODINGS:
                raise ValueError(f"{where}: column {name!r} (shard entry {i}) is {encoding!r}, "
                                 "decoded by unpickling, which runs code its writer chose; pass "
                                 f"{opt_in} only for data you trust")
