"""`Corpus`: the index of a sharded corpus and the stable global sample ids it defines.

A sample's id is ``shard offset + position in shard`` where shards are taken in the order they
were given (a sorted directory listing, or the brace pattern's expansion). The id of a sample
never changes while its shard does not, whichever worker, rank or restart reads it, so anything
learned about a sample can be keyed by it.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import tarfile
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Sequence
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ._atomic import atomic_write
from ._version import __version__
from .errors import IndexFileError, ShardError, StaleIndexError
from .tarscan import ShardLayout, scan_tar

_META_KEY = b"es_stream.corpus"


@dataclass(frozen=True)
class ShardInfo:
    """One shard: its path or URL, sample count, and the size and mtime it had when indexed
    (-1 when unknown, for streamed URLs).

    ``dropped`` is None for a complete shard. For a truncated tar shard indexed with
    ``allow_truncated=True`` it is the number of samples left out (0 or 1: its last sample,
    which may be incomplete; what the cut removed entirely cannot be counted).
    """

    name: str
    num_samples: int
    size: int
    mtime_ns: int
    dropped: int | None = None


@dataclass
class TarTable:
    """Byte layout of every sample of a WebDataset corpus, as flat arrays indexed by sample id.

    ``member_ptr[i]:member_ptr[i+1]`` are sample i's files; member offsets are relative to the
    sample's offset, so one read of ``lengths[i]`` bytes at ``offsets[i]`` holds all of them.

    Keys and suffixes are the strings webdataset gives (member names decoded by tarfile with
    ``surrogateescape``). When one is not valid UTF-8, ``keys`` is a ``binary`` array of the raw
    name bytes instead of ``string``, as Arrow and Parquet strings must be UTF-8; read a key
    with :meth:`key`, which decodes either.
    """

    keys: pa.Array
    offsets: np.ndarray
    lengths: np.ndarray
    member_ptr: np.ndarray
    member_suffix: np.ndarray
    member_offset: np.ndarray
    member_size: np.ndarray
    suffixes: list[str]

    def key(self, sample_id: int) -> str:
        """Sample ``sample_id``'s key, as webdataset's ``__key__``."""
        return _py_text(self.keys[sample_id].as_py())


@dataclass(frozen=True)
class MDSInfo:
    """Where an MDS corpus lives: streaming's ``local`` cache directory, optional ``remote`` and
    ``split``, and the parsed ``index.json`` the shard readers are built from."""

    local: str
    remote: str | None
    split: str | None
    index: dict[str, Any]


def is_local_url(url: str) -> bool:
    """True for a plain path or a ``file:`` URL, which es-stream reads by seeking."""
    return url.startswith("file:") or (not url.startswith("pipe:") and "://" not in url)


def _local_path(url: str) -> str:
    """The path of a local shard: ``url`` itself, or a ``file:`` URL's path read as
    webdataset's ``gopen`` reads it (``urlparse`` + ``url2pathname``: ``file:///abs/a%20b.tar``
    is ``/abs/a b.tar``, ``file:rel.tar`` is ``rel.tar``). A ``file://HOST/...`` URL naming a
    host other than ``localhost`` is refused: it is not a path on this machine."""
    if not url.startswith("file:"):
        return url
    parsed = urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise ShardError(url, f"a file: URL with host {parsed.netloc!r} is not a local path; "
                         "write file:///absolute/path.tar or file:relative/path.tar")
    return url2pathname(parsed.path)


# Files a directory of shards may hold that es-stream's tar reader cannot index, with advice.
_OTHER_SHARDS = (
    ((".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst", ".tar.zstd",
      ".tar.lz4"),
     "compressed tar shards", "they cannot be read by seeking: decompress them to .tar, or "
     "pass them as streamed URLs such as 'pipe:gzip -dc FILE'"),
    ((".mds", ".mds.zstd", ".mds.zst", ".mds.gz", ".mds.bz2", ".mds.snappy", ".mds.br",
      "index.json"),
     "MosaicML MDS files", "index an MDS directory with Corpus.from_mds(local=DIR)"),
)


def _other_shards(directory: str) -> str:
    """The shard-like files of ``directory`` that are not ``.tar``, described with what to do
    about them ("" when there are none)."""
    names = sorted(os.listdir(directory))
    found = []
    for suffixes, kind, advice in _OTHER_SHARDS:
        hits = [n for n in names if n.lower().endswith(suffixes)]
        if hits:
            found.append(f"{len(hits)} {kind} ({_listed(hits)}): {advice}")
    return "; ".join(found)


def _listed(names: list[str], limit: int = 4) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _expand_directory(directory: str) -> list[str]:
    """The ``.tar`` shards of ``directory``, sorted. Shard-like files it cannot read
    (compressed tar, MDS) are never skipped in silence: with no ``.tar`` beside them they are a
    :class:`ShardError` saying what was found and what to do, beside ``.tar`` shards a
    ``UserWarning`` naming them (the corpus is the ``.tar`` shards alone)."""
    found = sorted(glob.glob(os.path.join(glob.escape(directory), "*.tar")))
    described = _other_shards(directory)
    if not found:
        subdirs = sorted(e.name for e in os.scandir(directory)
                         if e.is_dir() and glob.glob(os.path.join(glob.escape(e.path), "*.tar")))
        hint = (f"; subdirectories {_listed(subdirs)} hold .tar shards: pass one of them" if
                subdirs else "")
        raise ShardError(directory, "directory holds no .tar shards"
                         + (f"; it holds {described}" if described else "") + hint)
    if described:
        warnings.warn(f"{directory}: indexing its {len(found)} .tar shards only; it also holds "
                      f"{described}; these are not part of the corpus", UserWarning, stacklevel=4)
    return found


def expand_urls(urls: str | os.PathLike | Sequence[str]) -> list[str]:
    """A brace pattern, a directory of ``.tar`` files (a path or a ``file:`` URL), or a list
    of paths/URLs -> shard list. A directory's other shard-like files are reported (see
    :func:`_expand_directory`)."""
    if isinstance(urls, (str, os.PathLike)):
        text = os.fspath(urls)
        if is_local_url(text) and os.path.isdir(_local_path(text)):
            return _expand_directory(_local_path(text))
        from braceexpand import braceexpand  # a webdataset dependency

        return list(braceexpand(text))
    return [os.fspath(u) for u in urls]


def _scan_local(url: str, allow_truncated: bool) -> tuple[ShardLayout, int, int]:
    """Scan a local shard by seeking: (layout, size, mtime_ns)."""
    path = _local_path(url)
    try:
        st = os.stat(path)
        with open(path, "rb") as f:
            layout = scan_tar(f, url, seekable=True, allow_truncated=allow_truncated)
    except FileNotFoundError as exc:
        raise ShardError(url, "no such shard file; check the path or pattern") from exc
    except ShardError:
        raise
    except OSError as exc:  # a directory, no permission, an I/O error: name the shard
        raise ShardError(url, f"cannot read the shard ({exc.strerror or exc}); a tar file is "
                         "expected here") from exc
    return layout, st.st_size, st.st_mtime_ns


def _scan_stream(url: str, allow_truncated: bool) -> tuple[ShardLayout, int, int]:
    """Scan a ``pipe:`` or remote shard in one forward pass: (layout, bytes read, -1)."""
    from webdataset import gopen

    try:
        stream = gopen(url, "rb")
    except Exception as exc:  # gopen raises many kinds; name the URL whatever it was
        raise ShardError(url, f"cannot open ({exc})") from exc
    try:
        layout = scan_tar(stream, url, seekable=False, allow_truncated=allow_truncated)
    finally:
        try:
            stream.close()
        except Exception as exc:  # a pipe: command that failed reports it on close
            raise ShardError(url, f"stream failed: {exc}") from exc
    return layout, layout.size, -1


class Corpus:
    """An indexed sharded corpus: shard list, per-sample layout and stable ids.

    Build one with :meth:`from_webdataset` or :meth:`from_mds`, save it with :meth:`save`
    (Parquet, one row per sample) and load it back with :meth:`load`.
    """

    def __init__(self, format: str, shards: Sequence[ShardInfo], *, tar: TarTable | None = None,
                 mds: MDSInfo | None = None) -> None:
        if format not in ("wds", "mds"):
            raise ValueError(f"format must be 'wds' or 'mds', got {format!r}")
        self.format = format
        self.shards: list[ShardInfo] = list(shards)
        counts = np.array([s.num_samples for s in self.shards], dtype=np.int64)
        self.shard_starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.tar = tar
        self.mds = mds
        if self.num_samples == 0:
            names = ", ".join(s.name for s in self.shards[:3]) or "no shards"
            raise ShardError(names, "the corpus has no samples; check the paths or pattern")

    # ----------------------------------------------------------------- ids
    @property
    def num_samples(self) -> int:
        return int(self.shard_starts[-1])

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    @property
    def shard_counts(self) -> np.ndarray:
        return np.diff(self.shard_starts)

    def __len__(self) -> int:
        return self.num_samples

    def __repr__(self) -> str:
        return (f"Corpus(format={self.format!r}, shards={self.num_shards}, "
                f"samples={self.num_samples}, fingerprint={self.fingerprint!r})")

    def check_ids(self, ids: Any, argument: str = "ids") -> np.ndarray:
        """Return ``ids`` as an int64 array, raising if any lies outside [0, num_samples)."""
        arr = np.asarray(ids.cpu() if hasattr(ids, "cpu") else ids)
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"{argument} must be integer sample ids, got dtype {arr.dtype}")
        arr = arr.astype(np.int64, copy=False)
        bad = (arr < 0) | (arr >= self.num_samples)
        if bad.any():
            raise IndexError(f"{argument}: sample id {int(arr[bad][0])} is outside "
                             f"[0, {self.num_samples}) for this corpus ({int(bad.sum())} bad ids)")
        return arr

    def locate(self, ids: Any) -> tuple[np.ndarray, np.ndarray]:
        """Vectorised id -> (shard index, position in shard)."""
        arr = self.check_ids(ids)
        shard = np.searchsorted(self.shard_starts, arr, side="right") - 1
        return shard, arr - self.shard_starts[shard]

    @property
    def fingerprint(self) -> str:
        """Stable hash of the shards' base names, sizes and sample counts: equal for the same
        corpus wherever its directory lives, different as soon as any shard changes."""
        rows = [[os.path.basename(s.name.rstrip("/")), s.size, s.num_samples] for s in self.shards]
        digest = hashlib.sha256(json.dumps([self.format, rows]).encode()).hexdigest()
        return digest[:16]

    # ------------------------------------------------------------ builders
    @classmethod
    def from_webdataset(cls, urls: str | os.PathLike | Sequence[str], *,
                        allow_truncated: bool = False,
                        progress: Callable[[list[str]], Iterable[str]] | None = None) -> "Corpus":
        """Index WebDataset tar shards: a brace pattern, a list of paths/URLs, or a directory.

        Local shards are scanned header by header, seeking past payloads; ``pipe:`` commands and
        other URLs webdataset's ``gopen`` opens are streamed once, reading headers as they pass.

        A shard that is not a tar archive, is corrupt, or is truncated (it lacks tar's
        end-of-archive marker, see :func:`es_stream.tarscan.scan_tar`) raises
        :class:`ShardError` naming it. webdataset itself would read a shard cut on a member
        boundary without a word, its last sample short of files; es-stream refuses it unless
        ``allow_truncated`` is set, which keeps such a shard minus its last (possibly
        incomplete) sample, warns naming the shard and the dropped key, and records the count
        in :attr:`truncated` (saved with the index).

        ``progress``: wraps the list of shard URLs, e.g. ``tqdm.tqdm`` for a progress bar.
        """
        layouts: list[ShardLayout] = []
        shards: list[ShardInfo] = []
        expanded = expand_urls(urls)
        for url in (expanded if progress is None else progress(expanded)):
            scan = _scan_local if is_local_url(url) else _scan_stream
            layout, size, mtime_ns = scan(url, allow_truncated)
            dropped = len(layout.dropped) if layout.truncated else None
            shards.append(ShardInfo(url, len(layout), size, mtime_ns, dropped))
            layouts.append(layout)
        return cls("wds", shards, tar=_tar_table(layouts))

    @property
    def truncated(self) -> dict[str, int]:
        """Shards indexed with ``allow_truncated=True`` that were truncated: name -> samples
        dropped from their end (empty for a complete corpus)."""
        return {s.name: s.dropped for s in self.shards if s.dropped is not None}

    @classmethod
    def from_mds(cls, local_dir: str | os.PathLike | None = None, remote: str | None = None,
                 split: str | None = None, *, local: str | os.PathLike | None = None) -> "Corpus":
        """Index an MDS dataset written by ``streaming.MDSWriter`` from its ``index.json``.

        With ``remote``, ``index.json`` (and later each shard, when first read) is fetched into
        the local directory by mosaicml-streaming's own ``Stream``, as a ``StreamingDataset``
        would. The keywords are streaming's: ``Corpus.from_mds(remote="s3://b/ds",
        local="/cache/ds")``; positionally, ``from_mds(local, remote, split)``.

        Unlike ``StreamingDataset``, the local directory is required (``TypeError`` without
        it): the index records it, and every reader of the corpus (workers, ranks, a resumed
        run) must find the shards in the same place, not a temporary directory.
        """
        from .sources.mds import load_mds_index

        if local_dir is not None and local is not None:
            raise TypeError("Corpus.from_mds: pass the local directory once, as local= or as "
                            f"the first argument (got local_dir={local_dir!r}, local={local!r})")
        if local is None:
            local = local_dir
        if local is None:
            raise TypeError("Corpus.from_mds needs local= (the directory holding index.json "
                            "and the shards, or the cache they are fetched into from remote=)")
        if remote is not None:
            remote = os.fspath(remote)
        local = os.fspath(local)
        index = load_mds_index(local, remote, split)
        shards = []
        for info in index["shards"]:
            raw = info["raw_data"]
            path = os.path.join(local, split or "", raw["basename"])
            mtime = os.stat(path).st_mtime_ns if os.path.exists(path) else -1
            shards.append(ShardInfo(raw["basename"], int(info["samples"]), int(raw["bytes"]), mtime))
        return cls("mds", shards, mds=MDSInfo(local, remote, split, index))

    # ---------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write the index as Parquet, one row per sample (atomically)."""
        n = self.num_samples
        shard, position = self.locate(np.arange(n, dtype=np.int64))
        columns: dict[str, pa.Array] = {
            "id": pa.array(np.arange(n, dtype=np.int64)),
            "shard": pa.array(shard.astype(np.int32)),
            "position": pa.array(position.astype(np.int64)),
        }
        if self.tar is not None:
            t = self.tar
            ptr = pa.array(t.member_ptr.astype(np.int32))
            suffix = pa.DictionaryArray.from_arrays(pa.array(t.member_suffix),
                                                    _text_array(t.suffixes))
            columns.update({
                "key": t.keys,
                "offset": pa.array(t.offsets),
                "length": pa.array(t.lengths),
                "member_suffix": pa.ListArray.from_arrays(ptr, suffix),
                "member_offset": pa.ListArray.from_arrays(ptr, pa.array(t.member_offset)),
                "member_size": pa.ListArray.from_arrays(ptr, pa.array(t.member_size)),
            })
        meta = {"es_stream_version": __version__, "format": self.format,
                "fingerprint": self.fingerprint, "shards": [asdict(s) for s in self.shards]}
        if self.mds is not None:
            meta["mds"] = asdict(self.mds)
        table = pa.table(columns).replace_schema_metadata({_META_KEY: json.dumps(meta)})
        with atomic_write(path) as tmp:
            pq.write_table(table, tmp)

    @classmethod
    def load(cls, path: str | os.PathLike, *, check: bool = True) -> "Corpus":
        """Read an index written by :meth:`save` (or ``es-stream index``).

        A file that is not one — not Parquet, truncated, without es-stream's metadata, with
        that metadata broken, or without the columns its format needs — raises
        :class:`~es_stream.errors.IndexFileError` (a ``ValueError``) naming the path and
        saying to re-create it with ``es-stream index SHARDS -o PATH``; a missing file raises
        ``FileNotFoundError`` saying the same.

        With ``check`` (the default) every local shard is compared with what was indexed; a
        shard whose size or mtime changed, or an MDS shard whose count changed in
        ``index.json``, raises :class:`StaleIndexError` naming it — a cached index is never
        silently reused for different data.
        """
        path = os.fspath(path)
        table = _read_index_table(path)
        meta = _index_meta(table, path)
        shards = [ShardInfo(**s) for s in meta["shards"]]
        tar = mds = None
        if meta["format"] == "wds":
            tar = _tar_table_from_parquet(table, path)
        else:
            m = meta["mds"]
            mds = MDSInfo(m["local"], m["remote"], m["split"], m["index"])
        try:
            corpus = cls(meta["format"], shards, tar=tar, mds=mds)
        except ShardError as exc:  # no samples at all: not what `es-stream index` writes
            raise _index_error(path, str(exc)) from exc
        if table.num_rows != corpus.num_samples:
            raise _index_error(path, f"it holds {table.num_rows} rows but its metadata lists "
                               f"{corpus.num_samples} samples")
        if check:
            corpus.check_fresh(path)
        return corpus

    def check_fresh(self, index_path: str | None = None) -> None:
        """Raise :class:`StaleIndexError` if a local shard differs from when it was indexed."""
        advice = "re-index the corpus" + (f" (es-stream index ... -o {index_path})" if index_path else "")
        for shard in self.shards:
            if shard.mtime_ns < 0:
                continue  # streamed URL, or an MDS shard not fetched yet: nothing to compare
            path = self.local_path(shard)
            try:
                st = os.stat(path)
            except FileNotFoundError as exc:
                raise ShardError(path, f"shard listed in {index_path or 'the index'} is missing") from exc
            if st.st_size != shard.size or st.st_mtime_ns != shard.mtime_ns:
                raise StaleIndexError(
                    f"{path}: shard changed since it was indexed (size {shard.size} -> "
                    f"{st.st_size}, mtime {shard.mtime_ns} -> {st.st_mtime_ns}); {advice}")
        if self.mds is not None:
            self._check_mds_index_fresh(advice)

    def _check_mds_index_fresh(self, advice: str) -> None:
        """Compare ``index.json`` as it is now with the one indexed: same shard files, counts
        and sizes. A broken ``index.json`` raises the :class:`ShardError` that names it."""
        from .sources.mds import read_mds_index_file

        index_json = os.path.join(self.mds.local, self.mds.split or "", "index.json")
        try:
            now = read_mds_index_file(index_json)["shards"]
        except FileNotFoundError:
            return  # a remote corpus whose index.json is not fetched yet
        old = self.mds.index["shards"]
        for i, info in enumerate(old):
            if i >= len(now) or _mds_identity(now[i]) != _mds_identity(info):
                raise StaleIndexError(f"{index_json}: shard {info['raw_data']['basename']} "
                                      f"changed since it was indexed; {advice}")
        if len(now) != len(old):
            raise StaleIndexError(f"{index_json}: now lists {len(now)} shards, the index "
                                  f"has {len(old)}; {advice}")

    def local_path(self, shard: ShardInfo | int) -> str:
        """Filesystem path of a local shard (for MDS: inside the local cache directory)."""
        info = self.shards[shard] if isinstance(shard, int) else shard
        if self.mds is not None:
            return os.path.join(self.mds.local, self.mds.split or "", info.name)
        return _local_path(info.name)


def _tar_table(layouts: Iterable[ShardLayout]) -> TarTable:
    keys: list[str] = []
    offsets: list[int] = []
    lengths: list[int] = []
    counts: list[int] = []
    suffix_codes: dict[str, int] = {}
    m_suffix: list[int] = []
    m_offset: list[int] = []
    m_size: list[int] = []
    for layout in layouts:
        keys += layout.keys
        offsets += layout.offsets
        lengths += layout.lengths
        for members in layout.members:
            counts.append(len(members))
            for suffix, off, size in members:
                m_suffix.append(suffix_codes.setdefault(suffix, len(suffix_codes)))
                m_offset.append(off)
                m_size.append(size)
    return TarTable(
        keys=_text_array(keys),
        offsets=np.array(offsets, dtype=np.int64),
        lengths=np.array(lengths, dtype=np.int64),
        member_ptr=np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64),
        member_suffix=np.array(m_suffix, dtype=np.int32),
        member_offset=np.array(m_offset, dtype=np.int64),
        member_size=np.array(m_size, dtype=np.int64),
        suffixes=list(suffix_codes),
    )


def _mds_identity(entry: dict[str, Any]) -> tuple[Any, ...]:
    # what makes an MDS shard the same shard: its file, sample count and size (the raw file
    # may not be fetched yet, so its size in index.json stands in for the one on disk)
    raw = entry["raw_data"]
    return raw["basename"], entry["samples"], raw["bytes"]


# ------------------------------------------------------------------ reading a saved index
def _index_error(path: str, problem: str) -> IndexFileError:
    return IndexFileError(f"{path}: {problem}; this is not a usable es-stream corpus index — "
                          f"re-create it with `es-stream index SHARDS -o {path}`")


def _read_index_table(path: str) -> pa.Table:
    if os.path.isdir(path):  # pq.read_table would read a directory as a Parquet dataset
        raise _index_error(path, "is a directory, not an index file")
    try:
        return pq.read_table(path)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{path}: no corpus index here; create it with "
                                f"`es-stream index SHARDS -o {path}`") from exc
    except (pa.ArrowException, OSError) as exc:  # not Parquet, truncated, unreadable
        raise _index_error(path, f"cannot be read as Parquet ({exc})") from exc


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_SHARD_FIELDS = {"name": lambda v: isinstance(v, str) and v != "",
                 "num_samples": lambda v: _is_int(v) and v >= 0,
                 "size": _is_int, "mtime_ns": _is_int}
# written by later versions only; an index without them loads with the ShardInfo default
_OPTIONAL_SHARD_FIELDS = {"dropped": lambda v: v is None or (_is_int(v) and v >= 0)}


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
    return _META_KEY in metadata


def _index_meta(table: pa.Table, path: str) -> dict[str, Any]:
    """The checked ``es_stream.corpus`` metadata of a saved index (see :meth:`Corpus.save`)."""
    raw = (table.schema.metadata or {}).get(_META_KEY)
    if raw is None:
        raise _index_error(path, f"it has no {_META_KEY.decode()} metadata")
    try:
        meta = json.loads(raw)
    except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8
        raise _index_error(path, f"its {_META_KEY.decode()} metadata is not JSON ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") not in ("wds", "mds"):
        raise _index_error(path, f"its {_META_KEY.decode()} metadata has no 'format' "
                           "'wds' or 'mds'")
    shards = meta.get("shards")
    if not isinstance(shards, list):
        raise _index_error(path, "its metadata has no 'shards' list")
    for i, shard in enumerate(shards):
        if not isinstance(shard, dict) or not set(_SHARD_FIELDS) <= set(shard) <= (
                set(_SHARD_FIELDS) | set(_OPTIONAL_SHARD_FIELDS)):
            raise _index_error(path, f"metadata shard {i} must have the keys "
                               f"{sorted(_SHARD_FIELDS)} (and optionally "
                               f"{sorted(_OPTIONAL_SHARD_FIELDS)}), got {shard!r:.120}")
        for key, ok in {**_SHARD_FIELDS, **_OPTIONAL_SHARD_FIELDS}.items():
            if key in shard and not ok(shard[key]):
                raise _index_error(path, f"metadata shard {i}: bad {key!r} {shard[key]!r:.80}")
    if meta["format"] == "mds":
        _check_mds_meta(meta, path)
    return meta


def _check_mds_meta(meta: dict[str, Any], path: str) -> None:
    from .sources.mds import MDSIndexProblem, check_mds_index

    m = meta.get("mds")
    if not isinstance(m, dict) or not isinstance(m.get("local"), str) or \
            any(not (m.get(k) is None or isinstance(m.get(k), str)) for k in ("remote", "split")):
        raise _index_error(path, "its metadata has no 'mds' object with 'local', 'remote', "
                           "'split' and 'index'")
    try:
        check_mds_index(m.get("index"))
    except MDSIndexProblem as exc:
        raise _index_error(path, f"the MDS index.json saved in its metadata is invalid: {exc}"
                           ) from exc
    listed = [(s["name"], s["num_samples"]) for s in meta["shards"]]
    indexed = [(e["raw_data"]["basename"], e["samples"]) for e in m["index"]["shards"]]
    if listed != indexed:
        raise _index_error(path, "its metadata's shard list and saved MDS index.json disagree")


# column -> (arrow type test, what it must be), for a WebDataset corpus
def _is_text(t: pa.DataType) -> bool:
    # names are strings, or raw bytes when a tar member name is not UTF-8 (see _text_array)
    return pa.types.is_string(t) or pa.types.is_binary(t)


_TAR_COLUMNS = {
    "key": (_is_text, "string or binary"),
    "offset": (pa.types.is_integer, "integer"),
    "length": (pa.types.is_integer, "integer"),
    "member_suffix": (lambda t: pa.types.is_list(t) and (_is_text(t.value_type) or (
        pa.types.is_dictionary(t.value_type) and _is_text(t.value_type.value_type))),
        "list of strings"),
    "member_offset": (lambda t: pa.types.is_list(t) and pa.types.is_integer(t.value_type),
                      "list of integers"),
    "member_size": (lambda t: pa.types.is_list(t) and pa.types.is_integer(t.value_type),
                    "list of integers"),
}


def _check_tar_columns(table: pa.Table, path: str) -> None:
    for name, (ok, wanted) in _TAR_COLUMNS.items():
        if name not in table.column_names:
            raise _index_error(path, f"it has no column {name!r} (a WebDataset corpus index "
                               "needs it)")
        column = table.column(name)
        if not ok(column.type):
            raise _index_error(path, f"column {name!r} must be {wanted}, got {column.type}")
        if column.null_count:
            raise _index_error(path, f"column {name!r} has {column.null_count} null values")


def _tar_table_from_parquet(table: pa.Table, path: str) -> TarTable:
    _check_tar_columns(table, path)
    suffix_lists = table.column("member_suffix").combine_chunks()
    suffix = suffix_lists.flatten()
    if isinstance(suffix, pa.DictionaryArray):
        codes, vocab = suffix.indices, suffix.dictionary
    else:
        enc = suffix.dictionary_encode()
        codes, vocab = enc.indices, enc.dictionary
    tar = TarTable(
        keys=table.column("key").combine_chunks(),
        offsets=table.column("offset").to_numpy(),
        lengths=table.column("length").to_numpy(),
        member_ptr=suffix_lists.offsets.to_numpy().astype(np.int64),
        member_suffix=codes.to_numpy(zero_copy_only=False).astype(np.int32),
        member_offset=table.column("member_offset").combine_chunks().flatten().to_numpy(),
        member_size=table.column("member_size").combine_chunks().flatten().to_numpy(),
        suffixes=[_py_text(v) for v in vocab.to_pylist()],
    )
    members = int(tar.member_ptr[-1] - tar.member_ptr[0])
    if not len(tar.member_offset) == len(tar.member_size) == len(tar.member_suffix) == members:
        raise _index_error(path, "columns 'member_suffix', 'member_offset' and 'member_size' "
                           "list different numbers of files")
    return tar


def _text_array(values: list[str]) -> pa.Array:
    """Names as an Arrow ``string`` array, or, when one is not valid UTF-8, a ``binary`` array
    of the raw bytes tarfile decoded it from, which Parquet keeps exactly."""
    try:
        return pa.array(values, pa.string())
    except UnicodeEncodeError:  # a lone surrogate: tarfile's surrogateescape of a non-UTF-8 byte
        return pa.array([v.encode(tarfile.ENCODING, "surrogateescape") for v in values],
                        pa.binary())


def _py_text(value: str | bytes) -> str:
    """A name read back from the index, decoded as tarfile (and so webdataset) decodes it."""
    if isinstance(value, bytes):
        return value.decode(tarfile.ENCODING, "surrogateescape")
    return value
