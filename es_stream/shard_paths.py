"""Shard names and the paths they stand for: which are local, how a directory or brace pattern
expands to shards, and how an index file stores a local path so that it travels with the file.

A shard name is what webdataset takes: a path, a ``file:`` URL, a ``pipe:`` command or a remote
URL. Only paths and ``file:`` URLs are local (read by seeking); the others are streamed.

**Paths in a saved index.** A local path is stored relative to the directory of the index file
when it lies under that directory, absolute otherwise (:func:`stored_path`); on load it is
resolved against the index file's directory, or a ``root`` given instead (:func:`resolve_path`).
An index moved together with its shards, or read from another working directory, finds them;
one moved away from shards stored as absolute paths finds them where they were.
"""

from __future__ import annotations

import glob
import os
import warnings
from typing import Sequence
from urllib.parse import urlparse
from urllib.request import url2pathname

from .errors import ShardError

#: How an index written by this version stores local paths; see the module docstring. An
#: index without it is older: its relative paths are taken relative to the working directory.
RELATIVE_TO_INDEX = "relative-to-index"


def is_local_url(url: str) -> bool:
    """True for a plain path or a ``file:`` URL, which es-stream reads by seeking."""
    return url.startswith("file:") or (not url.startswith("pipe:") and "://" not in url)


def local_path(url: str) -> str:
    """The path of a local shard: ``url`` itself, or a ``file:`` URL's path read as
    webdataset's ``gopen`` reads it (``urlparse`` + ``url2pathname``: ``file:///abs/a%20b.tar``
    is ``/abs/a b.tar``, ``file:rel.tar`` is ``rel.tar``). A ``file://HOST/...`` URL naming a
    host other than ``localhost`` is refused: it is not a path on this machine."""
    if not url.startswith("file:"):
        return url
    parsed = urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise ShardError(url, f"a file: URL with host {parsed.netloc!r} is not a local path; "
                         "write file:///absolute/path.tar or file:relative/path.tar")
    return url2pathname(parsed.path)


# Files a directory of shards may hold that es-stream's tar reader cannot index, with advice.
_OTHER_SHARDS = (
    ((".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst", ".tar.zstd",
      ".tar.lz4"),
     "compressed tar shards", "they cannot be read by seeking: decompress them to .tar, or "
     "pass them as streamed URLs such as 'pipe:gzip -dc FILE'"),
    ((".mds", ".mds.zstd", ".mds.zst", ".mds.gz", ".mds.bz2", ".mds.snappy", ".mds.br",
      "index.json"),
     "MosaicML MDS files", "index an MDS directory with Corpus.from_mds(local=DIR)"),
)


def _other_shards(directory: str) -> str:
    """The shard-like files of ``directory`` that are not ``.tar``, described with what to do
    about them ("" when there are none)."""
    names = sorted(os.listdir(directory))
    found = []
    for suffixes, kind, advice in _OTHER_SHARDS:
        hits = [n for n in names if n.lower().endswith(suffixes)]
        if hits:
            found.append(f"{len(hits)} {kind} ({_listed(hits)}): {advice}")
    return "; ".join(found)


def _listed(names: list[str], limit: int = 4) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _expand_directory(directory: str) -> list[str]:
    """The ``.tar`` shards of ``directory``, sorted. Shard-like files it cannot read
    (compressed tar, MDS) are never skipped in silence: with no ``.tar`` beside them they are a
    :class:`ShardError` saying what was found and what to do, beside ``.tar`` shards a
    ``UserWarning`` naming them (the corpus is the ``.tar`` shards alone)."""
    found = sorted(glob.glob(os.path.join(glob.escape(directory), "*.tar")))
    described = _other_shards(directory)
    if not found:
        subdirs = sorted(e.name for e in os.scandir(directory)
                         if e.is_dir() and glob.glob(os.path.join(glob.escape(e.path), "*.tar")))
        hint = (f"; subdirectories {_listed(subdirs)} hold .tar shards: pass one of them" if
                subdirs else "")
        raise ShardError(directory, "directory holds no .tar shards"
                         + (f"; it holds {described}" if described else "") + hint)
    if described:
        warnings.warn(f"{directory}: indexing its {len(found)} .tar shards only; it also holds "
                      f"{described}; these are not part of the corpus", UserWarning, stacklevel=4)
    return found


def expand_urls(urls: str | os.PathLike | Sequence[str]) -> list[str]:
    """A brace pattern, a directory of ``.tar`` files (a path or a ``file:`` URL), or a list
    of paths/URLs -> shard list. A directory's other shard-like files are reported (see
    :func:`_expand_directory`)."""
    if isinstance(urls, (str, os.PathLike)):
        text = os.fspath(urls)
        if is_local_url(text) and os.path.isdir(local_path(text)):
            return _expand_directory(local_path(text))
        from braceexpand import braceexpand  # a webdataset dependency

        return list(braceexpand(text))
    return [os.fspath(u) for u in urls]

def stored_path(name: str, index_dir: str) -> str:
    """How an index file in ``index_dir`` stores the local path ``name`` (a path or ``file:``
    URL, relative to the working directory): relative to ``index_dir`` when it lies under it,
    absolute otherwise. A ``file:`` URL is stored as the plain path it names. Streamed URLs are
    stored as they are."""
    if not is_local_url(name):
        return name
    path = os.path.abspath(local_path(name))
    base = os.path.abspath(index_dir)
    if path == base or path.startswith(base.rstrip(os.sep) + os.sep):
        return os.path.relpath(path, base)  # "." for the index's own directory (MDS local)
    return path


def resolve_path(stored: str, root: str) -> str:
    """The path a stored local name stands for: ``stored`` itself when absolute or streamed,
    else ``root`` joined to it (``root`` as given: relative to the working directory when
    relative, so that an index named by a relative path gives the names it was built with)."""
    if not is_local_url(stored) or stored.startswith("file:") or os.path.isabs(stored):
        return stored
    return os.path.join(root, stored)
