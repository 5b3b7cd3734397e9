"""Where this process stands (its rank, the world size, its DataLoader worker), and the merge
that keeps every rank's score store equal."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import get_worker_info

if TYPE_CHECKING:
    from .store import ScoreStore


def rank_and_world_size() -> tuple[int, int]:
    """From the initialised process group, else ``RANK``/``WORLD_SIZE`` (torchrun sets them),
    else a single process. A variable that is set must be an integer, with
    ``0 <= RANK < WORLD_SIZE``; otherwise a ValueError names it and its value."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    rank, world = _env_int("RANK", 0, 0), _env_int("WORLD_SIZE", 1, 1)
    if rank >= world:
        raise ValueError(f"environment variable RANK={rank} is not below WORLD_SIZE={world}; "
                         "set both as torchrun does (0 <= RANK < WORLD_SIZE), or unset them for "
                         "a single process")
    return rank, world


def ranks_per_node(world_size: int) -> int:
    """Ranks sharing this machine: ``LOCAL_WORLD_SIZE`` (torchrun sets it), else 1, at most
    ``world_size``. What a machine-wide cache (staged remote shards) decides from."""
    return min(_env_int("LOCAL_WORLD_SIZE", 1, 1), max(world_size, 1))


def _env_int(name: str, default: int, minimum: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise ValueError(f"environment variable {name}={raw!r} must be an integer >= {minimum} "
                         "(torchrun sets it); fix or unset it (unset: a single process)")
    return value


def worker_and_count() -> tuple[int, int]:
    """This DataLoader worker's id and the number of workers; (0, 1) in the main process."""
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class UpdateLog:
    """The ids a rank's score store updated since the last :func:`merge_rank_scores`: what this
    rank must send the others at the epoch's end. It logs only under ``torch.distributed`` with
    more than one rank (a single process has nobody to tell), from the first update made there.
    """

    def __init__(self) -> None:
        self._ids: list[torch.Tensor] | None = None  # None: not logging

    def record(self, ids: torch.Tensor) -> None:
        """Log ``ids`` (an int64 tensor, on any device) as updated."""
        if self._ids is None:
            if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
                return
            self._ids = []
        self._ids.append(ids.clone())

    def take(self) -> np.ndarray:
        """Sorted unique ids logged since the last call (host numpy); empties the log."""
        log = self._ids or []
        if self._ids is not None:
            self._ids = []
        if not log:
            return np.empty(0, np.int64)
        return np.unique(torch.cat([t.cpu() for t in log]).numpy())

    def ids(self) -> torch.Tensor | None:
        """A copy of the logged ids, sorted and unique (None when not logging); the log keeps
        them."""
        if self._ids is None:
            return None
        ids = torch.from_numpy(self.take())
        self._ids = [ids]
        return ids.clone()

    def load_ids(self, ids: torch.Tensor | None) -> None:
        """Replace the log by ``ids`` (None: not logging), as :meth:`ids` returned them."""
        self._ids = None if ids is None else [torch.as_tensor(ids, dtype=torch.int64)]

    def state_dict(self) -> dict[str, torch.Tensor | None]:
        """The logged ids, for checkpoints: a run resumed mid-epoch must still share what it
        updated before the checkpoint."""
        return {"ids": self.ids()}

    def load_state_dict(self, state: dict[str, torch.Tensor | None]) -> None:
        """Replace the log by a checkpoint's (see :meth:`state_dict`)."""
        self.load_ids(state["ids"])


def merge_rank_scores(store: "ScoreStore", group: dist.ProcessGroup | None = None,
                      chunk: int = 1 << 22) -> int:
    """Give every rank the scores every other rank updated since the last merge.

    Call it at each epoch end on every rank (:class:`es_stream.Pruner` does, before deciding).
    Each rank trains on its own part of the epoch, so each updated a disjoint set of scores; the
    store logs those ids (under multi-rank training only) and here every rank ``all_gather``\\ s
    the ``(id, score)`` pairs of all ranks and applies them in rank order, so all ranks end with
    identical stores. Cost: 12 bytes (int64 id + float32 score) per updated sample received by
    every rank per merge, sent ``chunk`` pairs at a time to bound memory; on the epoch's forward
    passes (several KB to MB per sample) this is noise. Works with gloo (CPU tensors) and NCCL
    (tensors on this rank's GPU). Returns the number of pairs applied (0 on a single process).

    If two ranks did update one id, the higher rank's value wins on every rank.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    world = dist.get_world_size(group)
    if world == 1:
        return 0
    store.sync()
    ids = store.take_update_log()  # host numpy whatever the store's device
    scores = store.gather_numpy(ids) if len(ids) else np.empty(0, np.float32)
    wire = wire_device(dist.get_backend(group))
    sizes = [int(s[0]) for s in all_gather_host(torch.tensor([len(ids)]), world, wire, group)]
    applied = 0
    for start in range(0, max(sizes), chunk):
        width = min(chunk, max(sizes) - start)
        mine = slice(start, min(start + width, len(ids)))
        send_ids = torch.full((width,), -1, dtype=torch.int64)
        send_scores = torch.zeros(width, dtype=torch.float32)
        n_mine = max(0, mine.stop - mine.start)
        send_ids[:n_mine] = torch.from_numpy(ids[mine])
        send_scores[:n_mine] = torch.from_numpy(scores[mine])
        got_ids = all_gather_host(send_ids, world, wire, group)
        got_scores = all_gather_host(send_scores, world, wire, group)
        for rank in range(world):
            valid = max(0, min(width, sizes[rank] - start))
            if valid:  # host tensors: the store moves them to its device (and checks them)
                store.scatter(got_ids[rank][:valid], got_scores[rank][:valid], checked=True)
                applied += valid
    store.take_update_log()  # what was just applied came from the merge, not from training
    return applied


def wire_device(backend: str) -> torch.device:
    """Where a collective's tensors must live: this rank's current GPU for NCCL, else the CPU
    (gloo). Independent of where the score store lives: the merge reads and writes the store
    through host arrays, so a CUDA store under gloo and a CPU store under NCCL both work."""
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_host(tensor: torch.Tensor, world: int, wire: torch.device,
                    group: dist.ProcessGroup | None = None) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (same shape and dtype on every rank), gathered over ``wire`` and
    returned on the host: the one place the merge moves data between devices (once per merge
    chunk, never per step)."""
    sent = tensor.to(wire)
    got = [torch.empty_like(sent) for _ in range(world)]
    dist.all_gather(got, sent, group=group)
    return [g.cpu() for g in got]
