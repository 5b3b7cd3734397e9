"""Framework-free helpers for batches that carry es-stream sample ids: take the ids out of a
tuple or dict batch, and keep the rows of a batch that a selector chose.

A batch is what a DataLoader's default collate makes: a tuple/list of fields or a dict of
fields, each field a tensor whose first dimension is the sample, or a list with one entry per
sample (e.g. strings), possibly nested. Scalars and 0-d tensors are left as they are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

IdKey = str | int


def default_id_key(batch: Any) -> IdKey:
    """``"es_id"`` for a dict batch, the last element (-1) for a tuple/list batch."""
    return "es_id" if isinstance(batch, Mapping) else -1


def split_ids(batch: Any, id_key: IdKey) -> tuple[torch.Tensor, Any]:
    """``(ids, batch without them)``: ids as an int64 CPU tensor ``[B]``.

    ``id_key`` is a key of a dict batch or an index (negative allowed) into a tuple/list batch.
    """
    if isinstance(batch, Mapping):
        if not isinstance(id_key, str) or id_key not in batch:
            raise KeyError(f"the batch (a dict with keys {sorted(map(str, batch))}) has no sample-id "
                           f"field {id_key!r}: yield the es-stream id with each sample (e.g. "
                           "ESStreamingDataset adds 'es_id') or pass id_key=")
        ids = batch[id_key]
        rest: Any = {k: v for k, v in batch.items() if k != id_key}
        if type(batch) is not dict:
            rest = _copy_mapping(batch, rest)
    elif isinstance(batch, (tuple, list)):
        if isinstance(id_key, bool) or not isinstance(id_key, (int, np.integer)) or \
                not -len(batch) <= id_key < len(batch):
            raise KeyError(f"the batch is a {type(batch).__name__} of {len(batch)} fields; id_key "
                           f"{id_key!r} must be an index into it (the default -1 is the last field)")
        position = int(id_key) % len(batch)
        ids = batch[position]
        fields = [v for i, v in enumerate(batch) if i != position]
        rest = fields if isinstance(batch, list) else tuple(fields)
    else:
        raise TypeError(f"cannot find sample ids in a batch of type {type(batch).__name__}: use a "
                        "tuple or dict batch with an id field")
    ids = torch.as_tensor(ids)
    if ids.dim() != 1 or ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"batch field {id_key!r} must hold one integer sample id per sample, got "
                         f"{ids.dtype} of shape {tuple(ids.shape)}")
    return ids.to("cpu", torch.int64), rest


def batch_size_of(batch: Any) -> int | None:
    """First dimension of the first tensor found in ``batch`` (None if it holds none)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else None
    values = batch.values() if isinstance(batch, Mapping) else (
        batch if isinstance(batch, (tuple, list)) else ())
    for value in values:
        size = batch_size_of(value)
        if size is not None:
            return size
    return None


def take_rows(batch: Any, index: torch.Tensor, size: int, path: str = "batch") -> Any:
    """The rows ``index`` of every per-sample field of ``batch`` (a meta-batch of ``size``).

    Tensors whose first dimension is ``size`` are indexed on their own device; lists of
    ``size`` non-container entries are picked; tuples, lists of containers and dicts are
    walked. A tensor or list with another length is refused: it cannot be told apart from a
    misaligned field.
    """
    if isinstance(batch, torch.Tensor):
        if batch.dim() == 0:
            return batch
        if batch.shape[0] != size:
            raise ValueError(f"{path}: tensor of shape {tuple(batch.shape)} does not have one row "
                             f"per sample of the meta-batch ({size}); ES can only select batches "
                             "whose tensors are sample-first")
        return batch[index.to(batch.device)]
    if isinstance(batch, Mapping):
        values = {k: take_rows(v, index, size, f"{path}[{k!r}]") for k, v in batch.items()}
        return values if type(batch) is dict else _copy_mapping(batch, values)
    if isinstance(batch, (tuple, list)) and not isinstance(batch, (str, bytes)):
        if all(isinstance(v, (torch.Tensor, Mapping, tuple, list)) for v in batch):
            fields = [take_rows(v, index, size, f"{path}[{i}]") for i, v in enumerate(batch)]
            return fields if isinstance(batch, list) else _rebuild_tuple(batch, fields)
        if len(batch) != size:
            raise ValueError(f"{path}: list of {len(batch)} entries does not have one entry per "
                             f"sample of the meta-batch ({size})")
        picked = [batch[i] for i in index.tolist()]
        return picked if isinstance(batch, list) else tuple(picked)
    return batch


def _rebuild_tuple(original: Sequence, fields: list) -> tuple:
    if hasattr(original, "_fields"):  # a namedtuple takes its fields as arguments
        return type(original)(*fields)
    return type(original)(fields)


def _copy_mapping(original: Mapping, values: dict) -> Mapping:
    # dict subclasses (e.g. transformers' BatchEncoding) are rebuilt from a plain dict
    try:
        return type(original)(values)
    except TypeError:
        return values
