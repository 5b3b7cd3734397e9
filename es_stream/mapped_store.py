"""`MappedScoreStore`: a :class:`~es_stream.store.ScoreStore` memory-mapped from a float32
``.npy`` file, for corpora whose scores do not fit in memory; what ``ScoreStore.open`` makes."""

from __future__ import annotations

import mmap
import os
import weakref

import numpy as np
import torch

from .chunks import chunk_ranges
from .scorefile import (allocate, check_length, create, file_fingerprint, metadata_path,
                        read_metadata, remove_stale_temporaries, saved_length, write_metadata)
from .store import BACKINGS, ScoreStore, _encode, _refuse_nonfinite, positive_int
from .writebuffer import WriteBuffer


class MappedScoreStore(ScoreStore):
    """A :class:`ScoreStore` memory-mapped from a float32 ``.npy`` file; what
    :meth:`ScoreStore.open` makes (see there and the class docstring of :class:`ScoreStore`).

    Updates go to a :class:`~es_stream.writebuffer.WriteBuffer` of ``buffer_size`` entries and
    reach the file sorted, in one pass, when it fills, at :meth:`sync`/:meth:`flush`, or when
    the store is collected or the interpreter exits (a killed process loses them: checkpoints
    are the durable state). After each pass the process's mapping of the range is released.
    """

    def __init__(self, path: str | os.PathLike, num_samples: int, buffer_size: int = 1 << 23, *,
                 fingerprint: str | None = None) -> None:
        path = os.fspath(path)
        n = positive_int(num_samples, "num_samples")
        buffer_size = positive_int(buffer_size, "buffer_size")
        remove_stale_temporaries(path)
        if not os.path.exists(path):
            _create_with_metadata(path, n, fingerprint)
        super().__init__(n)
        self.path = path
        self._file = _MappedScores(path, n)
        self._buffer = WriteBuffer(buffer_size)
        # buffered updates reach the file when the store is collected or the interpreter exits
        # normally; a killed process loses them (checkpoints are the durable state)
        weakref.finalize(self, _apply_buffer, self._file, self._buffer, n)
        recorded, has_metadata = file_fingerprint(path, n, fingerprint)
        self.fingerprint = recorded if recorded is not None else fingerprint
        self.reference = (read_metadata(path) or {}).get("reference") if has_metadata else None
        if has_metadata and recorded is None and fingerprint is not None:
            write_metadata(path, n, fingerprint, self.reference)  # bound to a corpus from now on

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def memory_mapped(self) -> bool:
        return True

    def _gather(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.gather_numpy(ids.cpu().numpy()))

    def gather_numpy(self, ids: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        values = np.take(self._file.array, ids, out=out)
        self._buffer.overlay(ids, values)
        values[values == 0] = self.initial
        return values

    def _scatter(self, ids: torch.Tensor, values: torch.Tensor) -> None:
        host = values.to("cpu", torch.float32).numpy()  # GPU values: checked once here
        if values.device.type != "cpu":
            _refuse_nonfinite(host, ids, 0, self.describe(), "given to scatter")
        self._buffer.add(ids.cpu().numpy(), _encode(host))
        if self._buffer.full:
            self._commit_buffered()

    def _commit_buffered(self) -> None:
        _apply_buffer(self._file, self._buffer, self.num_samples)

    def _read_raw(self, start: int, stop: int) -> np.ndarray:
        values = np.array(self._file.array[start:stop])  # a copy, never a view of the file
        self._file.release(start, stop)
        return values

    def _write_raw(self, start: int, raw: np.ndarray) -> None:
        stop = start + len(raw)
        self._file.array[start:stop] = raw
        self._file.release(start, stop)

    def _make_durable(self) -> None:
        self._file.flush()


def _create_with_metadata(path: str, num_samples: int, fingerprint: str | None) -> None:
    """A new store file and its metadata (first, as :meth:`ScoreStore.save` does); a refused
    creation (a full disk) leaves neither behind."""
    meta = metadata_path(path)
    had_metadata = os.path.exists(meta)
    write_metadata(path, num_samples, fingerprint)
    try:
        create(path, num_samples)
    except BaseException:
        if not had_metadata:
            try:
                os.unlink(meta)
            except FileNotFoundError:
                pass
        raise


class _MappedScores:
    """A float32 ``.npy`` file mapped into memory, with page release for bounded residency."""

    def __init__(self, path: str, num_samples: int) -> None:
        held, self.offset = saved_length(path)
        check_length(path, held, num_samples)
        expected = self.offset + 4 * num_samples
        self.fd = os.open(path, os.O_RDWR)
        try:
            allocate(self.fd, path, expected)  # a sparse file (an older one) gets its blocks now
            self.map = mmap.mmap(self.fd, expected)
        except BaseException:
            os.close(self.fd)
            raise
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


def _apply_buffer(file: _MappedScores, buffer: WriteBuffer, num_samples: int) -> None:
    """Write the buffered updates to the file in id order, a range at a time, releasing each
    range's pages once written. (A function, not a method, so a finaliser can call it without
    keeping the store alive.)"""
    if not len(buffer):
        return
    ids, values = buffer.drain()
    for start, stop in chunk_ranges(num_samples):
        lo, hi = np.searchsorted(ids, [start, stop])
        if hi > lo:
            file.array[ids[lo:hi]] = values[lo:hi]
            file.release(start, stop)


BACKINGS["mapped"] = MappedScoreStore
