"""`FeedbackChannel`: the transport between a host score store and a device (a GPU selector):
scores staged to the device and updates copied back, without making the host wait.

The loader hands out a meta-batch's ids on the host, long before its losses exist, so the
channel can stage the scores ahead of time:

1. :meth:`prefetch` gathers the rows from the host store into a pinned buffer and starts a
   non-blocking copy to the device (call it as soon as the loader yields the meta-batch);
2. :meth:`fetch` returns those rows on the device (staging them now if nothing was prefetched);
3. :meth:`commit` starts a non-blocking copy of the updated rows back into a pinned buffer and
   records a CUDA event; the rows reach the host store once that event has completed, checked
   with ``Event.query()`` at the next call, never waited for in the training step.

Until an update is committed, a later fetch of the same ids reads it from the device copy
(an overlay by ``searchsorted``, no host sync), so the selector always sees exactly the scores a
synchronous store would hold. At most ``max_pending`` updates stay uncommitted; past that the
oldest is waited for (back-pressure when the host runs far ahead of the GPU). The store calls
:meth:`flush` before any whole-store read (pruning, saving, checkpoints).

The same code runs on CPU, where an update "completes" when ``max_pending`` newer ones exist or
at :meth:`flush`: its results are identical to the synchronous path, which the tests check.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:  # the store makes its channels (ScoreStore.channel), so it imports this module
    from .store import ScoreStore


@dataclass
class _Update:
    ids: np.ndarray                   # host ids, for the commit
    host: torch.Tensor                # the rows on the host (pinned; filled by the copy)
    event: torch.cuda.Event | None    # completes when ``host`` holds the rows
    sorted_ids: torch.Tensor          # device ids, sorted, for the overlay
    sorted_values: torch.Tensor       # device rows in that order


@dataclass
class _Staged:
    ids: np.ndarray
    rows: torch.Tensor
    ids_device: torch.Tensor
    pending: list[_Update]            # updates not in the host store when ``rows`` were read


class FeedbackChannel:
    """Asynchronous gather/scatter between a host :class:`ScoreStore` and ``device``.

    Make one with :meth:`ScoreStore.channel`, which keeps one per device for the store.

    Args:
        store: the host store (in memory on the CPU, or memory-mapped).
        device: where the losses and the selection live.
        max_pending: uncommitted updates allowed before the oldest is waited for.
    """

    def __init__(self, store: "ScoreStore", device: torch.device | str, max_pending: int = 16) -> None:
        if store.device.type != "cpu":
            raise ValueError(f"FeedbackChannel needs a host store, got one on {store.device}; a "
                             "store on the losses' device needs no channel")
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self.store = store
        self.device = torch.device(device)
        self.max_pending = max_pending
        self._cuda = self.device.type == "cuda"
        self._pending: list[_Update] = []
        self._staged: _Staged | None = None
        self._free: list[tuple[torch.Tensor, torch.cuda.Event | None]] = []  # pinned buffers
        store.attach(self)

    # ----------------------------------------------------------- buffers
    def _buffer(self, n: int) -> torch.Tensor:
        """A host buffer of >= n floats whose previous copy has finished."""
        for i, (buf, event) in enumerate(self._free):
            if buf.numel() >= n and (event is None or event.query()):
                del self._free[i]
                return buf[:n]
        return torch.empty(n, dtype=torch.float32, pin_memory=self._cuda)

    def _recycle(self, buf: torch.Tensor, event: torch.cuda.Event | None) -> None:
        if len(self._free) < 2 * self.max_pending + 4:
            self._free.append((buf, event))

    def _record(self) -> torch.cuda.Event | None:
        if not self._cuda:
            return None
        event = torch.cuda.Event()
        event.record()
        return event

    # ----------------------------------------------------------- staging
    def prefetch(self, ids: torch.Tensor) -> None:
        """Start moving the scores of (host) ``ids`` to the device."""
        self._staged = self._stage(ids)

    def _stage(self, ids: torch.Tensor, checked: bool = False) -> _Staged:
        self._commit_ready()
        ids = torch.as_tensor(ids)
        if ids.device.type != "cpu":
            raise ValueError("ids must be on the host (as the loader yields them) to be staged")
        if not checked:
            self.store.check_ids(ids)
        ids_np = ids.numpy().astype(np.int64, copy=False)
        host = self._buffer(len(ids_np))
        self.store.gather_numpy(ids_np, out=host.numpy())
        if self._cuda:
            rows = host.to(self.device, non_blocking=True)
            self._recycle(host, self._record())  # reusable once the copy has run
        else:
            rows = host  # no copy on the host: the buffer is the rows, not recycled
        ids_device = ids.to(self.device, non_blocking=True)
        return _Staged(ids_np, rows, ids_device, list(self._pending))

    def fetch(self, ids: torch.Tensor) -> torch.Tensor:
        """Current scores of (range-checked, host) ``ids`` on the device, in-flight updates
        included."""
        staged, self._staged = self._staged, None
        ids_np = torch.as_tensor(ids).cpu().numpy()
        if staged is None or not np.array_equal(staged.ids, ids_np):
            staged = self._stage(torch.as_tensor(ids).cpu(), checked=True)  # the selector checked
        rows = staged.rows
        # updates that were in flight when the rows were read (some may have been committed
        # since, after the read) and every later one; oldest first, so a newer update wins
        seen = {id(u) for u in staged.pending}
        for update in staged.pending + [u for u in self._pending if id(u) not in seen]:
            pos = torch.searchsorted(update.sorted_ids, staged.ids_device)
            pos = pos.clamp_max(update.sorted_ids.numel() - 1)
            hit = update.sorted_ids[pos] == staged.ids_device
            rows = torch.where(hit, update.sorted_values[pos], rows)
        return rows

    # ----------------------------------------------------------- writing back
    def commit(self, ids: torch.Tensor, values: torch.Tensor) -> None:
        """Write ``values`` (on the device) back to the store for ``ids`` without waiting. No
        ids (an empty meta-batch) is a no-op: an empty update would break :meth:`fetch`'s
        overlay of pending updates."""
        ids = torch.as_tensor(ids)
        if ids.numel() == 0:
            return
        ids_np = ids.cpu().numpy().astype(np.int64, copy=True)
        values = values.detach().to(self.device, torch.float32)
        host = self._buffer(values.numel())
        host.copy_(values, non_blocking=True)
        ids_device = ids.to(self.device, non_blocking=True)
        sorted_ids, order = ids_device.sort()
        self._pending.append(_Update(ids_np, host, self._record(), sorted_ids, values[order]))
        while len(self._pending) > self.max_pending:
            self._commit_oldest()

    def _commit_oldest(self) -> None:
        update = self._pending.pop(0)
        if update.event is not None:
            update.event.synchronize()
        self.store.scatter(torch.from_numpy(update.ids), update.host, checked=True)
        self._recycle(update.host, None)

    def _commit_ready(self) -> None:
        """Commit, in order, the updates whose copies have finished (never waits)."""
        while self._pending and self._pending[0].event is not None and self._pending[0].event.query():
            self._commit_oldest()

    def flush(self) -> None:
        """Commit every update (waits for the device: call it outside the hot path)."""
        while self._pending:
            self._commit_oldest()

    @property
    def pending(self) -> int:
        """Updates not yet in the host store."""
        return len(self._pending)
