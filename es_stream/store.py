"""`ScoreStore`: one float32 score per sample, indexed by global sample id; in memory
(:class:`MemoryScoreStore`) or memory-mapped from a file (:class:`MappedScoreStore`)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from .atomic import atomic_write
from ._check import int_at_least
from .chunks import CHUNK, chunk_ranges
from .distributed import UpdateLog
from .device_channel import FeedbackChannel
from .errors import ScoreError
from .scorefile import (check_length, file_fingerprint, metadata_path, read_metadata,
                        remove_stale_temporaries, saved_length, write_metadata)

if TYPE_CHECKING:
    from .mapped_store import MappedScoreStore

__all__ = ["CHUNK", "MappedScoreStore", "MemoryScoreStore", "PendingWriter", "RangeReader",
           "ScoreStore", "as_index", "metadata_path", "positive_int", "read_metadata",
           "saved_length"]

# Both backings hold 0.0 for "never updated since the store was created" (a new file is all zero
# bytes, so that costs nothing to write); reads return 1/n for it. A real score of exactly 0 is
# kept as the smallest normal float32 instead, so it never collides with that sentinel.
_TINY = float(np.finfo(np.float32).tiny)
_CHECK_LOSS = ("a loss that overflowed or diverged reached the store: check the training loss "
               "(ESSelector.check_finite() on a GPU), then restore the scores from a checkpoint "
               "(Checkpointer.load(store=...)) before going on")


#: backings that live in their own modules, registered there (``"mapped"``: es_stream.mapped_store,
#: which the package imports with this one), so this module never imports them back
BACKINGS: dict[str, type] = {}


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

    Two backings, one interface, one class each (``ScoreStore(...)`` and ``ScoreStore.open``
    make the right one; ``isinstance(store, ScoreStore)`` holds for both):

    * :class:`MemoryScoreStore`, a torch tensor on any device (``ScoreStore(n,
      device="cuda")``): gather and scatter run on that device with no host synchronisation;
    * :class:`MappedScoreStore`, ``ScoreStore.open(path, n)``: a ``.npy`` file, its blocks
      allocated when it is created or opened (so a full disk is a :class:`~es_stream.ScoreError`
      naming the file then, not a SIGBUS later), for corpora whose scores do not fit in memory
      (1e9 samples: a 4 GB file). Updates go to an in-memory
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

    **Feedback channels.** :meth:`channel` makes and caches the one
    :class:`~es_stream.FeedbackChannel` per device through which losses on that device reach a
    host store; every selector of the store shares it, so each sees the others' updates in
    flight.

    Under ``torch.distributed`` with more than one rank the store logs which ids it updated
    (:attr:`updates`, a :class:`es_stream.distributed.UpdateLog`), so that
    :func:`es_stream.merge_rank_scores` can share them at the epoch's end.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> "ScoreStore":
        # ScoreStore(n, device) keeps making an in-memory store, as it always did
        return super().__new__(MemoryScoreStore if cls is ScoreStore else cls)

    def __init__(self, num_samples: int, *, fingerprint: str | None = None) -> None:
        self.num_samples = positive_int(num_samples, "num_samples")
        self.initial = 1.0 / self.num_samples
        self.path: str | None = None
        self.fingerprint: str | None = None
        # who scored: {"scorer": identity, "complete": bool, ...} for a reference-model pass
        # (es_stream.score_corpus), recorded in the metadata; None for training scores
        self.reference: dict[str, Any] | None = None
        self.updates = UpdateLog()
        self._writers: list[PendingWriter] = []
        self._channels: dict[torch.device, FeedbackChannel] = {}

    @classmethod
    def open(cls, path: str | os.PathLike, num_samples: int, buffer_size: int = 1 << 23, *,
             fingerprint: str | None = None) -> "MappedScoreStore":
        """Open (or create) a memory-mapped store at ``path`` (a ``.npy`` file): a
        :class:`MappedScoreStore`.

        With ``fingerprint`` (the corpus's), a file recorded for another corpus is refused, and
        one whose metadata records no corpus yet is bound to this one. The file's blocks are
        allocated now: a disk without room for it is a :class:`~es_stream.ScoreError` naming it.
        """
        return BACKINGS["mapped"](path, num_samples, buffer_size, fingerprint=fingerprint)

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str | None = None, *,
             fingerprint: str | None = None) -> "MemoryScoreStore":
        """Read a store written by :meth:`save` into memory on ``device`` (checked as
        :meth:`restore` does, against ``fingerprint`` when given)."""
        held, _ = saved_length(path)
        store = MemoryScoreStore(held, device=device, fingerprint=fingerprint)
        store.restore(path)
        store.reference = (read_metadata(path) or {}).get("reference")
        return store

    # ------------------------------------------------------------- the backing
    @property
    def device(self) -> torch.device:
        raise NotImplementedError

    @property
    def memory_mapped(self) -> bool:
        raise NotImplementedError

    def gather_numpy(self, ids: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Scores of (checked) CPU ``ids`` as float32 numpy, into ``out`` if given (e.g. a pinned
        staging buffer)."""
        raise NotImplementedError

    def _gather(self, ids: torch.Tensor) -> torch.Tensor:
        """Scores of checked ``ids`` (never scored: ``1/n``), on the store's device."""
        raise NotImplementedError

    def _scatter(self, ids: torch.Tensor, values: torch.Tensor) -> None:
        """Store checked ``values`` (the CPU ones checked finite) for checked ``ids``."""
        raise NotImplementedError

    def _read_raw(self, start: int, stop: int) -> np.ndarray:
        """Stored values of ids ``start .. stop-1`` (0.0: never scored), a new array; the caller
        has synced."""
        raise NotImplementedError

    def _write_raw(self, start: int, raw: np.ndarray) -> None:
        """Store encoded values for ids ``start .. start+len(raw)-1``; the caller has synced."""
        raise NotImplementedError

    def _commit_buffered(self) -> None:
        """Apply updates the backing holds aside (a file's write buffer) to the scores."""

    def _make_durable(self) -> None:
        """Force what the backing wrote to disk (a file's pages)."""

    # ------------------------------------------------------------- identity
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
            recorded, has_metadata = file_fingerprint(self.path, self.num_samples, fingerprint)
            if has_metadata and recorded is None:
                write_metadata(self.path, self.num_samples, fingerprint, self.reference)
        self.fingerprint = fingerprint

    def set_reference(self, reference: dict[str, Any] | None) -> None:
        """Record who scored this store (a reference-model pass, :func:`es_stream.score_corpus`)
        in :attr:`reference`; a memory-mapped store rewrites its metadata file at once
        (atomically), other stores record it at their next :meth:`save`."""
        self.reference = None if reference is None else dict(reference)
        if self.path is not None:
            write_metadata(self.path, self.num_samples, self.fingerprint, self.reference)

    # ------------------------------------------------------------- in flight
    def attach(self, writer: PendingWriter) -> None:
        """Register a holder of in-flight updates, flushed before whole-store reads."""
        if writer not in self._writers:
            self._writers.append(writer)

    def channel(self, device: torch.device | str, max_pending: int = 16) -> FeedbackChannel:
        """The :class:`~es_stream.FeedbackChannel` that brings this (host) store's scores to
        ``device`` and its updates back, made on the first call for that device (with
        ``max_pending``) and the same object on every later one. The store flushes it before
        any whole-store read."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        channel = self._channels.get(device)
        if channel is None:
            channel = self._channels[device] = FeedbackChannel(self, device, max_pending)
        return channel

    def commit_in_flight(self) -> None:
        """Commit the updates the feedback channels (and other attached writers) hold; waits for
        their devices."""
        for writer in self._writers:
            writer.flush()

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
        return self._gather(ids)

    def scatter(self, ids: Any, values: Any, *, checked: bool = False) -> None:
        """Set the scores of ``ids`` to ``values`` (``checked`` as in :meth:`gather`). Values
        on the CPU are checked to be finite first (see the class docstring)."""
        ids = as_index(ids)
        if not checked:
            self.check_ids(ids)
        values = torch.as_tensor(values).detach()
        if values.device.type == "cpu":
            _refuse_nonfinite(values.to(torch.float32).numpy(), ids, 0, self.describe(),
                              "given to scatter")
        self.updates.record(ids)
        self._scatter(ids, values)

    # ------------------------------------------------------- whole-store access
    def sync(self) -> None:
        """Commit in-flight updates (feedback channels, then the write buffer) without forcing
        them to disk (:meth:`flush` does that too)."""
        self.commit_in_flight()
        self._commit_buffered()

    def _raw_all(self) -> np.ndarray:
        return np.concatenate([self._read_raw(a, b) for a, b in chunk_ranges(self.num_samples)])

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
        return np.concatenate([self.read_range(a, b) for a, b in chunk_ranges(self.num_samples)])

    def save(self, path: str | os.PathLike) -> None:
        """Write all scores as a float32 ``.npy`` file, atomically, a chunk at a time, and the
        metadata beside it (the corpus fingerprint, see the class docstring), put in place just
        before the ``.npy``. Never-scored samples are written as 0.0."""
        path = os.fspath(path)
        self.sync()
        remove_stale_temporaries(path)
        with atomic_write(path) as tmp:
            with open(tmp, "wb") as f:
                np.lib.format.write_array_header_1_0(
                    f, {"descr": "<f4", "fortran_order": False, "shape": (self.num_samples,)})
                for a, b in chunk_ranges(self.num_samples):
                    f.write(self._read_raw(a, b).tobytes())
            # the metadata first: a newly saved .npy never stands without its own
            write_metadata(path, self.num_samples, self.fingerprint, self.reference)

    def restore(self, path: str | os.PathLike) -> None:
        """Replace every score by those of a file written by :meth:`save` (never-scored samples
        included), a chunk at a time. The file is checked first (a score file, this size, this
        corpus if recorded, finite values), so a refused file leaves the store as it was; a
        store that knew no corpus learns the file's."""
        path = os.fspath(path)
        held, offset = saved_length(path)
        check_length(path, held, self.num_samples)
        recorded, _ = file_fingerprint(path, self.num_samples, self.fingerprint)
        saved = np.memmap(path, np.float32, "r", offset, (held,))
        for a, b in chunk_ranges(held):
            _refuse_nonfinite(saved[a:b], None, a, path, "in the file")
        self.sync()
        for a, b in chunk_ranges(held):
            self._write_raw(a, np.array(saved[a:b]))
        del saved
        if recorded is not None and self.fingerprint is None:
            self.bind(recorded)

    def flush(self) -> None:
        """Commit in-flight updates; make a memory-mapped store's writes durable."""
        self.sync()
        self._make_durable()

    # ---------------------------------------------------------------- ranks
    def update_log_state(self) -> torch.Tensor | None:
        """The ids updated since the last merge (None when not logging), for checkpoints: a run
        resumed mid-epoch must still share what it updated before the checkpoint
        (:meth:`es_stream.distributed.UpdateLog.ids`)."""
        return self.updates.ids()

    def load_update_log_state(self, ids: torch.Tensor | None) -> None:
        """Replace the update log by a checkpoint's (see :meth:`update_log_state`)."""
        self.updates.load_ids(ids)

    def take_update_log(self) -> np.ndarray:
        """Sorted unique ids updated since the last call (logged under multi-rank training)."""
        return self.updates.take()

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """A copy of every score and of which samples were never scored (the state must not
        follow later updates). For stores too big to copy, save the store beside the
        checkpoint instead (:class:`es_stream.Checkpointer`)."""
        self.sync()
        raw = self._raw_all()
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
        for a, b in chunk_ranges(self.num_samples):
            self._write_raw(a, raw[a:b])


class MemoryScoreStore(ScoreStore):
    """A :class:`ScoreStore` held in a torch tensor on ``device`` (CPU by default); what
    ``ScoreStore(num_samples, device)`` makes. Gathers and scatters on a GPU run there, with no
    host synchronisation."""

    def __init__(self, num_samples: int, device: torch.device | str | None = None, *,
                 fingerprint: str | None = None) -> None:
        super().__init__(num_samples)
        # all zero: every sample starts never scored (reads as 1/n)
        self._scores = torch.zeros(self.num_samples, dtype=torch.float32, device=device)
        if fingerprint is not None:
            self.bind(fingerprint)

    @property
    def device(self) -> torch.device:
        return self._scores.device

    @property
    def memory_mapped(self) -> bool:
        return False

    def _gather(self, ids: torch.Tensor) -> torch.Tensor:
        values = self._scores[ids.to(self._scores.device, non_blocking=True)]
        return values.masked_fill(values == 0, self.initial)

    def gather_numpy(self, ids: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        raw = self._scores[torch.from_numpy(np.asarray(ids, dtype=np.int64))]
        values = raw.masked_fill(raw == 0, self.initial).cpu().numpy()
        if out is None:
            return values
        out[:] = values
        return out

    def _scatter(self, ids: torch.Tensor, values: torch.Tensor) -> None:
        v = values.to(self._scores.device, torch.float32, non_blocking=True)
        self._scores[ids.to(self._scores.device, non_blocking=True)] = v.masked_fill(v == 0, _TINY)

    def _read_raw(self, start: int, stop: int) -> np.ndarray:
        part = self._scores[start:stop].detach()
        return part.numpy().copy() if part.device.type == "cpu" else part.cpu().numpy()

    def _write_raw(self, start: int, raw: np.ndarray) -> None:
        self._scores[start:start + len(raw)] = torch.from_numpy(
            np.ascontiguousarray(raw, np.float32)).to(self._scores.device)


def __getattr__(name: str) -> Any:
    # `from es_stream.store import MappedScoreStore` keeps working: the class registers itself
    # here when es_stream (which imports es_stream.mapped_store) is imported
    if name == "MappedScoreStore":
        return BACKINGS["mapped"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
