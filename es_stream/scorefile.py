"""The file a score store is saved to: a float32 ``.npy`` vector (one score per sample id) and
a JSON metadata file beside it that records the corpus, the size and who scored it.

``scores.npy`` -> ``scores.meta.json`` (:func:`metadata_path`); the metadata is put in place
before the ``.npy``, so a saved ``.npy`` never stands without its own.
"""

from __future__ import annotations

import errno
import json
import os
import re
import warnings
from typing import Any

import numpy as np

from .atomic import atomic_write
from ._version import __version__
from .errors import ScoreError

# atomic_write's temporary files: ".<name>.<tempfile's 8 random characters>.tmp"
_TEMPORARY = r"\.{name}\.[a-z0-9_]+\.tmp"


def metadata_path(path: str | os.PathLike) -> str:
    """The metadata file beside a saved store: ``scores.npy`` -> ``scores.meta.json``."""
    path = os.fspath(path)
    return (path[:-4] if path.endswith(".npy") else path) + ".meta.json"


def read_metadata(path: str | os.PathLike) -> dict[str, Any] | None:
    """The metadata :meth:`ScoreStore.save` wrote beside ``path``; None when there is none (a
    ``.npy`` made another way)."""
    meta = metadata_path(path)
    try:
        with open(meta, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        return None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError both are
        data = exc
    if not isinstance(data, dict):
        raise ScoreError(f"{meta}: not the metadata of a score store ({data}); it should be the "
                         f"JSON ScoreStore.save writes beside {os.fspath(path)} — delete it to use "
                         "the scores unchecked, or save the store again")
    return data


def write_metadata(path: str, num_samples: int, fingerprint: str | None,
                    reference: dict[str, Any] | None = None) -> None:
    meta = {"format": "es-stream score store",
            "encoding": "float32 per sample id; 0.0 = never scored (reads as 1/num_samples)",
            "num_samples": num_samples, "corpus_fingerprint": fingerprint,
            "es_stream_version": __version__}
    if reference is not None:  # a reference-model pass wrote these scores (es_stream.reference_scoring)
        meta["reference"] = reference
    with atomic_write(metadata_path(path)) as tmp:
        with open(tmp, "w") as f:
            f.write(json.dumps(meta, indent=1, sort_keys=True) + "\n")


def remove_stale_temporaries(path: str) -> None:
    """Remove the temporary files a killed save (or creation) of ``path`` left beside it: only
    names of atomic_write's pattern for this file or its metadata, never anything else."""
    directory = os.path.dirname(os.path.abspath(path)) or "."
    names = [os.path.basename(path), os.path.basename(metadata_path(path))]
    pattern = re.compile("|".join(_TEMPORARY.format(name=re.escape(n)) for n in names))
    try:
        entries = os.listdir(directory)
    except FileNotFoundError:
        return
    for entry in entries:
        if pattern.fullmatch(entry):
            try:
                os.unlink(os.path.join(directory, entry))
            except FileNotFoundError:
                pass


def saved_length(path: str | os.PathLike) -> tuple[int, int]:
    """``(number of scores, byte offset of the data)`` of a score file (a float32 ``.npy``
    vector), checked; a :class:`ScoreError` naming ``path`` for anything else."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version in ((2, 0), (3, 0)):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
            offset = f.tell()
    except ValueError as exc:
        raise ScoreError(f"{path}: not a .npy score file ({exc}); give the file ScoreStore.save "
                         "or Checkpointer wrote (a float32 .npy, one score per sample id)") from exc
    if dtype != np.float32 or len(shape) != 1 or fortran:
        raise ScoreError(f"{path}: holds {dtype} {shape}, expected a float32 vector of one score "
                         "per sample id; not a score store (np.save(path, scores.astype("
                         "np.float32)) makes one from your own scores)")
    expected = offset + 4 * shape[0]
    size = os.path.getsize(path)
    if size != expected:
        raise ScoreError(f"{path}: {size} bytes, expected {expected}: the file is truncated; "
                         "restore it from a checkpoint's scores.npy")
    return shape[0], offset


def check_length(path: str, held: int, num_samples: int) -> None:
    if held != num_samples:
        raise ScoreError(f"{path}: holds float32 ({held},), expected float32 ({num_samples},): a "
                         "score store of another corpus")


def file_fingerprint(path: str, num_samples: int, expected: str | None) -> tuple[str | None, bool]:
    """The corpus ``path``'s metadata records (None if none) and whether it has metadata at
    all; raises if it records another corpus than ``expected`` or another size."""
    meta = read_metadata(path)
    if meta is None:
        if expected is not None:
            warnings.warn(f"{path}: no {os.path.basename(metadata_path(path))} beside it records "
                          f"which corpus these scores belong to, so they cannot be checked against "
                          f"corpus {expected}; used as they are (ScoreStore.save writes that file)",
                          stacklevel=3)
        return None, False
    if meta.get("num_samples", num_samples) != num_samples:
        raise ScoreError(f"{metadata_path(path)}: records {meta['num_samples']} samples but "
                         f"{path} holds {num_samples}: the two files do not belong together")
    recorded = meta.get("corpus_fingerprint")
    if recorded is not None and expected is not None and recorded != expected:
        raise ScoreError(f"{path}: scores of corpus {recorded} (per {metadata_path(path)}), this "
                         f"corpus is {expected}: a score store of another corpus of the same size; "
                         "give the scores saved for this corpus")
    return recorded, True


def allocate(fd: int, path: str, size: int) -> None:
    """Reserve the blocks of the first ``size`` bytes of the open file ``fd`` (``path``) now.

    A memory-mapped store written through a sparse file gets its blocks when a page is first
    written back, and a full disk then kills the process with SIGBUS. Allocated up front, a
    full disk is a :class:`ScoreError` here, naming the file. Existing data is kept (only holes
    are filled). Where the platform has no ``posix_fallocate`` the file stays sparse.
    """
    fallocate = getattr(os, "posix_fallocate", None)
    if fallocate is None:
        return
    try:
        fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ScoreError(f"{path}: no space to allocate the score store's {size} bytes "
                             f"({os.strerror(exc.errno)}); free space on that file system or put "
                             "the store on another one") from exc
        if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            warnings.warn(f"{path}: the file system cannot preallocate the score store "
                          f"({os.strerror(exc.errno)}); it stays sparse, and a full disk while "
                          "scores are written stops the process with SIGBUS", stacklevel=3)
            return
        raise OSError(exc.errno, f"{path}: cannot allocate the score store's {size} bytes: "
                      f"{os.strerror(exc.errno)}") from exc


def create(path: str, num_samples: int) -> None:
    """A new score file at ``path``: a ``.npy`` header and ``4 n`` zero bytes (every sample
    never scored), allocated (:func:`allocate`) in the temporary file before it is renamed into
    place, so a disk too small leaves nothing behind."""
    with atomic_write(path) as tmp:
        with open(tmp, "r+b") as f:
            np.lib.format.write_array_header_1_0(
                f, {"descr": "<f4", "fortran_order": False, "shape": (num_samples,)})
            size = f.tell() + 4 * num_samples
            f.truncate(size)
            f.flush()
            allocate(f.fileno(), path, size)
