"""Parquet shard manifests: the durable, inspectable record of what each epoch keeps.

Layout (fixed; other tools read it)::

    out_dir/epoch=EEEEE/shard=SSSSS.parquet    one file per shard, 5-digit zero-padded
    out_dir/epoch=EEEEE/_SUCCESS               written last: the epoch counts only then

Columns: ``sample`` (uint32, position in the shard), ``id`` (int64, global id), ``keep`` (bool),
``score`` (float32, the score the decision used) and ``weight`` (float32, the loss weight a kept
sample carries: 1, or InfoBatch's 1/(1-r)). Key-value metadata: ``corpus_fingerprint``,
``policy``, ``ratio``, ``seed``, ``epoch``, ``es_stream_version``, ``shard``, ``write_id``, and
for a decision made once before training (``es-stream prune --policy band|threshold``)
``applies_to: all``.

**Pruned once, for every epoch.** Such a decision is written as ``epoch=00000`` like any other;
its ``applies_to: all`` makes :func:`read_epoch` return it for every epoch that has no directory
of its own, so one decision serves all epochs without a manifest per epoch, and the layout (one
hive partition ``epoch=0``) stays what pyarrow and DuckDB read.
``sample`` and ``id`` are delta-encoded, so a manifest costs about 4.2 bytes per sample, almost
all of it the score. Read all epochs as one table with
``pyarrow.dataset.dataset(out_dir, partitioning="hive")`` (``epoch`` int32) or DuckDB's
``read_parquet('out_dir/*/*.parquet', hive_partitioning=true, hive_types={'epoch': INTEGER})``
(without ``hive_types`` DuckDB reads ``epoch`` as the string ``'00002'``; add ``order by epoch``
for the epochs in order).

**Rewritten by other tools.** :func:`read_epoch` places rows by their ``id``, not by row
position, so a manifest re-ordered (or filtered and re-written) by pyarrow, DuckDB or Spark reads
the same as long as each shard file still holds each of its shard's ids exactly once. It checks
the schema: ``id`` integer, ``keep`` bool (a string ``"false"`` would count as kept, so strings
and integers are refused), ``weight`` float, ``score`` float when present, no nulls; a kept
sample's weight must be finite and > 0. Anything else raises :class:`ManifestError` naming the
file and the column. An epoch that keeps no sample at all is refused too: training on nothing is
never what a pruner meant. (Rewriting a file keeps the checks' inputs only if the key-value
metadata survives: pyarrow keeps it, DuckDB's ``COPY`` drops it, which the reader reports as a
manifest of another corpus.)

**One writer per epoch; readers never see two.** A writer holds an exclusive ``flock`` on
``epoch=EEEEE/.writer.lock`` for the whole write (:func:`epoch_writer`); a second writer of the
same epoch is refused at once, before it touches anything, with an error naming the directory.
The kernel drops the lock of a killed writer, so a crash never leaves a stale lock (the lock
file it leaves, naming its pid, is reused and removed by the next writer that finishes). Every shard file
and ``_SUCCESS`` (a second line ``write_id <hex>``) carry the write's id, a digest of everything
that decides the epoch (corpus, policy, epoch, scores; see ``Pruner.write``), so rewriting the
same decision gives byte-identical files; the reader refuses an epoch whose files carry another
id than ``_SUCCESS`` (a mix of two decisions: a file copied in, or two writers on a filesystem
where ``flock`` does not reach across machines). Manifests of es-stream versions that wrote no
write id (nothing in ``_SUCCESS``, nothing in the files) still read; a mix of files with and
without one is refused.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .atomic import atomic_write
from ._version import __version__
from .errors import ManifestError, naming, with_path

log = logging.getLogger(__name__)

SUCCESS = "_SUCCESS"
LOCK = ".writer.lock"  # a dot file: pyarrow.dataset, Spark and DuckDB's *.parquet globs skip it
WRITE_ID = "write_id"
APPLIES_TO = "applies_to"  # "all": epoch 0's decision holds for every epoch (a reference band)
_READ_THREADS = min(8, os.cpu_count() or 1)

# column -> (type test, what is expected); the reader needs id, keep and weight
_REQUIRED = {"id": (pa.types.is_integer, "an integer type (int64)"),
             "keep": (pa.types.is_boolean, "bool (write true/false, not strings or 0/1)"),
             "weight": (pa.types.is_floating, "a float type (float32)")}
_OPTIONAL = {"score": (pa.types.is_floating, "a float type (float32)")}


def epoch_dir(out_dir: str | os.PathLike, epoch: int) -> str:
    return os.path.join(os.fspath(out_dir), f"epoch={epoch:05d}")


def shard_file(out_dir: str | os.PathLike, epoch: int, shard: int) -> str:
    return os.path.join(epoch_dir(out_dir, epoch), f"shard={shard:05d}.parquet")


def write_shard(path: str, first_id: int, keep: np.ndarray, score: np.ndarray,
                weight: np.ndarray, metadata: dict[str, str],
                extra: dict[str, np.ndarray] | None = None) -> None:
    """Write one shard's manifest atomically; ``extra``: more columns after the standard ones
    (readers ignore them; e.g. dedup's ``reason``)."""
    n = len(keep)
    table = pa.table({
        "sample": pa.array(np.arange(n, dtype=np.uint32)),
        "id": pa.array(np.arange(first_id, first_id + n, dtype=np.int64)),
        "keep": pa.array(keep.astype(bool)),
        "score": pa.array(score.astype(np.float32)),
        "weight": pa.array(weight.astype(np.float32)),
        **{name: pa.array(values) for name, values in (extra or {}).items()},
    }).replace_schema_metadata({k.encode(): v.encode() for k, v in metadata.items()})
    with naming(path), atomic_write(path) as tmp:
        pq.write_table(table, tmp, compression="zstd",
                       use_dictionary=["keep", "weight", *(extra or {})],
                       column_encoding={"sample": "DELTA_BINARY_PACKED", "id": "DELTA_BINARY_PACKED",
                                        "score": "BYTE_STREAM_SPLIT"})


def mark_success(out_dir: str | os.PathLike, epoch: int, write_id: str | None = None) -> None:
    """Publish the epoch: write ``_SUCCESS``, recording ``write_id`` (the id every shard file of
    this write carries) on its second line."""
    path = os.path.join(epoch_dir(out_dir, epoch), SUCCESS)
    with naming(path), atomic_write(path) as tmp:
        with open(tmp, "w") as f:
            f.write(f"es-stream {__version__}\n")
            if write_id is not None:
                f.write(f"{WRITE_ID} {write_id}\n")


def clear_success(out_dir: str | os.PathLike, epoch: int) -> None:
    """Un-publish an epoch before rewriting it, so readers never mix old and new files; also
    remove temporary files a killed writer left there (``.<name>.<random>.tmp``). Call it only
    inside :func:`epoch_writer`: the lock is what makes those files a dead writer's, not a live
    one's."""
    directory = epoch_dir(out_dir, epoch)
    try:
        os.unlink(os.path.join(directory, SUCCESS))
    except FileNotFoundError:
        pass
    if os.path.isdir(directory):
        for name in os.listdir(directory):
            if name.startswith(".") and name.endswith(".tmp"):
                os.unlink(os.path.join(directory, name))


# ------------------------------------------------------------------ the writer lock
@contextlib.contextmanager
def epoch_writer(out_dir: str | os.PathLike, epoch: int) -> Iterator[str]:
    """Hold epoch ``epoch``'s writer lock for the ``with`` block; yields the epoch directory
    (created if needed).

    Raises :class:`ManifestError` at once, naming the directory and the holder, when another
    writer (another process, or another ``epoch_writer`` in this one) holds it: two pruners
    writing one epoch would delete each other's temporary files and publish a mix of two
    decisions. Non-blocking on purpose: the other writer's decision would overwrite this one's
    (or the reverse), so waiting would not make either right. On filesystems without ``flock``
    the write goes ahead with a warning; the write ids still keep readers from a mix.
    """
    directory = epoch_dir(out_dir, epoch)
    os.makedirs(directory, exist_ok=True)
    fd = _lock(directory)
    try:
        yield directory
    finally:
        _unlock(directory, fd)


def _lock(directory: str) -> int | None:
    path = os.path.join(directory, LOCK)
    for _ in range(100):  # more than one round only when holders finish under our feet
        with naming(path):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise ManifestError(
                f"{directory}: another writer is writing this epoch ({holder} holds {LOCK}); "
                "two pruners must not write one epoch — let the other finish, or give this one "
                "its own manifest directory") from None
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                log.warning("%s: cannot lock %s (%s); writing without the writer lock — make sure "
                            "no other pruner writes this epoch", directory, LOCK, exc)
                return None
            raise with_path(exc, path) from exc
        # a finishing holder unlinks the file before unlocking it: if we locked an unlinked
        # file, the lock means nothing — lock the file now at the path instead
        try:
            at = _is_at(fd, path)
        except OSError as exc:
            os.close(fd)
            raise with_path(exc, path) from exc
        if not at:
            os.close(fd)
            continue
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        except BaseException as exc:  # e.g. a full disk: the lock must not outlive this call
            _unlock(directory, fd)
            if isinstance(exc, OSError):
                raise with_path(exc, path) from exc
            raise
        return fd
    raise ManifestError(f"{directory}: could not take {LOCK}: other writers keep replacing it; "
                        "run one pruner per manifest directory and epoch")


def _is_at(fd: int, path: str) -> bool:
    """Whether the open file ``fd`` is still the one at ``path``."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _holder(fd: int) -> str:
    """Who holds the lock, as the holder wrote it into the lock file."""
    with contextlib.suppress(OSError):
        text = os.pread(fd, 200, 0).decode(errors="replace").strip()
        if text:
            return text
    return "another process"


def _unlock(directory: str, fd: int | None) -> None:
    if fd is None:
        return
    try:  # unlink while still holding the lock: see _lock
        os.unlink(os.path.join(directory, LOCK))
    except FileNotFoundError:
        pass
    finally:
        os.close(fd)  # closing the last descriptor drops the flock


# ------------------------------------------------------------------ the reader
@dataclass
class EpochKeep:
    """What one epoch keeps: sorted ``kept_ids`` and, when any differ from 1, their weights."""

    epoch: int
    kept_ids: np.ndarray
    weights: np.ndarray | None
    num_samples: int

    @property
    def kept_fraction(self) -> float:
        return len(self.kept_ids) / self.num_samples


def read_epoch(out_dir: str | os.PathLike, epoch: int, fingerprint: str,
               shard_counts: Iterable[int]) -> EpochKeep | None:
    """Read epoch ``epoch``'s manifests for a corpus (its fingerprint and shard sizes).

    Returns None when the epoch has no directory (nothing pruned). Raises
    :class:`ManifestError`, naming the file (and the column), for an epoch without ``_SUCCESS``,
    a missing or unreadable shard file, a manifest of another corpus, a shard whose row count
    differs from the corpus, a missing column or one of the wrong type, nulls, ids that are not
    exactly the shard's own (each once, in any order), a kept sample whose weight is not finite
    and positive, files of two different writes, or an epoch that keeps no sample.
    """
    directory = epoch_dir(out_dir, epoch)
    if not os.path.isdir(directory):
        if epoch != 0 and applies_to_all(out_dir):  # a decision made once, for every epoch
            keep = read_epoch(out_dir, 0, fingerprint, shard_counts)
            return None if keep is None else EpochKeep(epoch, keep.kept_ids, keep.weights,
                                                       keep.num_samples)
        return None
    expected_id = _success_write_id(directory)
    counts = [int(c) for c in shard_counts]
    firsts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])

    def read(shard: int) -> _ShardKeep:
        return _read_shard_file(shard_file(out_dir, epoch, shard), shard, epoch, int(firsts[shard]),
                                counts[shard], fingerprint)

    n = int(firsts[-1])
    # each shard's part is copied into the result as it arrives, so the epoch is held once (a
    # list of parts joined at the end held it twice: 18 GB for an InfoBatch epoch of 1e9
    # samples). The result is sized for every sample and cut to the kept count: np.empty's
    # pages that are never written cost no memory.
    kept_ids = np.empty(n, np.int64)
    weights: np.ndarray | None = None  # allocated at the first shard that has weights
    pos = 0
    # threads: pyarrow decodes without the GIL, and an epoch is hundreds of small files;
    # map yields in shard order, so the first bad shard is the one reported
    pool = ThreadPoolExecutor(min(_READ_THREADS, max(1, len(counts))))
    try:
        for shard, got in enumerate(pool.map(read, range(len(counts)))):
            if shard == 0 and expected_id is None:  # an old _SUCCESS: the files must still agree
                expected_id = got.write_id
            if got.write_id != expected_id:
                raise ManifestError(
                    f"{got.path}: written by write {got.write_id!r}, {SUCCESS} marks write "
                    f"{expected_id!r}: the epoch mixes files of two writes (two pruners at once, or "
                    f"a file copied in); re-run the pruning step for epoch {epoch}")
            stop = pos + len(got.kept_ids)
            kept_ids[pos:stop] = got.kept_ids
            if got.weights is not None and weights is None:
                weights = np.empty(n, np.float32)
                weights[:pos] = 1.0
            if weights is not None:
                weights[pos:stop] = 1.0 if got.weights is None else got.weights
            pos = stop
    finally:
        pool.shutdown(cancel_futures=True)
    if n > 0 and pos == 0:
        raise ManifestError(f"{directory}: epoch {epoch} keeps no sample (every 'keep' is false); "
                            "re-run the pruning step with a ratio below 1, or delete the directory "
                            "to train on every sample")
    return EpochKeep(epoch, kept_ids[:pos], None if weights is None else weights[:pos], n)


@dataclass
class _ShardKeep:
    path: str
    write_id: str | None
    kept_ids: np.ndarray  # global ids, ascending
    weights: np.ndarray | None  # of kept_ids; None when all are 1


def _read_shard_file(path: str, shard: int, epoch: int, first: int, count: int,
                     fingerprint: str) -> _ShardKeep:
    pf = _open(path, shard, epoch)
    meta = {k.decode(): v.decode() for k, v in (pf.schema_arrow.metadata or {}).items()}
    if meta.get("corpus_fingerprint") != fingerprint:
        raise ManifestError(f"{path}: manifest of corpus {meta.get('corpus_fingerprint')!r}, "
                            f"this corpus is {fingerprint!r}; point manifests= at this "
                            "corpus's manifest directory")
    keep, weight = _read_shard(pf, path, shard, first, count)
    idx = np.flatnonzero(keep)
    ids = idx.astype(np.int64) + first
    w = None
    if weight is not None:
        w = weight[idx].astype(np.float32, copy=False)
        _check_weights(path, w, ids)
        if (w == 1).all():
            w = None
    return _ShardKeep(path, meta.get(WRITE_ID), ids, w)


def _success_write_id(directory: str) -> str | None:
    """The write id ``_SUCCESS`` records (None for a manifest written without one)."""
    try:
        with open(os.path.join(directory, SUCCESS)) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise ManifestError(f"{directory}: no {SUCCESS} marker — the epoch's manifests were not "
                            "finished (a crash while writing?); re-run the pruning step or delete "
                            "the directory to keep everything") from None
    for line in lines:
        key, _, value = line.partition(" ")
        if key == WRITE_ID and value.strip():
            return value.strip()
    return None


def _open(path: str, shard: int, epoch: int) -> pq.ParquetFile:
    try:
        pf = pq.ParquetFile(path)
    except FileNotFoundError as exc:
        raise ManifestError(f"{path}: manifest missing for shard {shard} of epoch {epoch}; "
                            "the epoch directory is incomplete — re-run the pruning step") from exc
    except (pa.ArrowException, OSError) as exc:
        raise ManifestError(f"{path}: not a readable Parquet file ({exc}); the manifest of shard "
                            f"{shard} of epoch {epoch} is damaged or was replaced — re-run the "
                            "pruning step") from exc
    _check_schema(path, pf.schema_arrow)
    return pf


def _check_schema(path: str, schema: pa.Schema) -> None:
    for name, (ok, expected) in {**_REQUIRED, **_OPTIONAL}.items():
        found = schema.get_all_field_indices(name)
        if not found:
            if name in _REQUIRED:
                raise ManifestError(f"{path}: no column '{name}' (columns: {', '.join(schema.names)}); "
                                    f"a manifest needs {', '.join(map(repr, _REQUIRED))}: keep them "
                                    "when rewriting a manifest, or re-run the pruning step")
            continue
        if len(found) > 1:
            raise ManifestError(f"{path}: column '{name}' appears {len(found)} times")
        type_ = schema.field(found[0]).type
        if not ok(type_):
            raise ManifestError(f"{path}: column '{name}' is {type_}, expected {expected}; "
                                "cast it when rewriting the manifest")


def _read_shard(pf: pq.ParquetFile, path: str, shard: int, first: int,
                count: int) -> tuple[np.ndarray, np.ndarray | None]:
    """``keep`` and ``weight`` (None: all 1) of one shard file, indexed by position in the shard."""
    if pf.metadata.num_rows != count:
        raise ManifestError(f"{path}: {pf.metadata.num_rows} rows, shard {shard} has {count} samples")
    unit = _all_ones(pf, "weight")  # the footer's statistics say so: skip the column
    columns = ["id", "keep"] if unit else ["id", "keep", "weight"]
    try:
        # one thread: a shard's columns are small, and the thread pool's hand-offs cost more
        # than decoding them (measured: 2M samples in 200 files read 2x faster)
        table = pf.read(columns=columns, use_threads=False)
    except (pa.ArrowException, OSError) as exc:
        raise ManifestError(f"{path}: unreadable ({exc}); re-run the pruning step") from exc
    for name in columns:
        nulls = table.column(name).null_count
        if nulls:
            raise ManifestError(f"{path}: column '{name}' has {nulls} null value"
                                f"{'s' if nulls > 1 else ''}; every row needs one")
    ids = table.column("id").to_numpy().astype(np.int64, copy=False)
    keep = table.column("keep").to_numpy(zero_copy_only=False)
    weight = None if unit else table.column("weight").to_numpy()
    pos = _positions(path, shard, ids, first, count)
    if pos is not None:  # rows out of the writer's order: put each where its id says
        keep = _place(keep, pos)
        weight = None if weight is None else _place(weight, pos)
    return keep, weight


def _positions(path: str, shard: int, ids: np.ndarray, first: int, count: int) -> np.ndarray | None:
    """Each row's position in the shard (``id - first``), or None when the rows are already in
    the writer's order (the fast path: no scatter). Raises unless ids are the shard's own, once."""
    stop = first + count
    # count strictly increasing integers from first to stop - 1 are exactly that range
    if count == 0 or (ids[0] == first and ids[-1] == stop - 1 and bool((ids[1:] > ids[:-1]).all())):
        return None
    pos = ids - first
    outside = np.flatnonzero((pos < 0) | (pos >= count))
    if len(outside):
        raise ManifestError(f"{path}: column 'id' holds id {ids[outside[0]]}, outside shard "
                            f"{shard}'s ids [{first}, {stop}); 'id' is the corpus-wide sample id, "
                            "each of the shard's ids exactly once")
    seen = np.bincount(pos, minlength=count)
    if (seen != 1).any():
        dup, missing = np.flatnonzero(seen > 1)[0], np.flatnonzero(seen == 0)[0]
        raise ManifestError(f"{path}: column 'id' repeats id {first + dup} and lacks id "
                            f"{first + missing}; each of shard {shard}'s ids [{first}, {stop}) "
                            "must appear exactly once")
    return pos


def _place(values: np.ndarray, pos: np.ndarray) -> np.ndarray:
    out = np.empty_like(values)
    out[pos] = values
    return out


def _check_weights(path: str, weights: np.ndarray, ids: np.ndarray) -> None:
    bad = np.flatnonzero(~(np.isfinite(weights) & (weights > 0)))
    if len(bad):
        raise ManifestError(f"{path}: column 'weight' is {weights[bad[0]]} for kept id {ids[bad[0]]}; "
                            "a kept sample's loss weight must be finite and > 0")


def _all_ones(pf: pq.ParquetFile, column: str) -> bool:
    """Whether every row group's statistics give ``column`` min == max == 1 (ESWP's weights).

    Parquet statistics leave NaN out, so a NaN among weights otherwise all 1 reads as 1 here —
    the one value this fast path cannot see; es-stream's writer never writes one."""
    md = pf.metadata
    # the Parquet leaf column of that name (a rewrite may have put nested columns before it)
    j = next((i for i in range(md.num_columns) if md.schema.column(i).path == column), None)
    if j is None:
        return False
    stats = [md.row_group(i).column(j).statistics for i in range(md.num_row_groups)]
    return md.num_row_groups > 0 and all(
        st is not None and st.has_min_max and st.null_count == 0 and st.min == 1 and st.max == 1
        for st in stats)


def read_columns(path: str | os.PathLike, columns: list[str]) -> dict[str, np.ndarray]:
    """``columns`` of one manifest file as numpy arrays, the file checked as :func:`read_epoch`
    checks it (a Parquet file, the columns present, of their types, without nulls): anything
    else is a :class:`ManifestError` naming the file and the column. For tools that summarise
    manifests (``es-stream inspect``) without trusting them."""
    path = os.fspath(path)
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise ManifestError(f"{path}: not a readable Parquet file ({exc}); re-run the pruning "
                            "step that wrote it") from exc
    _check_schema(path, pf.schema_arrow)
    missing = [c for c in columns if c not in pf.schema_arrow.names]
    if missing:
        raise ManifestError(f"{path}: no column '{missing[0]}' (columns: "
                            f"{', '.join(pf.schema_arrow.names)})")
    try:
        table = pf.read(columns=columns, use_threads=False)
    except (pa.ArrowException, OSError) as exc:
        raise ManifestError(f"{path}: unreadable ({exc}); re-run the pruning step") from exc
    out = {}
    for name in columns:
        column = table.column(name)
        if column.null_count:
            raise ManifestError(f"{path}: column '{name}' has {column.null_count} null value(s); "
                                "every row needs one")
        out[name] = column.to_numpy(zero_copy_only=False)
    return out


def applies_to_all(out_dir: str | os.PathLike) -> bool:
    """Whether ``out_dir/epoch=00000`` holds a decision made once for every epoch (its shard
    files' metadata says ``applies_to: all``: ``es-stream prune --policy band`` or
    ``threshold``). Then :func:`read_epoch` gives that decision for any epoch that has no
    directory of its own; an epoch written later (``epoch=00003``) still takes precedence."""
    path = shard_file(out_dir, 0, 0)
    try:
        meta = pq.read_schema(path).metadata or {}
    except (FileNotFoundError, pa.ArrowException, OSError):
        return False
    return meta.get(APPLIES_TO.encode()) == b"all"


def list_epochs(out_dir: str | os.PathLike) -> list[int]:
    """Epochs with a finished (``_SUCCESS``) manifest directory, ascending."""
    out = []
    for name in os.listdir(out_dir):
        if name.startswith("epoch=") and os.path.exists(os.path.join(out_dir, name, SUCCESS)):
            out.append(int(name.split("=", 1)[1]))
    return sorted(out)


# ------------------------------------------------------------------ the run that wrote them
#: beside the epoch directories: which run (pruner settings) writes this directory. A name
#: starting with "_": pyarrow.dataset and Spark skip it, DuckDB's ``*/*.parquet`` never sees it

