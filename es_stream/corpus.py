"""`Corpus`: the index of a sharded corpus and the stable global sample ids it defines.

A sample's id is ``shard offset + position in shard`` where shards are taken in the order they
were given (a sorted directory listing, or the brace pattern's expansion). The id of a sample
never changes while its shard does not, whichever worker, rank or restart reads it, so anything
learned about a sample can be keyed by it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .atomic import atomic_write
from ._version import __version__
from .errors import ShardError, StaleIndexError
from .index_file import META_KEY, index_error, index_meta, is_index_file, read_index_table
from .mds_index import load_mds_index, mds_identity, read_mds_index_file
from .remote import index as remote_index
from .remote.fetch import RetryPolicy
from .remote.store import is_remote_url, reads_by_range
from .shard_identity import content_check
from .shard_paths import (RELATIVE_TO_INDEX, expand_urls, is_local_url, local_path, resolve_path,
                          stored_path)
from .tar_table import (TarColumnsProblem, TarTable, build_tar_table, check_tar_values,
                        tar_columns, tar_table_from_arrow)
from .tarscan import ShardLayout, scan_local_shard, scan_streamed_shard

# defined with the index file, shard paths and tar table; importable from here as before
__all__ = ["Corpus", "MDSInfo", "ShardInfo", "TarTable", "expand_urls", "is_index_file",
           "is_local_url"]


@dataclass(frozen=True)
class ShardInfo:
    """One shard: its path or URL, sample count, and the size and mtime it had when indexed
    (-1 when unknown, for streamed URLs).

    ``check`` is its content check when indexed (see :mod:`es_stream.shard_identity`), verified
    with size and mtime when a reader opens the shard; None for streamed URLs, MDS shards not
    fetched when indexed, and indexes written before it was recorded.

    ``etag`` is the object's ETag when indexed, for a shard in an object store (read by byte
    range, where there is no mtime): compared with its size at :meth:`Corpus.load`. None when
    the store sends none, and for local shards.

    ``dropped`` is None for a complete shard. For a truncated tar shard indexed with
    ``allow_truncated=True`` it is the number of samples left out (0 or 1: its last sample,
    which may be incomplete; what the cut removed entirely cannot be counted).
    """

    name: str
    num_samples: int
    size: int
    mtime_ns: int
    dropped: int | None = None
    check: str | None = None
    etag: str | None = None


@dataclass(frozen=True)
class MDSInfo:
    """Where an MDS corpus lives: streaming's ``local`` cache directory, optional ``remote`` and
    ``split``, and the parsed ``index.json`` the shard readers are built from."""

    local: str
    remote: str | None
    split: str | None
    index: dict[str, Any]


def _mds_identity_now(path: str) -> tuple[int, str | None]:
    """(mtime_ns, content check) of a local MDS shard file, (-1, None) when it is not there yet
    (a remote or compressed shard fetched on first read)."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            return st.st_mtime_ns, content_check(f.fileno(), st.st_size)
    except FileNotFoundError:
        return -1, None
    except OSError as exc:
        raise ShardError(path, f"cannot read the shard ({exc.strerror or exc})") from exc


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
        #: the index file this corpus was loaded from, and how its shard paths were resolved
        #: (None for a corpus built in this process: paths as given)
        self.index_path: str | None = None
        self.path_rule: str | None = None
        #: whether readers verify each shard against what was indexed when they open it
        #: (:mod:`es_stream.shard_identity`); False after ``Corpus.load(check=False)``
        self.verify_shards = True
        #: shard -> (st_dev, st_ino) of its file when this process loaded the index and checked
        #: it: readers compare them at each open, so a shard replaced later is caught without
        #: reading a byte of it (nothing of a pruned sample is read)
        self.file_ids: dict[int, tuple[int, int]] = {}
        #: settings of the object store the shards are in (obstore's names: ``endpoint``,
        #: ``region``, ...; see :func:`es_stream.remote.store.open_store`), and how hard a
        #: request is retried (None: :meth:`RetryPolicy.from_env`). They travel with the
        #: corpus into DataLoader workers (pickled) and are saved with the index — the retry
        #: policy as numbers, the options without credentials (never written into an index:
        #: give those by the environment, or again to :meth:`load`).
        self.storage_options: dict[str, Any] = {}
        self.retry: RetryPolicy | None = None
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
                        progress: Callable[[list[str]], Iterable[str]] | None = None,
                        storage_options: dict[str, Any] | None = None) -> "Corpus":
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
        Shards in an object store (``s3://``, ``gs://``, ``https://``) are streamed once each
        to be indexed, then read by byte range; ``storage_options`` (and an S3 endpoint from the
        environment) travel with the corpus, as for :meth:`from_mds`.
        """
        layouts: list[ShardLayout] = []
        shards: list[ShardInfo] = []
        expanded = expand_urls(urls)
        remote = [u for u in expanded if reads_by_range(u)]
        options = dict(storage_options or {})
        if remote:
            options = remote_index.with_env_endpoint(remote[0], options)
        for url in (expanded if progress is None else progress(expanded)):
            if is_local_url(url):
                layout, size, mtime_ns, check = scan_local_shard(url, allow_truncated)
            else:
                layout, size, mtime_ns, check = scan_streamed_shard(url, allow_truncated, options)
            dropped = len(layout.dropped) if layout.truncated else None
            shards.append(ShardInfo(url, len(layout), size, mtime_ns, dropped, check))
            layouts.append(layout)
        corpus = cls("wds", shards, tar=build_tar_table(layouts))
        if remote:
            corpus.storage_options = options
        return corpus

    @property
    def truncated(self) -> dict[str, int]:
        """Shards indexed with ``allow_truncated=True`` that were truncated: name -> samples
        dropped from their end (empty for a complete corpus)."""
        return {s.name: s.dropped for s in self.shards if s.dropped is not None}

    @classmethod
    def from_mds(cls, local_dir: str | os.PathLike | None = None, remote: str | None = None,
                 split: str | None = None, *, local: str | os.PathLike | None = None,
                 storage_options: dict[str, Any] | None = None,
                 retry: RetryPolicy | None = None) -> "Corpus":
        """Index an MDS dataset written by ``streaming.MDSWriter`` from its ``index.json``.

        The keywords are streaming's: ``Corpus.from_mds(remote="s3://b/ds", local="/cache/ds")``;
        positionally, ``from_mds(local, remote, split)``; an object-store URL alone,
        ``from_mds("s3://b/ds")``, is the remote.

        An ``s3://``, ``gs://`` or ``http(s)://`` remote (with the ``remote`` extra) is read
        through obstore: ``index.json`` from the store, each shard's size and ETag by one HEAD
        (recorded, so :meth:`load` finds an object rewritten since); uncompressed shards are
        then read by byte range, only the samples wanted (:mod:`es_stream.remote.mds`), and
        compressed ones fetched whole and decompressed into ``local`` — by default a cache
        directory of this machine (:func:`es_stream.remote.index.default_cache_dir`).
        ``storage_options`` and ``retry`` are as for :attr:`storage_options` and
        :attr:`retry`; an S3 endpoint from the environment (``AWS_ENDPOINT_URL``) is recorded in
        :attr:`storage_options`, so workers and a saved index use the store indexed. Other remotes go through mosaicml-streaming's own ``Stream``, as a
        ``StreamingDataset`` would, and need ``local``.
        """
        if local_dir is not None and local is not None:
            raise TypeError("Corpus.from_mds: pass the local directory once, as local= or as "
                            f"the first argument (got local_dir={local_dir!r}, local={local!r})")
        if local is None:
            local = local_dir
        if remote is None and local is not None and is_remote_url(os.fspath(local)):
            remote, local = os.fspath(local), None  # from_mds("s3://bucket/ds")
        if remote is not None:
            remote = os.fspath(remote)
        by_range = remote is not None and reads_by_range(remote)
        if local is None and by_range:
            local = remote_index.default_cache_dir(remote, split)
        if local is None:
            raise TypeError("Corpus.from_mds needs local= (the directory holding index.json "
                            "and the shards, or the cache they are fetched into from remote=)")
        local = os.fspath(local)
        options = dict(storage_options or {})
        if by_range:
            # the endpoint indexed against travels with the corpus: a forkserver worker sees
            # the environment of when its server started, not this one
            options = remote_index.with_env_endpoint(remote, options)
            index = remote_index.fetch_mds_index(remote, split, local, options, retry)
        else:
            index = load_mds_index(local, remote, split)
        shards = []
        for info in index["shards"]:
            raw = info["raw_data"]
            path = os.path.join(local, split or "", raw["basename"])
            mtime, check = (-1, None) if by_range else _mds_identity_now(path)
            shards.append(ShardInfo(raw["basename"], int(info["samples"]), int(raw["bytes"]), mtime,
                                    check=check))
        corpus = cls("mds", shards, mds=MDSInfo(local, remote, split, index))
        corpus.storage_options, corpus.retry = options, retry
        if by_range:
            corpus.record_remote_identities()
        return corpus

    # ------------------------------------------------------------- object stores
    def remote_objects(self) -> list[tuple[int, str, int]]:
        """``(shard, URL, object size)`` of each shard read from an object store by byte range
        (for a compressed MDS shard, its compressed object)."""
        if self.mds is None:
            return [(i, s.name, s.size) for i, s in enumerate(self.shards)
                    if reads_by_range(s.name)]
        if self.mds.remote is None or not reads_by_range(self.mds.remote):
            return []
        return [(i, *remote_index.mds_object(self.mds.remote, self.mds.split, entry))
                for i, entry in enumerate(self.mds.index["shards"])]

    def record_remote_identities(self) -> None:
        """Record the ETag of each object-store shard that has none yet (one HEAD each, several
        in flight), after checking its size is the indexed one: what :meth:`load` compares
        where there is no mtime. :class:`StaleIndexError` naming the first object that is not
        the one indexed."""
        todo = [(i, url, size) for i, url, size in self.remote_objects()
                if self.shards[i].etag is None]
        if not todo:
            return
        etags = remote_index.shard_identities([u for _, u, _ in todo], [n for *_, n in todo],
                                              self.storage_options, self.retry)
        for (i, _, _), etag in zip(todo, etags):
            self.shards[i] = ShardInfo(**{**asdict(self.shards[i]), "etag": etag})

    def check_remote(self, advice: str = "re-index the corpus") -> None:
        """Raise :class:`StaleIndexError` naming the first object-store shard whose size or
        ETag differs from the index's (one HEAD each, several in flight)."""
        objects = self.remote_objects()
        if objects:
            remote_index.check_identities(
                [u for _, u, _ in objects], [n for *_, n in objects],
                [self.shards[i].etag for i, _, _ in objects], self.storage_options, self.retry,
                advice)

    # ---------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write the index as Parquet, one row per sample (atomically).

        Local shard paths (and an MDS corpus's local directory) are stored relative to the
        directory ``path`` is in when they lie under it, absolute otherwise, so the file keeps
        working when the tree holding it and its shards moves, or is read from another working
        directory (see :meth:`load`). ``pipe:`` commands and remote URLs are stored as given.

        ``path`` may be an ``s3://`` or ``gs://`` URL (written by one PUT, atomic, with
        :attr:`storage_options` and :attr:`retry`): the index beside the data, which ranks,
        workers and later jobs load instead of re-scanning. Local paths are then stored
        absolute. Object-store shards whose ETag is not recorded yet are looked up first
        (:meth:`record_remote_identities`). The index records :attr:`storage_options` without
        credentials (:func:`es_stream.remote.index.storable_options`) and :attr:`retry` as
        numbers.
        """
        path = os.fspath(path)
        remote = is_remote_url(path)
        # a remote index has no directory on this machine: local paths go in absolute
        index_dir = "\0" if remote else os.path.dirname(os.path.abspath(path))
        self.record_remote_identities()
        n = self.num_samples
        shard, position = self.locate(np.arange(n, dtype=np.int64))
        columns: dict[str, pa.Array] = {
            "id": pa.array(np.arange(n, dtype=np.int64)),
            "shard": pa.array(shard.astype(np.int32)),
            "position": pa.array(position.astype(np.int64)),
        }
        if self.tar is not None:
            columns.update(tar_columns(self.tar))
        shards = [asdict(s) for s in self.shards]
        if self.mds is None:
            for s in shards:
                s["name"] = stored_path(s["name"], index_dir)
        meta = {"es_stream_version": __version__, "format": self.format,
                "fingerprint": self.fingerprint, "paths": RELATIVE_TO_INDEX, "shards": shards}
        if self.mds is not None:
            local = stored_path(self.mds.local, index_dir)
            if self.mds.remote is not None and self.mds.local == remote_index.default_cache_dir(
                    self.mds.remote, self.mds.split):
                local = None  # the default cache: that of the machine that loads the index
            meta["mds"] = {**asdict(self.mds), "local": local}
        if self.storage_options or self.retry is not None:
            meta["remote"] = {"storage_options": remote_index.storable_options(
                self.storage_options), "retry": remote_index.retry_numbers(self.retry)}
        table = pa.table(columns).replace_schema_metadata({META_KEY: json.dumps(meta)})
        if remote:
            remote_index.write_index_table(path, table, self.storage_options, self.retry)
            return
        with atomic_write(path) as tmp:
            pq.write_table(table, tmp)

    @classmethod
    def load(cls, path: str | os.PathLike, *, check: bool | str = True,
             root: str | os.PathLike | None = None,
             storage_options: dict[str, Any] | None = None) -> "Corpus":
        """Read an index written by :meth:`save` (or ``es-stream index``).

        Relative shard paths in the file (and an MDS corpus's local directory) are resolved
        against the directory the index file is in, so it loads from any working directory
        and after its tree moved; absolute ones are used as they are. ``root`` resolves them
        against another directory instead: the shards moved apart from the index. An index
        written before es-stream stored paths this way (its metadata has no ``"paths"`` entry)
        holds paths relative to the working directory it was built in: they are resolved
        against the working directory, as they always were, unless ``root`` is given.

        A file that is not one — not Parquet, truncated, without es-stream's metadata, with
        that metadata broken, or without the columns its format needs — raises
        :class:`~es_stream.errors.IndexFileError` (a ``ValueError``) naming the path and
        saying to re-create it with ``es-stream index SHARDS -o PATH``; a missing file raises
        ``FileNotFoundError`` saying the same.

        With ``check`` (the default) every local shard is compared with what was indexed; a
        missing shard raises :class:`ShardError` saying where it was looked for and by which
        rule; a shard whose size or mtime changed, or an MDS shard whose count changed in
        ``index.json``, raises :class:`StaleIndexError` naming it — a cached index is never
        silently reused for different data; ``check="content"`` also compares the content check
        the index records (the first and last 64 KiB of each shard: a shard replaced by one of
        the same size whose mtime was kept). Readers verify each shard again when
        they open it, by ``fstat`` alone (size, mtime and the file seen here): a shard replaced
        after loading raises :class:`StaleIndexError` then, and no byte of a pruned sample is
        read to find out (see :mod:`es_stream.shard_identity`). ``check=False`` turns both off.

        The tar layout columns are validated (offsets and sizes inside their shard, samples in
        order without overlap): an edited value raises :class:`~es_stream.errors.IndexFileError`
        naming the column, row and file.

        ``path`` may be an ``s3://``, ``gs://`` or ``https://`` URL (an index saved beside the
        data, read with ``storage_options``). The corpus's :attr:`storage_options` are those
        the index recorded, updated by ``storage_options`` (credentials are never in the
        index); its :attr:`retry` is the recorded one. With ``check``, each object-store shard
        is compared by size and recorded ETag (one HEAD each, several in flight): an object
        rewritten since indexing raises :class:`StaleIndexError` naming its URL.
        """
        path = os.fspath(path)
        if is_remote_url(path):
            table = _read_remote_index(path, storage_options)
        else:
            table = read_index_table(path)
        meta = index_meta(table, path)
        base, rule = _path_base(path, meta, root)
        shards = [ShardInfo(**s) for s in meta["shards"]]
        tar = mds = None
        if meta["format"] == "wds":
            shards = [ShardInfo(**{**asdict(s), "name": resolve_path(s.name, base)})
                      for s in shards]
            try:
                tar = tar_table_from_arrow(table)
            except TarColumnsProblem as exc:
                raise index_error(path, str(exc)) from exc
        else:
            m = meta["mds"]
            local = (remote_index.default_cache_dir(m["remote"], m["split"])
                     if m["local"] is None else resolve_path(m["local"], base))
            mds = MDSInfo(local, m["remote"], m["split"], m["index"])
        try:
            corpus = cls(meta["format"], shards, tar=tar, mds=mds)
        except ShardError as exc:  # no samples at all: not what `es-stream index` writes
            raise index_error(path, str(exc)) from exc
        if table.num_rows != corpus.num_samples:
            raise index_error(path, f"it holds {table.num_rows} rows but its metadata lists "
                              f"{corpus.num_samples} samples")
        if tar is not None:
            try:
                check_tar_values(tar, corpus.shard_starts,
                                 np.array([s.size for s in shards], dtype=np.int64),
                                 [s.name for s in shards])
            except TarColumnsProblem as exc:
                raise index_error(path, str(exc)) from exc
        corpus.index_path, corpus.path_rule = path, rule
        corpus.verify_shards = bool(check)
        saved = meta.get("remote") or {}
        corpus.storage_options = {**saved.get("storage_options", {}), **(storage_options or {})}
        corpus.retry = remote_index.retry_from_numbers(saved.get("retry"))
        if check:
            corpus.check_fresh(path, content=check == "content")
            # once at load, not at each check_fresh (every ESDataset): HEADs cost round trips
            corpus.check_remote(f"re-index the corpus (and Corpus.save({path!r}))")
        return corpus

    def check_fresh(self, index_path: str | None = None, content: bool = False) -> None:
        """Raise :class:`StaleIndexError` if a local shard differs from when it was indexed,
        :class:`ShardError` saying where it looked if one is missing. By size and mtime (one
        ``stat`` a shard); with ``content``, also by the content check the index records (reads
        up to 128 KiB a shard). Records each file's identity for the readers' checks."""
        index_path = index_path or self.index_path
        advice = "re-index the corpus" + (f" (es-stream index ... -o {index_path})" if index_path else "")
        for i, shard in enumerate(self.shards):
            if shard.mtime_ns < 0:
                continue  # streamed URL, or an MDS shard not fetched yet: nothing to compare
            path = self.local_path(shard)
            try:
                st = os.stat(path)
            except FileNotFoundError as exc:
                raise ShardError(path, f"shard listed in {index_path or 'the index'} is missing: "
                                 f"{self.where_looked(path)}") from exc
            if st.st_size != shard.size or st.st_mtime_ns != shard.mtime_ns:
                raise StaleIndexError(
                    f"{path}: shard changed since it was indexed (size {shard.size} -> "
                    f"{st.st_size}, mtime {shard.mtime_ns} -> {st.st_mtime_ns}); {advice}")
            if content and shard.check is not None:
                with open(path, "rb") as f:
                    if content_check(f.fileno(), st.st_size) != shard.check:
                        raise StaleIndexError(
                            f"{path}: shard changed since it was indexed (same size and mtime, "
                            f"different content); {advice}")
            self.file_ids[i] = (st.st_dev, st.st_ino)
        if self.mds is not None:
            self._check_mds_index_fresh(advice)

    def where_looked(self, path: str) -> str:
        """Where a missing local shard was looked for and by which rule, for error messages."""
        rule = self.path_rule or "as the shard was given, relative to the working directory"
        return (f"looked for {os.path.abspath(path)} ({rule}); restore it, load the index with "
                "Corpus.load(..., root=DIR) if the shards moved apart from it, or re-index")

    def _check_mds_index_fresh(self, advice: str) -> None:
        """Compare ``index.json`` as it is now with the one indexed: same shard files, counts
        and sizes. A broken ``index.json`` raises the :class:`ShardError` that names it."""
        index_json = os.path.join(self.mds.local, self.mds.split or "", "index.json")
        try:
            now = read_mds_index_file(index_json)["shards"]
        except FileNotFoundError:
            return  # a remote corpus whose index.json is not fetched yet
        old = self.mds.index["shards"]
        for i, info in enumerate(old):
            if i >= len(now) or mds_identity(now[i]) != mds_identity(info):
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
        return local_path(info.name)


def _read_remote_index(url: str, storage_options: dict[str, Any] | None) -> pa.Table:
    """The Parquet table of the index object ``url``; the errors :meth:`Corpus.load` names."""
    try:
        return remote_index.read_index_table_at(url, storage_options)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{url}: no corpus index here; save one with "
                                f"Corpus.save({url!r})") from exc
    except (pa.ArrowException, OSError) as exc:
        if isinstance(exc, ShardError):
            raise
        raise index_error(url, f"cannot be read as Parquet ({exc})") from exc


def _path_base(path: str, meta: dict[str, Any], root: str | os.PathLike | None
               ) -> tuple[str, str]:
    """The directory the relative paths of index ``path`` are resolved against, and the rule
    that chose it, in words."""
    if root is not None:
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise NotADirectoryError(f"Corpus.load({path!r}, root={root!r}): root must be the "
                                     "directory the index's relative shard paths start from")
        return root, f"relative paths resolved against root={root!r}"
    if is_remote_url(path):
        return "", ("an index in an object store stores local paths absolute; relative ones "
                    f"are resolved against the working directory, here {os.getcwd()}")
    if meta.get("paths") == RELATIVE_TO_INDEX:
        index_dir = os.path.dirname(path)
        return index_dir, (f"relative paths resolved against the index file's directory "
                           f"{os.path.abspath(index_dir)}")
    return "", ("this index predates es-stream storing paths relative to the index file: its "
                "relative paths are resolved against the working directory it was built in, "
                f"here {os.getcwd()}")
