"""`ScoreStore`: one float32 score per sample, indexed by global sample id."""

from __future__ import annotations

import json
import mmap
import os
import re
import warnings
import weakref
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist

from ._atomic import atomic_write
from ._check import int_at_least
from ._version import __version__
from .errors import ScoreError
from .writebuffer import WriteBuffer

# Both backings hold 0.0 for "never updated since the store was created" (the memory-mapped
# store is created sparse, all zero bytes, so that costs nothing up front); reads return 1/n for
# it. A real score of exactly 0 is kept as the smallest normal float32 instead, so it never
# collides with that sentinel.
_TINY = float(np.finfo(np.float32).tiny)
# Whole-store passes (save, restore, pruning) go this many scores at a time: 64 MiB.
CHUNK = 1 << 24
# atomic_write's temporary files: ".<name>.<tempfile's 8 random characters>.tmp"
_TEMPORARY = r"\.{name}\.[a-z0-9_]+\.tmp"
_CHECK_LOSS = ("a loss that overflowed or diverged reached the store: check the training loss "
               "(ESSelector.check_finite() on a GPU), then restore the scores from a checkpoint "
               "(Checkpointer.load(store=...)) before going on")


class PendingWriter(Protocol):
    """Something holding score updates not yet in the store (the GPU feedback channel)."""

    def flush(self) -> None: ...


def as_index(ids: Any, argument: str = "ids") -> torch.Tensor:
    """``ids`` (a tensor, numpy array or sequence of integers) as an int64 tensor, on the
    tensor's own device; anything but integers is refused with a :class:`TypeError`."""
    if not isinstance(ids, torch.Tensor):
        arr = np.asarray(ids)
        if arr.size == 0:
            arr = arr.astype(np.int64)
        if arr.dtype.kind not in "iu":
            raise TypeError(f"{argument} must be integer sample ids, got {arr.dtype} values")
        ids = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.int64))
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{argument} must be an integer tensor of sample ids, got dtype {ids.dtype}")
    return ids.long()


def positive_int(value: Any, argument: str, what: str = "a positive integer") -> int:
    """``value`` as an int >= 1 (numpy integers too), else a ValueError naming ``argument``."""
    return int_at_least(value, 1, argument, what)


# ------------------------------------------------------------------ files
def metadata_path(path: str | os.PathLike) -> str:
    """The metadata file beside a saved store: ``scores.npy`` -> ``scores.meta.json``."""
    path = os.fspath(path)
    return (path[:-4] if path.endswith(".npy") else path) + ".meta.json"


def read_metadata(path: str | os.PathLike) -> dict[str, Any] | None:
    """The metadata :meth:`ScoreStore.save` wrote beside ``path``; None when there is none (a
    ``.npy`` made another way)."""
    meta = metadata_path(path)
    try:
        with open(meta, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        return None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError both are
        data = exc
    if not isinstance(data, dict):
        raise ScoreError(f"{meta}: not the metadata of a score store ({data}); it should be the "
                         f"JSON ScoreStore.save writes beside {os.fspath(path)} — delete it to use "
                         "the scores unchecked, or save the store again")
    return data


def _write_metadata(path: str, num_samples: int, fingerprint: str | None,
                    reference: dict[str, Any] | None = None) -> None:
    meta = {"format": "es-stream score store",
            "encoding": "float32 per sample id; 0.0 = never scored (reads as 1/num_samples)",
            "num_samples": num_samples, "corpus_fingerprint": fingerprint,
            "es_stream_version": __version__}
    if reference is not None:  # a reference-model pass wrote these scores (es_stream.score)
        meta["reference"] = reference
    with atomic_write(metadata_path(path)) as tmp:
        with open(tmp, "w") as f:
            f.write(json.dumps(meta, indent=1, sort_keys=True) + "\n")


def _remove_stale_temporaries(path: str) -> None:
    """Remove the temporary files a killed save (or creation) of ``path`` left beside it: only
    names of atomic_write's pattern for this file or its metadata, never anything else."""
    directory = os.path.dirname(os.path.abspath(path)) or "."
    names = [os.path.basename(path), os.path.basename(metadata_path(path))]
    pattern = re.compile("|".join(_TEMPORARY.format(name=re.escape(n)) for n in names))
    try:
        entries = os.listdir(directory)
    except FileNotFoundError:
        return
    for entry in entries:
        if pattern.fullmatch(entry):
            try:
                os.unlink(os.path.join(directory, entry))
            except FileNotFoundError:
                pass


def saved_length(path: str | os.PathLike) -> tuple[int, int]:
    """``(number of scores, byte offset of the data)`` of a score file (a float32 ``.npy``
    vector), checked; a :class:`ScoreError` naming ``path`` for anything else."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version in ((2, 0), (3, 0)):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
            offset = f.tell()
    except ValueError as exc:
        raise ScoreError(f"{path}: not a .npy score file ({exc}); give the file ScoreStore.save "
                         "or Checkpointer wrote (a float32 .npy, one score per sample id)") from exc
    if dtype != np.float32 or len(shape) != 1 or fortran:
        raise ScoreError(f"{path}: holds {dtype} {shape}, expected a float32 vector of one score "
                         "per sample id; not a score store (np.save(path, scores.astype("
                         "np.float32)) makes one from your own scores)")
    expected = offset + 4 * shape[0]
    size = os.path.getsize(path)
    if size != expected:
        raise ScoreError(f"{path}: {size} bytes, expected {expected}: the file is truncated; "
                         "restore it from a checkpoint's scores.npy")
    return shape[0], offset


def _check_length(path: str, held: int, num_samples: int) -> None:
    if held != num_samples:
        raise ScoreError(f"{path}: holds float32 ({held},), expected float32 ({num_samples},): a "
                         "score store of another corpus")


def _file_fingerprint(path: str, num_samples: int, expected: str | None) -> tuple[str | None, bool]:
    """The corpus ``path``'s metadata records (None if none) and whether it has metadata at
    all; raises if it records another corpus than ``expected`` or another size."""
    meta = read_metadata(path)
    if meta is None:
        if expected is not None:
            warnings.warn(f"{path}: no {os.path.basename(metadata_path(path))} beside it records "
                          f"which corpus these scores belong to, so they cannot be checked against "
                          f"corpus {expected}; used as they are (ScoreStore.save writes that file)",
                          stacklevel=3)
        return None, False
    if meta.get("num_samples", num_samples) != num_samples:
        raise ScoreError(f"{metadata_path(path)}: records {meta['num_samples']} samples but "
                         f"{path} holds {num_samples}: the two files do not belong together")
    recorded = meta.get("corpus_fingerprint")
    if recorded is not None and expected is not None and recorded != expected:
        raise ScoreError(f"{path}: scores of corpus {recorded} (per {metadata_path(path)}), this "
                         f"corpus is {expected}: a score store of another corpus of the same size; "
                         "give the scores saved for this corpus")
    return recorded, True


class _MappedScores:
    """A float32 ``.npy`` file mapped into memory, with page release for bounded residency."""

    def __init__(self, path: str, num_samples: int) -> None:
        held, self.offset = saved_length(path)
        _check_length(path, held, num_samples)
        expected = self.offset + 4 * num_samples
        self.fd = os.open(path, os.O_RDWR)
        self.map = mmap.mmap(self.fd, expected)
        self.array = np.ndarray((num_samples,), np.float32, buffer=self.map, offset=self.offset)

    def release(self, start: int, stop: int) -> None:
        """Drop this process's mapping of ids ``[start, stop)`` (whole pages inside only). The
        data stays in the page cache, dirty pages included, and is written back by the kernel:
        this bounds the process's resident set, not what the file holds."""
        page = mmap.PAGESIZE
        lo = -(-(self.offset + 4 * start) // page) * page
        hi = (self.offset + 4 * stop) // page * page
        if hi > lo:
            self.map.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def flush(self) -> None:
        self.map.flush()


def _create_sparse(path: str, num_samples: int) -> None:
    """A ``.npy`` header and a hole of ``4 n`` bytes: seconds for any size, created atomically."""
    with atomic_write(path) as tmp:
        with open(tmp, "wb") as f:
            np.lib.format.write_array_header_1_0(
                f, {"descr": "<f4", "fortran_order": False, "shape": (num_samples,)})
            f.truncate(f.tell() + 4 * num_samples)


def _encode(values: np.ndarray) -> np.ndarray:
    """Scores as stored: a real 0 becomes the smallest normal float32 (0.0 means never scored)."""
    values = np.asarray(values, dtype=np.float32)
    return np.where(values == 0, np.float32(_TINY), values)


def _decode(raw: np.ndarray, initial: float) -> np.ndarray:
    """Stored values as scores: never scored (0.0) reads as ``initial``. Always a new array."""
    values = np.array(raw, dtype=np.float32)  # copy and mask: twice as fast as np.where
    values[raw == 0] = initial
    return values


def _refuse_nonfinite(values: np.ndarray, ids: Any, start: int, source: str, what: str) -> None:
    """Raise a :class:`ScoreError` if any of ``values`` (for ``ids``, else ids ``start, ...``)
    is NaN or infinite; one vectorised pass when all is well."""
    finite = np.isfinite(values)
    if finite.all():
        return
    bad = np.flatnonzero(~finite)
    first = int(ids[int(bad[0])]) if ids is not None else start + int(bad[0])
    raise ScoreError(f"{source}: {len(bad)} non-finite score(s) {what}, the first for sample id "
                     f"{first} ({values[bad[0]]}); {_CHECK_LOSS}")


class RangeReader:
    """A store's scores and never-scored masks range by range, for one whole-store pass (a
    pruning decision): the stored values of a range are read once for both questions."""

    def __init__(self, store: "ScoreStore") -> None:
        self.store = store
        self._range: tuple[int, int] | None = None
        self._raw = np.empty(0, np.float32)

    def _read(self, start: int, stop: int) -> np.ndarray:
        if self._range != (start, stop):
            self.store.sync()
            self._raw, self._range = self.store._read_raw(start, stop), (start, stop)
        return self._raw

    def scores(self, start: int, stop: int) -> np.ndarray:
        """Scores of ids ``start .. stop-1`` (1/n for never-scored samples), a new array."""
        return _decode(self._read(start, stop), self.store.initial)

    def scored(self, start: int, stop: int) -> np.ndarray:
        """True where the sample's score was ever set (see :class:`ScoreStore`)."""
        return self._read(start, stop) != 0


class ScoreStore:
    """Dense per-sample scores, initialised to ``1/n``; 4 bytes per sample.

    Two backings, one interface:

    * in memory, a torch tensor on any device (``ScoreStore(n, device="cuda")``): gather and
      scatter run on that device with no host synchronisation;
    * memory-mapped, ``ScoreStore.open(path, n)``: a ``.npy`` file created sparse, for corpora
      whose scores do not fit in memory (1e9 samples: a 4 GB file). Updates go to an in-memory
      :class:`~es_stream.writebuffer.WriteBuffer` of ``buffer_size`` entries (12 bytes each)
      and reach the file sorted, in one pass, when it fills, at :meth:`sync`/:meth:`flush`,
      or when the store is closed or the interpreter exits; gathers see them at once. (The
      live file is working state: a killed process loses the buffered updates, so resume from
      a checkpoint's copy, :class:`es_stream.Checkpointer`.) After each pass the process's
      mapping of the file is released (``MADV_DONTNEED``), so its resident set stays bounded
      (see ``tools/bench_store.py``).

    Ids must be unique within one :meth:`scatter` call (a meta-batch never repeats an id); ids
    may be tensors, numpy integer arrays or sequences of ints.
    Point reads (:meth:`gather`) see the store's own updates at once; updates still in flight in
    a GPU feedback channel (:class:`es_stream.FeedbackChannel`) are committed before any
    whole-store read (:meth:`read_range`, :meth:`save`, :meth:`state_dict`, pruning).

    **Never scored.** A sample is *never scored* while its score has not been set (by
    :meth:`scatter`, :meth:`write_range`, a restore or a rank merge) since the store was
    created. Both backings hold 0.0 for it, and every read returns ``1/n``, the ES prior; a
    score set to exactly 0 is kept as the smallest normal float32 (1.2e-38) instead, so the two
    never collide. On a GPU the swap of 0 and ``1/n`` runs on the device, with no host
    synchronisation. :meth:`scored_range` tells which samples are scored; the pruning policies
    keep never-scored samples (nothing says they are easy). Files written by :meth:`save` use the
    same encoding, so never-scored samples survive saves, checkpoints and restores (``np.load``
    of such a file shows 0.0 for them; ``ScoreStore.load(path).to_numpy()`` shows ``1/n``).

    **Corpus.** A store may know the fingerprint of the corpus it scores
    (:attr:`fingerprint`): given as ``fingerprint=`` (``Corpus.fingerprint``), learnt from a
    file it opens, loads or restores, or set by :meth:`bind` (:class:`es_stream.Pruner` and
    ``ESSelector(..., fingerprint=...)`` bind it). :meth:`save` records it, with the size and
    the es-stream version, in a JSON file beside the scores (:func:`metadata_path`:
    ``scores.npy`` -> ``scores.meta.json``) that is put in place before the ``.npy``. Opening,
    loading or restoring a file recorded for another corpus raises
    :class:`~es_stream.ScoreError` naming both fingerprints and the file; a ``.npy`` without
    that file (made with numpy) is accepted, with a warning when there is a corpus to check.

    **Bad values.** NaN and infinite scores are refused with a :class:`~es_stream.ScoreError`
    naming the first sample id wherever that costs no host synchronisation: :meth:`scatter`
    with values on the CPU (a host store, or values given on the CPU), :meth:`write_range`,
    :meth:`restore`, :meth:`load_state_dict`. Updates from GPU values to a GPU store are not
    checked per step; the pruning policies check every score they read.

    **Files.** One writer per path. :meth:`save` and :meth:`open` first remove the temporary
    files a killed save or creation of the same path left beside it (``.NAME.<random>.tmp``,
    for the ``.npy`` and its metadata; nothing else).

    Under ``torch.distributed`` with more than one rank the store logs which ids it updated, so
    that :func:`es_stream.merge_rank_scores` can share them at the epoch's end.
    """

    def __init__(self, num_samples: int, device: torch.device | str | None = None, *,
                 fingerprint: str | None = None, _path: str | None = None,
                 buffer_size: int = 1 << 23) -> None:
        self.num_samples = positive_int(num_samples, "num_samples")
        self.initial = 1.0 / self.num_samples
        self.path = _path
        self.fingerprint: str | None = None
        # who scored: {"scorer": identity, "complete": bool, ...} for a reference-model pass
        # (es_stream.score_corpus), recorded in the metadata; None for training scores
        self.reference: dict[str, Any] | None = None
        self._scores: torch.Tensor | None = None
        self._file: _MappedScores | None = None
        self._buffer: WriteBuffer | None = None
        self._writers: list[PendingWriter] = []
        self._update_log: list[torch.Tensor] | None = None
        if _path is None:
            # all zero: every sample starts never scored (reads as 1/n)
            self._scores = torch.zeros(self.num_samples, dtype=torch.float32, device=device)
        else:
            self._file = _MappedScores(_path, self.num_samples)
            self._buffer = WriteBuffer(positive_int(buffer_size, "buffer_size"))
            # buffered updates reach the file when the store is collected or the interpreter
            # exits normally; a killed process loses them (checkpoints are the durable state)
            weakref.finalize(self, _apply_buffer, self._file, self._buffer, self.num_samples)
        if fingerprint is not None:
            self.bind(fingerprint)

    @classmethod
    def open(cls, path: str | os.PathLike, num_samples: int, buffer_size: int = 1 << 23, *,
             fingerprint: str | None = None) -> "ScoreStore":
        """Open (or create, sparse) a memory-mapped store at ``path`` (a ``.npy`` file).

        With ``fingerprint`` (the corpus's), a file recorded for another corpus is refused, and
        one whose metadata records no corpus yet is bound to this one.
        """
        path = os.fspath(path)
        n = positive_int(num_samples, "num_samples")
        _remove_stale_temporaries(path)
        if not os.path.exists(path):
            _write_metadata(path, n, fingerprint)  # before the .npy, as save does
            _create_sparse(path, n)
        store = cls(n, _path=path, buffer_size=buffer_size)
        recorded, has_metadata = _file_fingerprint(path, n, fingerprint)
        store.fingerprint = recorded if recorded is not None else fingerprint
        store.reference = (read_metadata(path) or {}).get("reference") if has_metadata else None
        if has_metadata and recorded is None and fingerprint is not None:
            _write_metadata(path, n, fingerprint, store.reference)  # bound to a corpus from now on
        return store

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str | None = None, *,
             fingerprint: str | None = None) -> "ScoreStore":
        """Read a store written by :meth:`save` into memory on ``device`` (checked as
        :meth:`restore` does, against ``fingerprint`` when given)."""
        held, _ = saved_length(path)
        store = cls(held, device=device, fingerprint=fingerprint)
        store.restore(path)
        store.reference = (read_metadata(path) or {}).get("reference")
        return store

    @property
    def device(self) -> torch.device:
        return torch.device("cpu") if self._scores is None else self._scores.device

    @property
    def memory_mapped(self) -> bool:
        return self._file is not None

    def describe(self) -> str:
        """How error messages name this store: its file, or its size and device."""
        if self.path is not None:
            return f"score store {self.path}"
        return f"in-memory score store ({self.num_samples} samples on {self.device})"

    def bind(self, fingerprint: str) -> None:
        """Declare the corpus these scores index (its ``Corpus.fingerprint``).

        Raises :class:`~es_stream.ScoreError` if the store already belongs to another corpus.
        A memory-mapped store's metadata is checked too, and records the corpus if it recorded
        none yet (a file without metadata is used as it is, with a warning).
        """
        if not isinstance(fingerprint, str) or not fingerprint:
            raise TypeError(f"fingerprint must be a corpus fingerprint (a str), got {fingerprint!r}")
        if self.fingerprint == fingerprint:
            return
        if self.fingerprint is not None:
            raise ScoreError(f"{self.describe()}: holds scores of corpus {self.fingerprint}, "
                             f"not of corpus {fingerprint}; use the store of this corpus (or a "
                             "new one)")
        if self.path is not None:
            recorded, has_metadata = _file_fingerprint(self.path, self.num_samples, fingerprint)
            if has_metadata and recorded is None:
                _write_metadata(self.path, self.num_samples, fingerprint, self.reference)
        self.fingerprint = fingerprint

    def set_reference(self, reference: dict[str, Any] | None) -> None:
        """Record who scored this store (a reference-model pass, :func:`es_stream.score_corpus`)
        in :attr:`reference`; a memory-mapped store rewrites its metadata file at once
        (atomically), other stores record it at their next :meth:`save`."""
        self.reference = None if reference is None else dict(reference)
        if self.path is not None:
            _write_metadata(self.path, self.num_samples, self.fingerprint, self.reference)

    def attach(self, writer: PendingWriter) -> None:
        """Register a holder of in-flight updates, flushed before whole-store reads."""
        if writer not in self._writers:
            self._writers.append(writer)

    def check_ids(self, ids: Any, argument: str = "ids") -> None:
        """Raise if a CPU id lies outside [0, num_samples). (CUDA ids are not checked here:
        that would synchronise the host.)"""
        ids = as_index(ids, argument)
        if ids.device.type == "cpu" and ids.numel():
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= self.num_samples:
                bad = lo if lo < 0 else hi
                raise IndexError(f"{argument}: sample id {bad} is outside [0, {self.num_samples}) "
                                 "of the score store; ids come from a different corpus?")

    # ------------------------------------------------------------- point access
    def gather(self, ids: Any, *, checked: bool = False) -> torch.Tensor:
        """Scores of ``ids`` (on the store's device; CPU for a memory-mapped store).
        ``checked=True`` skips the range check for callers that already made it."""
        ids = as_index(ids)
        if not checked:
            self.check_ids(ids)
        if self._scores is not None:
            values = self._scores[ids.to(self._scores.device, non_blocking=True)]
            return values.masked_fill(values == 0, self.initial)
        return torch.from_numpy(self.gather_numpy(ids.numpy()))

    def gather_numpy(self, ids: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Scores of (checked) CPU ``ids`` as float32 numpy, into ``out`` if given (e.g. a pinned
        staging buffer)."""
        if self._scores is not None:
            raw = self._scores[torch.from_numpy(np.asarray(ids, dtype=np.int64))]
            values = raw.masked_fill(raw == 0, self.initial).cpu().numpy()
            if out is None:
                return values
            out[:] = values
            return out
        values = np.take(self._file.array, ids, out=out)
        self._buffer.overlay(ids, values)
        values[values == 0] = self.initial
        return values

    def scatter(self, ids: Any, values: Any, *, checked: bool = False) -> None:
        """Set the scores of ``ids`` to ``values`` (``checked`` as in :meth:`gather`). Values
        on the CPU are checked to be finite first (see the class docstring)."""
        ids = as_index(ids)
        if not checked:
            self.check_ids(ids)
        values = torch.as_tensor(values).detach()
        host = None
        if self._scores is None or values.device.type == "cpu":
            host = values.to("cpu", torch.float32).numpy()  # a host store needs this copy anyway
            _refuse_nonfinite(host, ids, 0, self.describe(), "given to scatter")
        self._log_update(ids)
        if self._scores is not None:
            v = values.to(self._scores.device, torch.float32, non_blocking=True)
            self._scores[ids.to(self._scores.device, non_blocking=True)] = v.masked_fill(v == 0, _TINY)
            return
        self._buffer.add(ids.numpy(), _encode(host))
        if self._buffer.full:
            self._apply_buffer()

    def _apply_buffer(self) -> None:
        _apply_buffer(self._file, self._buffer, self.num_samples)

    # ------------------------------------------------------- whole-store access
    def sync(self) -> None:
        """Commit in-flight updates (feedback channels, then the write buffer) without forcing
        them to disk (:meth:`flush` does that too)."""
        for writer in self._writers:
            writer.flush()
        if self._buffer is not None and len(self._buffer):
            self._apply_buffer()

    def _read_raw(self, start: int, stop: int) -> np.ndarray:
        """Stored values of ids ``start .. stop-1`` (0.0: never scored), a new array; the caller
        has synced."""
        if self._scores is not None:
            part = self._scores[start:stop].detach()
            return part.numpy().copy() if part.device.type == "cpu" else part.cpu().numpy()
        values = np.array(self._file.array[start:stop])  # a copy, never a view of the file
        self._file.release(start, stop)
        return values

    def _write_raw(self, start: int, raw: np.ndarray) -> None:
        stop = start + len(raw)
        if self._scores is not None:
            self._scores[start:stop] = torch.from_numpy(
                np.ascontiguousarray(raw, np.float32)).to(self._scores.device)
        else:
            self._file.array[start:stop] = raw
            self._file.release(start, stop)

    def read_range(self, start: int, stop: int) -> np.ndarray:
        """Scores of ids ``start .. stop-1`` as float32 numpy (for whole-store passes in chunks);
        never-scored samples read as ``1/n``."""
        self.sync()
        return _decode(self._read_raw(start, stop), self.initial)

    def scored_range(self, start: int, stop: int) -> np.ndarray:
        """Whether each of ids ``start .. stop-1`` was ever scored (see the class docstring)."""
        self.sync()
        return self._read_raw(start, stop) != 0

    def range_reader(self) -> RangeReader:
        """Scores and never-scored masks for one whole-store pass, each range read once."""
        return RangeReader(self)

    def write_range(self, start: int, values: np.ndarray, where: np.ndarray | None = None) -> None:
        """Set the scores of ids ``start .. start+len(values)-1`` (whole-store passes); with a
        boolean ``where``, only those where it is True (the others keep their score, or stay
        never scored)."""
        self.sync()
        values = np.asarray(values, dtype=np.float32)
        stop = start + len(values)
        if where is None:
            _refuse_nonfinite(values, None, start, self.describe(), "given to write_range")
            self._write_raw(start, _encode(values))
            return
        where = np.asarray(where, dtype=bool)
        ids = np.flatnonzero(where) + start
        _refuse_nonfinite(values[where], ids, 0, self.describe(), "given to write_range")
        raw = self._read_raw(start, stop)
        raw[where] = _encode(values[where])
        self._write_raw(start, raw)

    def to_numpy(self) -> np.ndarray:
        """All scores as a float32 numpy array (copies everything: for stores that fit)."""
        return np.concatenate([self.read_range(a, min(a + CHUNK, self.num_samples))
                               for a in range(0, self.num_samples, CHUNK)])

    def save(self, path: str | os.PathLike) -> None:
        """Write all scores as a float32 ``.npy`` file, atomically, a chunk at a time, and the
        metadata beside it (the corpus fingerprint, see the class docstring), put in place just
        before the ``.npy``. Never-scored samples are written as 0.0."""
        path = os.fspath(path)
        self.sync()
        _remove_stale_temporaries(path)
        with atomic_write(path) as tmp:
            with open(tmp, "wb") as f:
                np.lib.format.write_array_header_1_0(
                    f, {"descr": "<f4", "fortran_order": False, "shape": (self.num_samples,)})
                for a in range(0, self.num_samples, CHUNK):
                    f.write(self._read_raw(a, min(a + CHUNK, self.num_samples)).tobytes())
            # the metadata first: a newly saved .npy never stands without its own
            _write_metadata(path, self.num_samples, self.fingerprint, self.reference)

    def restore(self, path: str | os.PathLike) -> None:
        """Replace every score by those of a file written by :meth:`save` (never-scored samples
        included), a chunk at a time. The file is checked first (a score file, this size, this
        corpus if recorded, finite values), so a refused file leaves the store as it was; a
        store that knew no corpus learns the file's."""
        path = os.fspath(path)
        held, offset = saved_length(path)
        _check_length(path, held, self.num_samples)
        recorded, _ = _file_fingerprint(path, self.num_samples, self.fingerprint)
        saved = np.memmap(path, np.float32, "r", offset, (held,))
        for a in range(0, held, CHUNK):
            _refuse_nonfinite(saved[a:a + CHUNK], None, a, path, "in the file")
        self.sync()
        for a in range(0, held, CHUNK):
            self._write_raw(a, np.array(saved[a:a + CHUNK]))
        del saved
        if recorded is not None and self.fingerprint is None:
            self.bind(recorded)

    def flush(self) -> None:
        """Commit in-flight updates; make a memory-mapped store's writes durable."""
        self.sync()
        if self._file is not None:
            self._file.flush()

    # ---------------------------------------------------------------- ranks
    def _log_update(self, ids: torch.Tensor) -> None:
        if self._update_log is None:
            if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
                return
            self._update_log = []
        self._update_log.append(ids.clone())

    def update_log_state(self) -> torch.Tensor | None:
        """The ids updated since the last merge (None when not logging), for checkpoints: a run
        resumed mid-epoch must still share what it updated before the checkpoint."""
        if self._update_log is None:
            return None
        ids = torch.from_numpy(self.take_update_log())
        self._update_log = [ids]
        return ids.clone()

    def load_update_log_state(self, ids: torch.Tensor | None) -> None:
        """Replace the update log by a checkpoint's (see :meth:`update_log_state`)."""
        self._update_log = None if ids is None else [torch.as_tensor(ids, dtype=torch.int64)]

    def take_update_log(self) -> np.ndarray:
        """Sorted unique ids updated since the last call (logged under multi-rank training)."""
        log = self._update_log or []
        if self._update_log is not None:
            self._update_log = []
        if not log:
            return np.empty(0, np.int64)
        return np.unique(torch.cat([t.cpu() for t in log]).numpy())

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """A copy of every score and of which samples were never scored (the state must not
        follow later updates). For stores too big to copy, save the store beside the
        checkpoint instead (:class:`es_stream.Checkpointer`)."""
        self.sync()
        raw = np.concatenate([self._read_raw(a, min(a + CHUNK, self.num_samples))
                              for a in range(0, self.num_samples, CHUNK)])
        return {"num_samples": self.num_samples,
                "scores": torch.from_numpy(_decode(raw, self.initial)),
                "never_scored": torch.from_numpy(raw == 0)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`. A state without ``never_scored`` (older versions, or
        scores of your own) counts every sample as scored."""
        if state["num_samples"] != self.num_samples:
            raise ValueError(f"state is for {state['num_samples']} samples, this store has "
                             f"{self.num_samples}")
        scores = torch.as_tensor(state["scores"]).detach().to("cpu", torch.float32).numpy()
        if scores.shape != (self.num_samples,):
            raise ValueError(f"state['scores'] has shape {scores.shape}, this store holds "
                             f"({self.num_samples},)")
        _refuse_nonfinite(scores, None, 0, "state['scores']", "in the state")
        raw = _encode(scores)
        never = state.get("never_scored")
        if never is not None:
            raw[torch.as_tensor(never).cpu().numpy().astype(bool)] = 0
        self.sync()
        for a in range(0, self.num_samples, CHUNK):
            self._write_raw(a, raw[a:a + CHUNK])


def _apply_buffer(file: _MappedScores, buffer: WriteBuffer, num_samples: int) -> None:
    """Write the buffered updates to the file in id order, a range at a time, releasing each
    range's pages once written. (A function, not a method, so a finaliser can call it without
    keeping the store alive.)"""
    if not len(buffer):
        return
    ids, values = buffer.drain()
    for start in range(0, num_samples, CHUNK):
        stop = min(start + CHUNK, num_samples)
        lo, hi = np.searchsorted(ids, [start, stop])
        if hi > lo:
            file.array[ids[lo:hi]] = values[lo:hi]
            file.release(start, stop)
