"""`ScoreStore`: one float32 score per sample, indexed by global sample id."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from ._atomic import atomic_write

# The memory-mapped store is created sparse (all zero bytes, nothing written up front), so a
# stored 0.0 means "never updated: 1/n". Real scores are kept >= the smallest normal float32 so
# they never collide with that sentinel (a score would have to underflow to get there).
_TINY = float(np.finfo(np.float32).tiny)


def _as_index(ids: Any) -> torch.Tensor:
    ids = torch.as_tensor(ids)
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"ids must be an integer tensor, got dtype {ids.dtype}")
    return ids.long()


class ScoreStore:
    """Dense per-sample scores, initialised to ``1/n``; 4 bytes per sample.

    Two backings, one interface:

    * in memory, a torch tensor on any device (``ScoreStore(n, device="cuda")``): gather and
      scatter run on that device with no host synchronisation;
    * memory-mapped, ``ScoreStore.open(path, n)``: a ``.npy`` file created sparse, for corpora
      whose scores do not fit in memory; gather returns CPU tensors.

    Ids must be unique within one :meth:`scatter` call (a meta-batch never repeats an id).
    """

    def __init__(self, num_samples: int, device: torch.device | str | None = None, *,
                 _memmap: np.memmap | None = None, _path: str | None = None) -> None:
        if not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        self.num_samples = int(num_samples)
        self.initial = 1.0 / self.num_samples
        self.path = _path
        self._memmap = _memmap
        self.scores: torch.Tensor | None = None
        if _memmap is None:
            self.scores = torch.full((self.num_samples,), self.initial, dtype=torch.float32,
                                     device=device)

    @classmethod
    def open(cls, path: str | os.PathLike, num_samples: int) -> "ScoreStore":
        """Open (or create, sparse) a memory-mapped store at ``path`` (a ``.npy`` file)."""
        path = os.fspath(path)
        if os.path.exists(path):
            mm = np.load(path, mmap_mode="r+")
            if mm.dtype != np.float32 or mm.shape != (num_samples,):
                raise ValueError(f"{path}: holds {mm.dtype} {mm.shape}, expected float32 "
                                 f"({num_samples},): a score store of another corpus")
        else:
            mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(num_samples,))
        return cls(num_samples, _memmap=mm, _path=path)

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str | None = None) -> "ScoreStore":
        """Read a store written by :meth:`save` into memory on ``device``."""
        arr = np.load(os.fspath(path))
        store = cls(len(arr), device=device)
        store.scores.copy_(torch.from_numpy(_decode(arr, store.initial)))
        return store

    @property
    def device(self) -> torch.device:
        return torch.device("cpu") if self.scores is None else self.scores.device

    def check_ids(self, ids: torch.Tensor, argument: str = "ids") -> None:
        """Raise if a CPU id lies outside [0, num_samples). (CUDA ids are not checked here:
        that would synchronise the host.)"""
        if ids.device.type == "cpu" and ids.numel():
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= self.num_samples:
                bad = lo if lo < 0 else hi
                raise IndexError(f"{argument}: sample id {bad} is outside [0, {self.num_samples}) "
                                 "of the score store; ids come from a different corpus?")

    def gather(self, ids: Any, *, checked: bool = False) -> torch.Tensor:
        """Scores of ``ids`` (on the store's device; CPU for a memory-mapped store).
        ``checked=True`` skips the range check for callers that already made it."""
        ids = _as_index(ids)
        if not checked:
            self.check_ids(ids)
        if self.scores is not None:
            return self.scores[ids.to(self.scores.device, non_blocking=True)]
        values = self._memmap[ids.numpy()]
        return torch.from_numpy(_decode(values, self.initial))

    def scatter(self, ids: Any, values: torch.Tensor, *, checked: bool = False) -> None:
        """Set the scores of ``ids`` to ``values`` (``checked`` as in :meth:`gather`)."""
        ids = _as_index(ids)
        if not checked:
            self.check_ids(ids)
        if self.scores is not None:
            self.scores[ids.to(self.scores.device, non_blocking=True)] = values.to(
                self.scores.device, torch.float32, non_blocking=True)
        else:
            v = values.detach().to("cpu", torch.float32).numpy()
            self._memmap[ids.numpy()] = np.maximum(v, _TINY)

    def read_range(self, start: int, stop: int) -> np.ndarray:
        """Scores of ids ``start .. stop-1`` as float32 numpy (for whole-store passes in chunks)."""
        if self.scores is not None:
            return self.scores[start:stop].detach().cpu().numpy()
        return _decode(self._memmap[start:stop], self.initial)

    def to_numpy(self) -> np.ndarray:
        """All scores as a float32 numpy array (copies from the device)."""
        if self.scores is not None:
            return self.scores.detach().cpu().numpy()
        return _decode(np.asarray(self._memmap), self.initial)

    def save(self, path: str | os.PathLike) -> None:
        """Write all scores as a ``.npy`` float32 file, atomically."""
        with atomic_write(path) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, np.maximum(self.to_numpy(), _TINY))  # 0 is the "unset" sentinel

    def flush(self) -> None:
        """Make a memory-mapped store's writes durable."""
        if self._memmap is not None:
            self._memmap.flush()

    def state_dict(self) -> dict[str, Any]:
        # a copy: the state must not follow later updates of the live store
        return {"num_samples": self.num_samples, "scores": torch.from_numpy(self.to_numpy().copy())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["num_samples"] != self.num_samples:
            raise ValueError(f"state is for {state['num_samples']} samples, this store has "
                             f"{self.num_samples}")
        scores = state["scores"].to(torch.float32)
        if self.scores is not None:
            self.scores.copy_(scores.to(self.scores.device))
        else:
            self._memmap[:] = np.maximum(scores.numpy(), _TINY)


def _decode(values: np.ndarray, initial: float) -> np.ndarray:
    values = np.asarray(values, dtype=np.float32)
    return np.where(values == 0, np.float32(initial), values).astype(np.float32)
