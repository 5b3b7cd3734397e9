"""Scan a tar shard's headers into a sample layout, without reading payloads when the file can
seek.

Samples are grouped exactly as webdataset groups them: consecutive regular files whose names
share the prefix before the first dot of the basename (``webdataset.tariterators.base_plus_ext``),
suffixes lower-cased, ``__meta__`` names skipped; a repeated suffix inside one sample is an
error, as in webdataset. PAX and global headers are parsed by :mod:`tarfile` and never counted.
"""

from __future__ import annotations

import re
import tarfile
from dataclasses import dataclass, field
from typing import IO

from webdataset.tariterators import base_plus_ext, meta_prefix, meta_suffix

from .errors import ShardError

_SKIP_META = re.compile(r"__[^/]*__($|/)")  # webdataset.tar_file_iterator's default skip_meta
BLOCK = tarfile.BLOCKSIZE


@dataclass
class ShardLayout:
    """Where each sample of one tar shard lies.

    ``offsets[i]`` is the byte offset of sample i's first header (a PAX header when there is
    one), ``lengths[i]`` the bytes up to the end of its last member's padded payload.
    ``members[i]`` lists ``(suffix, offset relative to offsets[i], size)`` per file.
    """

    keys: list[str] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    members: list[list[tuple[str, int, int]]] = field(default_factory=list)
    size: int = 0  # bytes of the archive that were scanned (header blocks included)

    def __len__(self) -> int:
        return len(self.keys)


class CountingReader:
    """A read-only file wrapper that counts the bytes read through it."""

    def __init__(self, fileobj: IO[bytes]) -> None:
        self.fileobj = fileobj
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = self.fileobj.read(size)
        self.count += len(data)
        return data


def _end_of(info: tarfile.TarInfo) -> int:
    return info.offset_data + -(-info.size // BLOCK) * BLOCK


def scan_tar(fileobj: IO[bytes], name: str, *, seekable: bool) -> ShardLayout:
    """Scan one tar archive. ``name`` is used in error messages only.

    Raises :class:`ShardError` for truncated or corrupt archives: tarfile stops silently at a
    bad header after the first one, so the bytes past the last member are checked to be the
    zero blocks that end an archive.
    """
    layout = ShardLayout()
    current_key: str | None = None
    current: list[tuple[str, int, int]] = []
    start = 0
    end = 0

    def close_sample() -> None:
        if current_key is not None:
            layout.keys.append(current_key)
            layout.offsets.append(start)
            layout.lengths.append(end - start)
            layout.members.append(current)

    counter = None if seekable else CountingReader(fileobj)
    try:
        archive = tarfile.open(fileobj=fileobj if seekable else counter, mode="r:" if seekable else "r|")
        for info in archive:
            end_of_member = _end_of(info)
            fname = info.name
            if (
                not info.isreg()
                or ("/" not in fname and fname.startswith(meta_prefix) and fname.endswith(meta_suffix))
                or _SKIP_META.match(fname)
            ):
                continue
            prefix, suffix = base_plus_ext(fname)
            if prefix is None:
                continue
            suffix = suffix.lower()
            if prefix != current_key:
                close_sample()
                current_key, current, start = prefix, [], info.offset
            elif any(s == suffix for s, _, _ in current):
                raise ShardError(name, f"duplicate file {fname!r} in sample {prefix!r}; "
                                 "webdataset would refuse this shard too — rewrite it")
            current.append((suffix, info.offset_data - start, info.size))
            end = end_of_member
            if not seekable:
                archive.members = []  # streaming: do not keep every TarInfo alive
        close_sample()
        scanned = archive.offset
        # What follows the last member must be end-of-archive zero blocks; anything else is a
        # header tarfile could not parse (corruption) that it would otherwise skip in silence.
        if seekable:
            total = fileobj.seek(0, 2)
            fileobj.seek(scanned)
            read = fileobj.read
        else:
            read = archive.fileobj.read  # tarfile's stream buffers ahead of fileobj
        while chunk := read(1 << 20):
            if chunk.strip(b"\0"):
                raise ShardError(name, f"corrupt tar header at byte {scanned}: the bytes after "
                                 "the last readable member are not end-of-archive padding — "
                                 "the shard is corrupt or truncated; re-create it")
    except tarfile.TarError as exc:
        raise ShardError(name, f"not a readable tar archive ({exc}); the shard is truncated or "
                         "corrupt — re-create it or remove it from the corpus") from exc
    available = total if counter is None else counter.count
    if end > available:
        raise ShardError(name, f"truncated: the last sample ends at byte {end} but the archive "
                         f"has {available} bytes; re-create the shard")
    layout.size = available
    return layout
