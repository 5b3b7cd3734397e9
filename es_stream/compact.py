"""Rewrite a corpus with only the samples a manifest keeps, payloads byte for byte, through
webdataset's ``ShardWriter`` or streaming's ``MDSWriter``; plus ``mapping.parquet`` (old id ->
new id).

Compaction never writes into a directory that holds anything else: the shards are written into
a hidden sibling directory and renamed into place only when complete, so the output directory
is either absent, the previous output, or the whole new output — never a mix, never a half.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import sys
import tempfile
import warnings
from typing import Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .atomic import fsync_path, public_mode
from ._version import __version__
from .corpus import Corpus
from .errors import naming
from .mds_columns import column_encoding, column_value
from .mds_index import check_safe_columns
from .shard_paths import is_local_url, local_path
from .sources import open_reader

#: Written last into every compaction output; lists the files the output consists of, so that
#: ``overwrite=True`` can tell an earlier output (which it may delete) from anything else.
MARKER = ".es-stream-compact.json"
MAPPING = "mapping.parquet"
# What an output written before the marker existed may hold: ShardWriter's and MDSWriter's
# shard names, MDS's index.json, and the mapping. Anything else makes a directory "not ours".
_LEGACY_NAMES = re.compile(r"shard-\d{6}\.tar|shard\.\d{5}\.mds(\.[a-z0-9]+)?|index\.json|"
                           + re.escape(MAPPING))


def compact(corpus: Corpus, kept_ids: np.ndarray, out_dir: str | os.PathLike, fmt: str | None = None,
            max_count: int = 10_000, progress: Callable[..., Iterable] | None = None, *,
            overwrite: bool = False, allow_unsafe_types: bool = False, typed: bool = True) -> str:
    """Write the kept samples (in id order) to a new directory ``out_dir`` as ``fmt`` (default:
    the corpus's own format). Returns the path of ``mapping.parquet`` (``old_id``, ``new_id``).

    Tar to tar and MDS to MDS keep every payload byte-identical. Tar to MDS makes each file
    suffix a column (plus ``__key__``, a ``str``), typed as webdataset's default decoding reads
    that suffix (:mod:`es_stream.mds_columns`): ``.cls``/``.index``/``.id``... an ``int``
    column (labels read back as ints), ``.txt`` ``str``, ``.json`` ``json``, ``.npy``
    ``ndarray``, anything else (images, ...) ``bytes``; with ``typed=False`` every suffix is a
    ``bytes`` column holding the file byte-identical. MDS to tar is refused: MDS columns are
    typed values, and re-encoding them as files would not be byte-identical.

    Where the output goes (nothing that compaction did not write is ever deleted):

    * ``out_dir`` must be absent or an empty directory; a non-empty one raises
      ``FileExistsError`` naming it. With ``overwrite=True`` it may instead hold an earlier
      compaction output (files listed in its ``.es-stream-compact.json`` marker, or, for outputs
      from before the marker, only ``shard-*.tar`` / ``shard.*.mds`` / ``index.json`` /
      ``mapping.parquet``), which is replaced as a whole; a directory holding anything else is
      refused, naming the foreign file.
    * ``out_dir`` must not overlap the source: not a directory holding a source shard (for MDS,
      the corpus's local directory), not inside one, not containing one. Paths are compared after
      resolving symlinks; a clash raises ``ValueError`` naming both paths. ``pipe:`` and remote
      shards have no local directory and are not checked.
    * Shards, ``mapping.parquet`` and the marker are written into a hidden sibling
      ``.NAME.tmp-XXXX`` and renamed to ``out_dir`` only when all are complete and synced. On an
      error the temporary directory is removed; a killed run leaves ``out_dir`` as it was (absent,
      empty, or the previous output) plus that hidden directory, which a later run warns about
      and which may be deleted. With ``overwrite=True`` the new output and the old one swap
      places in one atomic ``renameat2(RENAME_EXCHANGE)`` (Linux; elsewhere the old one is
      renamed aside to ``.NAME.old-XXXX`` first), then the old one is deleted file by file.

    ``out_dir`` may be a symlink to a directory: the link is kept and its target replaced.

    An MDS corpus with a ``pkl`` column is refused (``ValueError``) unless
    ``allow_unsafe_types``: its values are unpickled to be written again, which runs code.
    """
    fmt = fmt or corpus.format
    if fmt not in ("wds", "mds"):
        raise ValueError(f"format must be 'wds' or 'mds', got {fmt!r}")
    if corpus.format == "mds" and fmt == "wds":
        raise ValueError("compacting an MDS corpus to WebDataset is not supported: MDS columns are "
                         "typed values, not files; use --format mds")
    target = os.path.realpath(os.fspath(out_dir))
    _check_no_overlap(corpus, os.fspath(out_dir), target)
    replaces = _check_target(target, overwrite)
    kept_ids = corpus.check_ids(kept_ids, "kept ids")
    if corpus.mds is not None:
        check_safe_columns(corpus.mds.index, corpus.mds.local, allow_unsafe_types,
                           "compact(..., allow_unsafe_types=True)")
    _warn_leftovers(target)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=parent)
    public_mode(tmp, directory=True)  # it becomes --out: readable as a mkdir'd directory is
    try:
        with naming(target):  # a full disk names the output, not only its errno
            _write_all(corpus, kept_ids, tmp, fmt, max_count, progress, allow_unsafe_types, typed)
            _move_into_place(tmp, target, replaces)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # ours alone: mkdtemp made it, hidden, this run
        raise
    return os.path.join(target, MAPPING)


def kept_ids_of(corpus: Corpus, manifest: str | os.PathLike | None) -> np.ndarray:
    """The ids to compact: those an epoch directory ``DIR/epoch=EEEEE`` keeps, or every id of
    the corpus when ``manifest`` is None (a whole-corpus conversion, e.g. tar to MDS)."""
    from .manifest import read_epoch

    if manifest is None:
        return np.arange(corpus.num_samples, dtype=np.int64)
    path = os.path.normpath(os.fspath(manifest))
    name = os.path.basename(path)
    if not name.startswith("epoch="):
        raise ValueError(f"{manifest}: expected an epoch directory, DIR/epoch=EEEEE")
    kept = read_epoch(os.path.dirname(path), int(name.split("=", 1)[1]), corpus.fingerprint,
                      corpus.shard_counts)
    if kept is None:
        raise FileNotFoundError(f"{manifest}: no such manifest directory")
    return kept.kept_ids


# ------------------------------------------------------------------ where the output may go
def _source_dirs(corpus: Corpus) -> list[str]:
    """Resolved directories the source is read from: every local shard's directory (wds) or
    the MDS local directory."""
    if corpus.mds is not None:  # the whole local cache: streaming may fetch any split into it
        return [os.path.realpath(corpus.mds.local)]
    dirs = set()
    for shard in corpus.shards:
        if is_local_url(shard.name):
            path = os.path.abspath(local_path(shard.name))
            # both where the shard is named and, if that is a symlink, where its bytes live
            dirs |= {os.path.realpath(os.path.dirname(path)), os.path.dirname(os.path.realpath(path))}
    return sorted(dirs)


def _check_no_overlap(corpus: Corpus, given: str, target: str) -> None:
    for source in _source_dirs(corpus):
        if target == source:
            how = "is the source directory"
        elif source.startswith(target.rstrip(os.sep) + os.sep):
            how = "contains the source directory"
        elif target.startswith(source.rstrip(os.sep) + os.sep):
            how = "lies inside the source directory"
        else:
            continue
        shown = given if os.path.realpath(given) == given else f"{given} (= {target})"
        raise ValueError(f"output {shown} {how} {source}: compaction would read and write the "
                         "same files; choose an --out outside the corpus")


def _check_target(target: str, overwrite: bool) -> bool:
    """Raise unless ``target`` may receive the output; True when it holds an earlier output that
    ``overwrite`` replaces."""
    if not os.path.lexists(target):
        return False
    if not os.path.isdir(target):
        raise FileExistsError(f"output {target} exists and is not a directory; choose another --out")
    entries = os.listdir(target)
    if not entries:
        return False
    if not overwrite:
        hint = ("it holds an earlier compaction output: pass --overwrite (overwrite=True) to "
                "replace it" if _foreign_entry(target) is None else
                "choose a new or empty directory")
        raise FileExistsError(f"output {target} is not empty ({len(entries)} entries, e.g. "
                              f"{sorted(entries)[0]}); {hint}")
    foreign = _foreign_entry(target)
    if foreign is not None:
        raise FileExistsError(f"output {target} holds {foreign}, which is not part of an earlier "
                              "compaction output; --overwrite only replaces a directory es-stream "
                              "compact wrote; choose a new or empty directory")
    return True


def _foreign_entry(directory: str) -> str | None:
    """The first entry of ``directory`` that is not part of a compaction output, or None when
    the directory is exactly an earlier output (ours to delete)."""
    entries = sorted(os.listdir(directory))
    marker = os.path.join(directory, MARKER)
    if os.path.isfile(marker):
        try:
            with open(marker) as f:
                allowed = set(json.load(f)["files"]) | {MARKER}
        except (OSError, ValueError, KeyError, TypeError):
            return MARKER + " (unreadable marker)"
    elif MAPPING in entries:
        allowed = {e for e in entries if _LEGACY_NAMES.fullmatch(e)}
    else:
        return f"{entries[0]} (no {MAPPING} or {MARKER})" if entries else None
    for entry in entries:
        path = os.path.join(directory, entry)
        if entry not in allowed or os.path.islink(path) or not os.path.isfile(path):
            return entry
    return None


def _warn_leftovers(target: str) -> None:
    parent, name = os.path.split(target)
    if not os.path.isdir(parent):
        return
    left = sorted(e for e in os.listdir(parent)
                  if e.startswith(f".{name}.tmp-") or e.startswith(f".{name}.old-"))
    if left:
        warnings.warn(f"{parent} holds {', '.join(left)}, left by an interrupted compaction into "
                      f"{target}; delete them if no other compaction is running", stacklevel=3)


# ------------------------------------------------------------------ writing aside, moving in
def _write_all(corpus: Corpus, kept_ids: np.ndarray, tmp: str, fmt: str, max_count: int,
               progress, allow_unsafe_types: bool, typed: bool) -> None:
    shards, positions = corpus.locate(kept_ids)
    reader = open_reader(corpus, allow_unsafe_types=allow_unsafe_types)
    rows = zip(kept_ids.tolist(), shards.tolist(), positions.tolist())
    if progress is not None:
        rows = progress(rows, total=len(kept_ids), desc="compact", unit="sample")
    try:
        if fmt == "wds":
            _write_wds(reader, rows, tmp, max_count)
        else:
            _write_mds(corpus, reader, rows, tmp, typed)
    finally:
        reader.close()
    pq.write_table(pa.table({"old_id": pa.array(kept_ids),
                             "new_id": pa.array(np.arange(len(kept_ids), dtype=np.int64))}),
                   os.path.join(tmp, MAPPING))
    files = sorted(os.listdir(tmp))
    with open(os.path.join(tmp, MARKER), "w") as f:
        json.dump({"es_stream_version": __version__, "format": fmt, "samples": len(kept_ids),
                   "files": files}, f)
    for name in files + [MARKER]:  # durable before the rename publishes them
        fsync_path(os.path.join(tmp, name))
    fsync_path(tmp)


def _move_into_place(tmp: str, target: str, replaces: bool) -> None:
    parent = os.path.dirname(target)
    if not replaces:
        try:
            os.rename(tmp, target)  # POSIX: succeeds over an empty directory, fails over any other
        except OSError as exc:
            raise FileExistsError(f"output {target} appeared or filled up while compacting "
                                  f"({exc.strerror}); nothing was changed there") from exc
        fsync_path(parent)
        return
    # re-check: the directory may have changed while the shards were being written
    foreign = _foreign_entry(target)
    if foreign is not None:
        raise FileExistsError(f"output {target} now holds {foreign}, which is not part of an "
                              "earlier compaction output; nothing was replaced")
    if _exchange(tmp, target):  # one atomic step: target is the old output, then the new one
        old = tmp
    else:  # no renameat2 here: move the old output aside, the new one in (a short window)
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-", dir=parent)
        os.rename(target, old)  # over the empty placeholder mkdtemp made
        try:
            os.rename(tmp, target)
        except BaseException:
            os.rename(old, target)  # put the previous output back
            raise
    fsync_path(parent)
    try:
        _remove_ours(old)
    except OSError as exc:  # the new output is in place; only the clean-up failed
        warnings.warn(f"replaced {target}, but could not delete the previous output moved to "
                      f"{old} ({exc}); delete it by hand", stacklevel=3)


def _exchange(a: str, b: str) -> bool:
    """Swap two paths atomically with Linux's ``renameat2(RENAME_EXCHANGE)``; False where the
    platform, C library or file system lacks it (the caller then renames twice)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), b)


def _remove_ours(directory: str) -> None:
    """Delete an earlier output moved aside: its plain files, then the directory. Anything else
    found inside (a subdirectory someone made meanwhile) is left, and so is the directory."""
    with contextlib.suppress(FileNotFoundError):
        for entry in os.listdir(directory):
            path = os.path.join(directory, entry)
            if os.path.isfile(path) or os.path.islink(path):
                os.unlink(path)
        with contextlib.suppress(OSError):
            os.rmdir(directory)


def _write_wds(reader, rows, out_dir: str, max_count: int) -> None:
    import webdataset as wds

    with wds.ShardWriter(os.path.join(out_dir, "shard-%06d.tar"), maxcount=max_count, verbose=0) as w:
        for sid, shard, pos in rows:
            sample = reader.read(shard, pos, sid)
            sample.pop("__url__", None)
            w.write(sample)  # bytes values are written as they are


def _write_mds(corpus: Corpus, reader, rows, out_dir: str, typed: bool) -> None:
    from streaming import MDSWriter

    # out_dir is the fresh temporary directory; exist_ok=False makes MDSWriter raise rather than
    # empty a directory should that ever not hold
    if corpus.format == "mds":
        first = corpus.mds.index["shards"][0]
        columns = dict(zip(first["column_names"], first["column_encodings"]))
        with MDSWriter(out=out_dir, columns=columns, exist_ok=False) as w:
            for sid, shard, pos in rows:
                w.write(reader.read(shard, pos, sid))
        return
    files = {s: column_encoding(s, typed) for s in corpus.tar.suffixes}
    columns = {"__key__": "str", **files}
    for suffix in corpus.tar.suffixes:
        _check_utf8(suffix, f"file suffix {suffix!r}")
    with MDSWriter(out=out_dir, columns=columns, exist_ok=False) as w:
        for sid, shard, pos in rows:
            sample = reader.read(shard, pos, sid)
            sample.pop("__url__", None)
            missing = set(columns) - set(sample)
            if missing:
                raise ValueError(f"sample id {sid} ({sample['__key__']}) lacks {sorted(missing)}: "
                                 "MDS needs every column in every sample; compact to wds instead")
            where = f"sample id {sid}'s key {sample['__key__']!r} (shard {corpus.shards[shard].name})"
            _check_utf8(sample["__key__"], where)
            for suffix, encoding in files.items():
                sample[suffix] = column_value(encoding, sample[suffix], f"{where}, file .{suffix}")
            w.write(sample)


def _check_utf8(name: str, what: str) -> None:
    """MDS stores keys and column names as UTF-8; a tar member name that is not UTF-8 (kept by
    webdataset as surrogate escapes) cannot be written there."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} is not valid UTF-8, which MDS requires; compact to wds "
                         "instead (tar keeps the name byte for byte)") from None
