"""Where this process stands: its rank and the world size, and its DataLoader worker."""

from __future__ import annotations

import os

import torch.distributed as dist
from torch.utils.data import get_worker_info


def rank_and_world_size() -> tuple[int, int]:
    """From the initialised process group, else ``RANK``/``WORLD_SIZE`` (torchrun sets them),
    else a single process."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def worker_and_count() -> tuple[int, int]:
    """This DataLoader worker's id and the number of workers; (0, 1) in the main process."""
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)
