"""How a sample is decoded and collated by default: webdataset's decoders (with no pickle
loaded unless asked for) and ``default_collate`` that keeps PIL images as lists."""

from __future__ import annotations

import io
import pickle
import re
import sys
from typing import Any, Callable

from torch.utils.data import default_collate

#: tar member suffixes webdataset's default decoders unpickle
PICKLE_SUFFIXES = ("pyd", "pickle", "pkl")


def refuse_pickles(key: str, data: bytes) -> Any:
    """A webdataset handler placed before its default ones: refuses pickle members and loads
    ``.pth`` with ``torch.load(weights_only=True)``; None (not mine) for every other file."""
    extension = re.sub(r".*[.]", "", key).lower()
    if extension in PICKLE_SUFFIXES:
        raise ValueError(f"{key!r} is a pickle, which runs code when loaded; es-stream does not "
                         "unpickle by default: pass allow_unsafe_types=True (ESDataset) for data "
                         "you trust, or a decode= handler of your own for this file")
    if extension == "pth":
        import torch

        try:
            return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
        except pickle.UnpicklingError as exc:
            raise ValueError(f"{key!r} holds more than tensors, which torch.load would run code "
                             "to rebuild; pass allow_unsafe_types=True (ESDataset) for data you "
                             f"trust ({str(exc).splitlines()[0]})") from exc
    return None


def webdataset_decode(*handlers: str | Callable, partial: bool = False,
                      allow_unsafe_types: bool = False) -> Callable[[dict], Any]:
    """webdataset's decoding, as ``wds.WebDataset(...).decode(*handlers)`` builds it:
    ``webdataset.autodecode.Decoder([...])`` whose handlers are ``imagehandler(spec)`` for a
    string and the callable itself otherwise, between webdataset's default pre-handlers
    (``.gz``) and post-handlers (``.cls`` -> int, ``.txt`` -> str, ``.json``, ``.npy``,
    ``.pth``, ...; unknown suffixes stay bytes). No handlers: the default decoding alone.

    Except that nothing is unpickled unless ``allow_unsafe_types``: loading a pickle runs
    whatever code its author put in it. Files ending ``.pyd``, ``.pickle`` or ``.pkl`` are
    refused (a ``ValueError`` naming the file and the opt-in), and ``.pth`` is read by
    ``torch.load(weights_only=True)``, which loads tensors and plain containers only. A handler
    of yours for those suffixes, given here, runs before this rule.

    Raises ``ValueError`` listing the valid image specs for an unknown string, ``TypeError``
    for a handler that is neither a string nor callable."""
    from webdataset.autodecode import Decoder, imagehandler, imagespecs

    built = []
    for h in handlers:
        if isinstance(h, str):
            if h.lower() not in imagespecs:
                raise ValueError(f"decode={h!r} is not one of webdataset's image decoder "
                                 f"shorthands {sorted(imagespecs)}; pass one of them, or a "
                                 "function sample -> decoded sample")
            built.append(imagehandler(h.lower()))
        elif callable(h):
            built.append(h)
        else:
            raise TypeError(f"decode: a handler must be a webdataset image spec (a string such "
                            f"as 'pil') or a callable (key, data) -> value, got "
                            f"{type(h).__name__} {h!r:.60}")
    if not allow_unsafe_types:
        built.append(refuse_pickles)
    return Decoder(built, partial=partial)


def _as_list(batch: list, *, collate_fn_map: Any = None) -> list:
    return list(batch)


def collate_samples(batch: list) -> Any:
    """ESDataset's default collation: ``torch.utils.data.default_collate``, except that PIL
    images (what ``decode="pil"`` gives) stay a list, as webdataset's own collation keeps
    objects it cannot stack, instead of default_collate's TypeError."""
    from torch.utils.data._utils.collate import collate, default_collate_fn_map

    image = sys.modules.get("PIL.Image")  # no PIL imported: no PIL image to collate
    if image is None:
        return default_collate(batch)
    return collate(batch, collate_fn_map={**default_collate_fn_map, image.Image: _as_list})


def resolve_decode(decode: Any, format: str, allow_unsafe_types: bool = False
                   ) -> Callable[[dict], Any] | None:
    """The per-sample function ``ESDataset(decode=...)`` stands for (see its docstring)."""
    if decode is None:
        return webdataset_decode(allow_unsafe_types=allow_unsafe_types) if format == "wds" else None
    # MDS columns are typed already: only bytes columns pass the handlers (partial decoding)
    partial = format == "mds"
    if isinstance(decode, str):
        return webdataset_decode(decode, partial=partial, allow_unsafe_types=allow_unsafe_types)
    if isinstance(decode, (list, tuple)):
        return webdataset_decode(*decode, partial=partial, allow_unsafe_types=allow_unsafe_types)
    if not callable(decode):
        raise TypeError(f"decode must be a function sample -> decoded sample, a webdataset image "
                        f"spec such as 'pil', or a list of specs and webdataset handlers; got "
                        f"{type(decode).__name__} {decode!r:.60}")
    return decode
