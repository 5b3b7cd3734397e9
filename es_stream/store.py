"""`ScoreStore`: one float32 score per sample, indexed by global sample id."""

from __future__ import annotations

import mmap
import os
import weakref
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist

from ._atomic import atomic_write
from .writebuffer import WriteBuffer

# The memory-mapped store is created sparse (all zero bytes, nothing written up front), so a
# stored 0.0 means "never updated: 1/n". Real scores are kept >= the smallest normal float32 so
# they never collide with that sentinel (a score would have to underflow to get there).
_TINY = float(np.finfo(np.float32).tiny)
# Whole-store passes (save, restore, pruning) go this many scores at a time: 64 MiB.
CHUNK = 1 << 24


class PendingWriter(Protocol):
    """Something holding score updates not yet in the store (the GPU feedback channel)."""

    def flush(self) -> None: ...


def _as_index(ids: Any) -> torch.Tensor:
    ids = torch.as_tensor(ids)
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"ids must be an integer tensor, got dtype {ids.dtype}")
    return ids.long()


class _MappedScores:
    """A float32 ``.npy`` file mapped into memory, with page release for bounded residency."""

    def __init__(self, path: str, num_samples: int) -> None:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(f)
            self.offset = f.tell()
        if dtype != np.float32 or shape != (num_samples,) or fortran:
            raise ValueError(f"{path}: holds {dtype} {shape}, expected float32 ({num_samples},): "
                             "a score store of another corpus")
        expected = self.offset + 4 * num_samples
        if os.path.getsize(path) != expected:
            raise ValueError(f"{path}: {os.path.getsize(path)} bytes, expected {expected}: the "
                             "file is truncated; restore it from a checkpoint's scores.npy")
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
      a checkpoint's copy, :class:`es_stream.Checkpointer`.) After each pass the process's mapping of the file is released
      (``MADV_DONTNEED``), so its resident set stays bounded (see ``tools/bench_store.py``).

    Ids must be unique within one :meth:`scatter` call (a meta-batch never repeats an id).
    Point reads (:meth:`gather`) see the store's own updates at once; updates still in flight in
    a GPU feedback channel (:class:`es_stream.FeedbackChannel`) are committed before any
    whole-store read (:meth:`read_range`, :meth:`save`, :meth:`state_dict`, pruning).

    Under ``torch.distributed`` with more than one rank the store logs which ids it updated, so
    that :func:`es_stream.merge_rank_scores` can share them at the epoch's end.
    """

    def __init__(self, num_samples: int, device: torch.device | str | None = None, *,
                 _path: str | None = None, buffer_size: int = 1 << 23) -> None:
        if not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        self.num_samples = int(num_samples)
        self.initial = 1.0 / self.num_samples
        self.path = _path
        self.scores: torch.Tensor | None = None
        self._file: _MappedScores | None = None
        self._buffer: WriteBuffer | None = None
        self._writers: list[PendingWriter] = []
        self._update_log: list[torch.Tensor] | None = None
        if _path is None:
            self.scores = torch.full((self.num_samples,), self.initial, dtype=torch.float32,
                                     device=device)
        else:
            self._file = _MappedScores(_path, self.num_samples)
            self._buffer = WriteBuffer(buffer_size)
            # buffered updates reach the file when the store is collected or the interpreter
            # exits normally; a killed process loses them (checkpoints are the durable state)
            weakref.finalize(self, _apply_buffer, self._file, self._buffer, self.num_samples)

    @classmethod
    def open(cls, path: str | os.PathLike, num_samples: int, buffer_size: int = 1 << 23) -> "ScoreStore":
        """Open (or create, sparse) a memory-mapped store at ``path`` (a ``.npy`` file)."""
        path = os.fspath(path)
        if not os.path.exists(path):
            _create_sparse(path, num_samples)
        return cls(num_samples, _path=path, buffer_size=buffer_size)

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str | None = None) -> "ScoreStore":
        """Read a store written by :meth:`save` into memory on ``device``."""
        store = cls(len(np.load(os.fspath(path), mmap_mode="r")), device=device)
        store.restore(path)
        return store

    @property
    def device(self) -> torch.device:
        return torch.device("cpu") if self.scores is None else self.scores.device

    @property
    def memory_mapped(self) -> bool:
        return self._file is not None

    def attach(self, writer: PendingWriter) -> None:
        """Register a holder of in-flight updates, flushed before whole-store reads."""
        if writer not in self._writers:
            self._writers.append(writer)

    def check_ids(self, ids: torch.Tensor, argument: str = "ids") -> None:
        """Raise if a CPU id lies outside [0, num_samples). (CUDA ids are not checked here:
        that would synchronise the host.)"""
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
        ids = _as_index(ids)
        if not checked:
            self.check_ids(ids)
        if self.scores is not None:
            return self.scores[ids.to(self.scores.device, non_blocking=True)]
        return torch.from_numpy(self.gather_numpy(ids.numpy()))

    def gather_numpy(self, ids: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Scores of (checked) CPU ``ids`` as float32 numpy, into ``out`` if given (e.g. a pinned
        staging buffer)."""
        if self.scores is not None:
            values = self.scores[torch.from_numpy(ids)].numpy()
            if out is None:
                return values
            out[:] = values
            return out
        values = np.take(self._file.array, ids, out=out)
        self._buffer.overlay(ids, values)
        values[values == 0] = self.initial
        return values

    def scatter(self, ids: Any, values: torch.Tensor, *, checked: bool = False) -> None:
        """Set the scores of ``ids`` to ``values`` (``checked`` as in :meth:`gather`)."""
        ids = _as_index(ids)
        if not checked:
            self.check_ids(ids)
        self._log_update(ids)
        if self.scores is not None:
            self.scores[ids.to(self.scores.device, non_blocking=True)] = values.to(
                self.scores.device, torch.float32, non_blocking=True)
            return
        v = values.detach().to("cpu", torch.float32).numpy()
        self._buffer.add(ids.numpy(), np.maximum(v, _TINY))
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

    def read_range(self, start: int, stop: int) -> np.ndarray:
        """Scores of ids ``start .. stop-1`` as float32 numpy (for whole-store passes in chunks)."""
        self.sync()
        if self.scores is not None:
            return self.scores[start:stop].detach().cpu().numpy()
        values = _decode(self._file.array[start:stop], self.initial)
        self._file.release(start, stop)
        return values

    def write_range(self, start: int, values: np.ndarray) -> None:
        """Set the scores of ids ``start .. start+len(values)-1`` (whole-store passes)."""
        self.sync()
        stop = start + len(values)
        if self.scores is not None:
            self.scores[start:stop] = torch.from_numpy(np.ascontiguousarray(values, np.float32)).to(
                self.scores.device)
        else:
            self._file.array[start:stop] = np.maximum(values, _TINY)
            self._file.release(start, stop)

    def to_numpy(self) -> np.ndarray:
        """All scores as a float32 numpy array (copies everything: for stores that fit)."""
        return np.concatenate([self.read_range(a, min(a + CHUNK, self.num_samples))
                               for a in range(0, self.num_samples, CHUNK)])

    def save(self, path: str | os.PathLike) -> None:
        """Write all scores as a float32 ``.npy`` file, atomically, a chunk at a time."""
        self.sync()
        with atomic_write(path) as tmp:
            with open(tmp, "wb") as f:
                np.lib.format.write_array_header_1_0(
                    f, {"descr": "<f4", "fortran_order": False, "shape": (self.num_samples,)})
                for a in range(0, self.num_samples, CHUNK):
                    # 0 is the "unset" sentinel of memory-mapped stores: never write it
                    f.write(np.maximum(self.read_range(a, min(a + CHUNK, self.num_samples)),
                                       _TINY).tobytes())

    def restore(self, path: str | os.PathLike) -> None:
        """Replace every score by those of a file written by :meth:`save`, a chunk at a time."""
        path = os.fspath(path)
        saved = np.load(path, mmap_mode="r")
        if saved.dtype != np.float32 or saved.shape != (self.num_samples,):
            raise ValueError(f"{path}: holds {saved.dtype} {saved.shape}, expected float32 "
                             f"({self.num_samples},): scores of another corpus")
        self.sync()
        for a in range(0, self.num_samples, CHUNK):
            self.write_range(a, _decode(saved[a:a + CHUNK], self.initial))

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
        """A copy of every score (the state must not follow later updates). For stores too big
        to copy, save the store beside the checkpoint instead (:class:`es_stream.Checkpointer`)."""
        return {"num_samples": self.num_samples, "scores": torch.from_numpy(self.to_numpy())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["num_samples"] != self.num_samples:
            raise ValueError(f"state is for {state['num_samples']} samples, this store has "
                             f"{self.num_samples}")
        scores = state["scores"].to(torch.float32).numpy()
        self.sync()
        if self._buffer is not None:
            self._buffer.drain()
        for a in range(0, self.num_samples, CHUNK):
            self.write_range(a, scores[a:a + CHUNK])


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


def _decode(values: np.ndarray, initial: float) -> np.ndarray:
    values = np.array(values, dtype=np.float32)  # a copy, never a view of the file
    values[values == 0] = initial
    return values
