"""The MDS column a WebDataset file suffix becomes when a tar corpus is written as MDS
(``es-stream compact --format mds``), so that what a reader gets back is what webdataset's
default decoding gives for the same file: a label stays an ``int``, not ``b"3"``.

The rule follows webdataset's default decoders (``webdataset.autodecode.decoders``), by the
suffix's last dot-separated part (``seg.cls`` is ``cls``), as webdataset does:

============================================  ============  ==================================
suffix                                        MDS column    value read back
============================================  ============  ==================================
``cls`` ``cls2`` ``index`` ``inx`` ``id``     ``int``       ``int`` (webdataset: ``int(data)``)
``txt`` ``text`` ``transcript``               ``str``       ``str`` (UTF-8)
``json`` ``jsn``                              ``json``      the parsed JSON value
``npy``                                       ``ndarray``   ``numpy.ndarray`` (dtype and shape
                                                            kept; never unpickled)
anything else (images, ``pth``, ``pyd``...)   ``bytes``     the file's bytes, unchanged
============================================  ============  ==================================

Images stay encoded bytes (decode them as you would a tar member); pickles are never loaded.
``__key__`` is a ``str`` column. A typed column holds the decoded value, not the file's bytes
(``b"03"`` reads back as ``3``, JSON is re-serialised); ``typed=False`` keeps every file as a
``bytes`` column, byte-identical.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np

__all__ = ["column_encoding", "column_value"]

_INT = {"cls", "cls2", "index", "inx", "id"}
_STR = {"txt", "text", "transcript"}
_JSON = {"json", "jsn"}
_NDARRAY = {"npy"}
_INT64 = (-(2 ** 63), 2 ** 63 - 1)


def _last(suffix: str) -> str:
    return suffix.rsplit(".", 1)[-1].lower()


def column_encoding(suffix: str, typed: bool = True) -> str:
    """The MDS encoding of the column for tar files ending ``.suffix`` (see the module table);
    ``"bytes"`` for every suffix when not ``typed``."""
    if not typed:
        return "bytes"
    last = _last(suffix)
    if last in _INT:
        return "int"
    if last in _STR:
        return "str"
    if last in _JSON:
        return "json"
    if last in _NDARRAY:
        return "ndarray"
    return "bytes"


def column_value(encoding: str, data: bytes, where: str) -> Any:
    """The value of one file's ``data`` for a column of ``encoding`` (from
    :func:`column_encoding`). Raises ``ValueError`` naming ``where`` (the sample and file) when
    the bytes are not what the suffix promises."""
    if encoding == "bytes":
        return data
    try:
        if encoding == "int":
            value = int(data)
            if not _INT64[0] <= value <= _INT64[1]:
                raise ValueError(f"{value} does not fit MDS's int64")
            return value
        if encoding == "str":
            return data.decode("utf-8")
        if encoding == "json":
            return json.loads(data)
        if encoding == "ndarray":
            array = np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
            return np.ascontiguousarray(array)
    except (ValueError, UnicodeDecodeError, OSError, TypeError) as exc:
        raise ValueError(f"{where}: not a valid {encoding} value as webdataset decodes this "
                         f"suffix ({exc}); fix the file, or compact with typed columns off "
                         "(compact(..., typed=False), es-stream compact --bytes-columns), which "
                         "keeps every file as bytes") from exc
    raise ValueError(f"unknown MDS column encoding {encoding!r}")
