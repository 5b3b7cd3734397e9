"""`MetaBatch`: what `ESDataset` yields — B samples, their stable ids, and the epoch."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch


def _map_tensors(obj: Any, fn) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        mapped = [_map_tensors(v, fn) for v in obj]
        return type(obj)(*mapped) if hasattr(obj, "_fields") else type(obj)(mapped)
    return obj


@dataclass
class MetaBatch:
    """A meta-batch of samples with their global ids.

    Attributes:
        ids: int64 tensor [B] of global sample ids (see :class:`es_stream.Corpus`).
        data: the collated samples (by default a dict of tensors and lists, webdataset-style);
            None when no sample of the meta-batch could be read (``len(mb) == 0``, all of its
            ids in ``lost_ids``), since there is nothing to collate.
        epoch: the epoch this meta-batch belongs to.
        lost_ids: ids that were meant for this meta-batch but lost to a bad sample or shard
            under ``on_error="skip"`` (empty otherwise). Each lost id is reported once, on
            this meta-batch only; sum their lengths to count losses when iterating through
            DataLoader workers. ``ids`` and ``lost_ids`` together are the ids the plan gave
            this meta-batch.
        weights: float32 tensor [len(mb)] of per-sample loss weights, always present: a
            pruning manifest's (InfoBatch's ``1/(1-r)`` for kept low-score samples, 1 for the
            others), and all ones in an epoch that rescales nothing (no manifest, ESWP, a
            burn-in or annealing epoch). So ``(losses * mb.weights).mean()`` is right in every
            epoch; it equals ``losses.mean()`` exactly where nothing is rescaled. Passing
            ``weights=None`` to the constructor gives the ones.
    """

    ids: torch.Tensor
    data: Any
    epoch: int
    lost_ids: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))
    weights: torch.Tensor = None  # type: ignore[assignment]  # None -> ones, in __post_init__

    def __post_init__(self) -> None:
        if self.weights is None:  # one code path for the loss whether or not an epoch rescales
            self.weights = torch.ones(self.ids.shape, dtype=torch.float32, device=self.ids.device)

    def __len__(self) -> int:
        return int(self.ids.numel())

    def pin_memory(self) -> "MetaBatch":
        """Called by ``DataLoader(pin_memory=True)``: pins every tensor."""
        pin = torch.Tensor.pin_memory
        return replace(self, ids=pin(self.ids), data=_map_tensors(self.data, pin),
                       weights=pin(self.weights))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "MetaBatch":
        """Move ids, weights and every tensor in ``data`` to ``device``."""
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return replace(self, ids=move(self.ids), data=_map_tensors(self.data, move),
                       weights=move(self.weights))
