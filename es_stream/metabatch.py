"""`MetaBatch`: what `ESDataset` yields — B samples, their stable ids, and the epoch.

**Transport.** A DataLoader worker hands its meta-batches to the training process by pickling
them (torch's ``ForkingPickler``): every CPU tensor goes into its own shared-memory segment, and
each segment's file descriptor is passed over a fresh socket connection — a fixed cost of a few
hundred microseconds a tensor, paid for ``ids``, ``weights``, ``lost_ids`` and every collated
field — while lists of ``bytes``/``str`` (what ``default_collate`` makes of keys, URLs and
undecoded payloads) are pickled object by object. So a pickled :class:`MetaBatch` is *packed*:
its plain CPU tensors are copied into one ``uint8`` tensor (one shared-memory segment when it
crosses processes) and its lists of ``bytes`` or of ``str`` into one byte string plus offsets
(pickled inline: on the machines measured a new shared-memory segment costs more than copying a
few hundred KiB through the pipe). Unpickling rebuilds them — tensors as views of that one
buffer, with their dtypes, shapes and values; lists as new lists of equal ``bytes``/``str``.
Everything else in ``data`` (PIL images, numpy arrays, other objects, tensors on a GPU or
needing grad, and tensors of 1 MiB or more that are already in shared memory, as
``default_collate`` makes them in a worker) is pickled as it is. What arrives equals what was
sent; only the packed tensors now share one storage, as slices of one tensor would.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np
import torch

_ALIGN = 64  # each packed tensor starts at a multiple of this (any dtype's alignment)


@dataclass(frozen=True)
class _Slot:
    """Where a packed leaf lies in the buffer: ``kind`` "tensor" (dtype, shape), "bytes" or
    "str" (item ends, relative to ``start``)."""

    kind: str
    start: int
    nbytes: int
    dtype: Any = None
    shape: tuple[int, ...] = ()
    ends: tuple[int, ...] = ()


_SHARED_ALONE = 1 << 20  # a tensor already in shared memory and this big crosses as it is


def _packable_tensor(obj: Any) -> bool:
    """A plain CPU tensor worth copying into the pack. ``default_collate`` in a DataLoader worker
    already puts its stacked tensors in shared memory: a big one there costs one segment and
    no copy as it is, so only small ones (where the segment's fixed cost dominates) are packed."""
    return (type(obj) is torch.Tensor and obj.device.type == "cpu" and obj.layout == torch.strided
            and not obj.requires_grad and not obj.is_quantized and not obj.is_nested
            and not (obj.is_shared() and obj.numel() * obj.element_size() >= _SHARED_ALONE))


def _text_list(obj: Any) -> str | None:
    """"bytes" or "str" for a non-empty list all of whose items are of that exact type."""
    if type(obj) is not list or not obj:
        return None
    kind = type(obj[0])
    if kind not in (bytes, str) or any(type(v) is not kind for v in obj):
        return None
    return kind.__name__


class _Packer:
    """Collects the packable leaves of a structure: tensors into one byte layout (``size``
    bytes, copied by :meth:`buffer`), lists of bytes/str into one blob (:meth:`blob`)."""

    def __init__(self) -> None:
        self.tensors: list[tuple[int, torch.Tensor]] = []  # (start, flat contiguous tensor)
        self.size = 0
        self.texts: list[bytes] = []
        self.text_size = 0

    def leaf(self, obj: Any) -> Any:
        if _packable_tensor(obj):
            flat = obj.contiguous().reshape(-1)
            nbytes = flat.numel() * flat.element_size()
            start = -(-self.size // _ALIGN) * _ALIGN
            self.size = start + nbytes
            self.tensors.append((start, flat))
            return _Slot("tensor", start, nbytes, obj.dtype, tuple(obj.shape))
        kind = _text_list(obj)
        if kind is None:
            return obj
        items = obj if kind == "bytes" else [v.encode("utf-8", "surrogatepass") for v in obj]
        ends = np.cumsum([len(v) for v in items]).tolist()
        start = self.text_size
        self.texts.extend(items)
        self.text_size += ends[-1]
        return _Slot(kind, start, ends[-1], ends=tuple(ends))

    def walk(self, obj: Any) -> Any:
        if type(obj) is dict:
            return {k: self.walk(v) for k, v in obj.items()}
        if type(obj) is tuple:
            return tuple(self.walk(v) for v in obj)
        if type(obj) is list and _text_list(obj) is None:
            return [self.walk(v) for v in obj]
        return self.leaf(obj)

    def buffer(self) -> torch.Tensor:
        buf = torch.empty(self.size, dtype=torch.uint8)
        for start, flat in self.tensors:
            if flat.numel():  # an empty tensor may have stride 0, which view(uint8) refuses
                buf[start:start + flat.numel() * flat.element_size()] = flat.view(torch.uint8)
        return buf

    def blob(self) -> bytes:
        return b"".join(self.texts)


def _unpack(buf: torch.Tensor, blob: bytes, obj: Any) -> Any:
    if isinstance(obj, _Slot):
        if obj.kind == "tensor":
            return buf[obj.start:obj.start + obj.nbytes].view(obj.dtype).view(obj.shape)
        ends = [obj.start + e for e in obj.ends]
        cuts = zip([obj.start] + ends[:-1], ends)
        if obj.kind == "bytes":
            return [blob[a:b] for a, b in cuts]
        return [blob[a:b].decode("utf-8", "surrogatepass") for a, b in cuts]
    if type(obj) is dict:
        return {k: _unpack(buf, blob, v) for k, v in obj.items()}
    if type(obj) is tuple:
        return tuple(_unpack(buf, blob, v) for v in obj)
    if type(obj) is list:
        return [_unpack(buf, blob, v) for v in obj]
    return obj


def _plain(cls: type, values: dict[str, Any]) -> "MetaBatch":
    return cls(**values)


def _rebuild(cls: type, buf: torch.Tensor, blob: bytes, packed: dict[str, Any]) -> "MetaBatch":
    return cls(**{name: _unpack(buf, blob, value) for name, value in packed.items()})


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

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle as one packed tensor, one blob of texts and a small skeleton (see the module
        docstring)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        try:
            packer = _Packer()
            packed = {name: packer.walk(value) for name, value in values.items()}
            return _rebuild, (type(self), packer.buffer(), packer.blob(), packed)
        except Exception:  # noqa: BLE001 — never fail where plain pickling would not: a
            # DataLoader worker's queue drops an item it cannot pickle and the loader then hangs
            return _plain, (type(self), values)

    def __copy__(self) -> "MetaBatch":
        return replace(self)  # the same tensors and data, as a shallow copy means

    def __deepcopy__(self, memo: dict) -> "MetaBatch":
        return type(self)(**{f.name: copy.deepcopy(getattr(self, f.name), memo)
                             for f in fields(self)})

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
