"""Scan a tar shard's headers into a sample layout, without reading payloads when the file can
seek.

Samples are grouped exactly as webdataset groups them: consecutive regular files whose names
share the prefix before the first dot of the basename (``webdataset.tariterators.base_plus_ext``),
suffixes lower-cased, ``__meta__`` names skipped; a repeated suffix inside one sample is an
error, as in webdataset. PAX and global headers are parsed by :mod:`tarfile` and never counted.
Member names are decoded as webdataset decodes them (tarfile's default: the filesystem encoding
with ``surrogateescape``), so a name that is not UTF-8 gives the same key as in webdataset.
"""

from __future__ import annotations

import os
import re
import tarfile
import warnings
from dataclasses import dataclass, field
from typing import IO, Any, Callable

from webdataset.tariterators import base_plus_ext, meta_prefix, meta_suffix

from .errors import ShardError
from .remote.store import reads_by_range
from .shard_identity import content_check
from .shard_paths import local_path

_SKIP_META = re.compile(r"__[^/]*__($|/)")  # webdataset.tar_file_iterator's default skip_meta
BLOCK = tarfile.BLOCKSIZE
# First bytes of the compressed or archive formats most often handed over in place of a tar
# shard; webdataset decompresses some of them on the fly, es-stream cannot seek inside them.
_MAGIC = {b"\x1f\x8b": "gzip-compressed", b"BZh": "bzip2-compressed",
          b"\xfd7zXZ\x00": "xz-compressed", b"\x28\xb5\x2f\xfd": "zstd-compressed",
          b"PK\x03\x04": "a zip archive"}


@dataclass
class ShardLayout:
    """Where each sample of one tar shard lies.

    ``offsets[i]`` is the byte offset of sample i's first header (a PAX header when there is
    one), ``lengths[i]`` the bytes up to the end of its last member's padded payload.
    ``members[i]`` lists ``(suffix, offset relative to offsets[i], size)`` per file.
    ``truncated`` is set when the archive had no end-of-archive marker and the scan was asked to
    accept that; ``dropped`` then holds the key of the last sample, which was left out because
    it may have lost files (empty when no sample began before the cut).
    """

    keys: list[str] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    members: list[list[tuple[str, int, int]]] = field(default_factory=list)
    size: int = 0  # bytes of the archive that were scanned (header blocks included)
    truncated: bool = False
    dropped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.keys)

    def drop_last(self) -> str | None:
        """Remove the last sample and return its key (None when there is none)."""
        if not self.keys:
            return None
        self.offsets.pop()
        self.lengths.pop()
        self.members.pop()
        return self.keys.pop()


class CountingReader:
    """A read-only file wrapper that counts the bytes read through it and keeps the first few
    (to name the format of a stream that is not a tar archive)."""

    def __init__(self, fileobj: IO[bytes]) -> None:
        self.fileobj = fileobj
        self.count = 0
        self.head = b""

    def read(self, size: int = -1) -> bytes:
        data = self.fileobj.read(size)
        if self.count < 8:
            self.head = (self.head + data)[:8]
        self.count += len(data)
        return data


def _end_of(info: tarfile.TarInfo) -> int:
    return info.offset_data + -(-info.size // BLOCK) * BLOCK


def _header_recorder() -> tuple[type[tarfile.TarInfo], list[tarfile.HeaderError]]:
    """A TarInfo class that records every header tarfile fails to read.

    Past the first member tarfile ends its iteration in silence on an empty, short, all-zero or
    invalid header alike; which one it was is the difference between a proper end of archive,
    a cut and corruption.
    """
    stops: list[tarfile.HeaderError] = []

    class RecordingTarInfo(tarfile.TarInfo):
        @classmethod
        def fromtarfile(cls, tf: tarfile.TarFile) -> tarfile.TarInfo:
            try:
                return super().fromtarfile(tf)
            except tarfile.HeaderError as exc:
                stops.append(exc)
                raise

    return RecordingTarInfo, stops


class _Grouper:
    """Groups members into samples as webdataset's ``group_by_keys`` does."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.layout = ShardLayout()
        self.key: str | None = None
        self.current: list[tuple[str, int, int]] = []
        self.start = 0
        self.end = 0  # end of the last sample member's padded payload

    def add(self, info: tarfile.TarInfo) -> None:
        fname = info.name
        is_meta = "/" not in fname and fname.startswith(meta_prefix) and fname.endswith(meta_suffix)
        if not info.isreg() or is_meta or _SKIP_META.match(fname):
            return
        prefix, suffix = base_plus_ext(fname)
        if prefix is None:
            return
        suffix = suffix.lower()
        if prefix != self.key:
            self.close()
            self.key, self.current, self.start = prefix, [], info.offset
        elif any(s == suffix for s, _, _ in self.current):
            raise ShardError(self.name, f"duplicate file {fname!r} in sample {prefix!r}; "
                             "webdataset would refuse this shard too — rewrite it")
        self.current.append((suffix, info.offset_data - self.start, info.size))
        self.end = _end_of(info)

    def close(self) -> None:
        if self.key is not None:
            self.layout.keys.append(self.key)
            self.layout.offsets.append(self.start)
            self.layout.lengths.append(self.end - self.start)
            self.layout.members.append(self.current)
            self.key = None


def _not_tar(name: str, exc: tarfile.TarError, head: bytes) -> ShardError:
    for magic, what in _MAGIC.items():
        if head.startswith(magic):
            return ShardError(name, f"not a tar archive: the file is {what}; es-stream reads "
                              "uncompressed tar shards only (it seeks to each sample) — "
                              "decompress the shard, or list the uncompressed one")
    return ShardError(name, f"not a readable tar archive ({exc}); the shard is truncated or "
                      "corrupt — re-create it or remove it from the corpus")


def _skip_payload(archive: tarfile.TarFile) -> bool:
    """Read a streamed archive forward to the end of the last member's payload, where the next
    header starts; False when the stream ends first (the scan then reports the cut).

    tarfile would skip it itself by reading fixed-size blocks a number of times computed from
    the header's size field alone, even after the stream ended: a header claiming 2^40 bytes
    kept it reading nothing for minutes. Here the skip ends with the stream."""
    stream = archive.fileobj
    position = stream.tell()
    while position < archive.offset:
        got = len(stream.read(min(archive.offset - position, 1 << 20)))
        if got == 0:
            return False
        position += got
    return True


def _drain(read: Callable[[int], bytes]) -> bool:
    """Read to the end; True when every byte read was zero."""
    zero = True
    while chunk := read(1 << 20):
        zero = zero and not chunk.strip(b"\0")
    return zero


def scan_tar(fileobj: IO[bytes], name: str, *, seekable: bool,
             allow_truncated: bool = False) -> ShardLayout:
    """Scan one tar archive. ``name`` is used in error and warning messages only.

    The archive must end with an end-of-archive marker: at least one whole 512-byte zero block
    right after the last member's padded payload. (tar writes two, and python's tarfile and GNU
    tar pad them to a 10 KiB record; a cut after the first zero block loses no data, so it is
    accepted.) Without it the shard was cut — on a member or sample boundary, inside a payload
    or inside a header — and its last sample may have lost files without anything else showing.

    Raises :class:`ShardError` naming the shard when it is truncated, when a header after the
    first cannot be parsed or bytes other than zeros follow the marker (corruption), or when the
    file is not a tar archive at all (a compressed one is named as such). With
    ``allow_truncated`` a truncated shard is accepted instead: its last sample is dropped (it
    may be incomplete), a warning names the shard and the dropped key, and the returned layout
    has ``truncated`` set and ``dropped`` listing the key.
    """
    tarinfo, stops = _header_recorder()
    counter = None if seekable else CountingReader(fileobj)
    try:
        archive = tarfile.open(fileobj=fileobj if seekable else counter,
                               mode="r:" if seekable else "r|", tarinfo=tarinfo)
    except tarfile.TarError as exc:
        if seekable:
            fileobj.seek(0)
        raise _not_tar(name, exc, fileobj.read(8) if seekable else counter.head) from exc
    grouper = _Grouper(name)
    failure: tarfile.TarError | None = None
    try:
        # a stream is skipped forward by this scan, not by tarfile: see _skip_payload
        while (info := archive.next()) is not None:
            grouper.add(info)
            if not seekable:
                archive.members = []  # streaming: do not keep every TarInfo alive
                if not _skip_payload(archive):
                    break
    except tarfile.TarError as exc:  # a member past the first tarfile could not process
        failure = exc
    grouper.close()
    layout = grouper.layout
    scanned = archive.offset  # where the header tarfile could not read starts
    if seekable:
        available = fileobj.seek(0, 2)
        fileobj.seek(scanned)
        zero_tail = _drain(fileobj.read)
    else:
        zero_tail = _drain(archive.fileobj.read)  # tarfile's stream buffers ahead of fileobj
        available = counter.count
    stop = stops[-1] if stops else None
    if (scanned > available or grouper.end > available
            or isinstance(stop, (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError))):
        _truncated(layout, name, scanned, available, allow_truncated)
    elif failure is not None or not isinstance(stop, tarfile.EOFHeaderError) or not zero_tail:
        what = f" ({failure})" if failure is not None else ""
        raise ShardError(name, f"corrupt tar header at byte {scanned}{what}: the bytes after the "
                         "last readable member are not end-of-archive padding, so samples there "
                         "would be lost — the shard is corrupt; re-create it")
    layout.size = available
    return layout


def _truncated(layout: ShardLayout, name: str, scanned: int, available: int,
               allow: bool) -> None:
    """Refuse a truncated shard, or with ``allow`` drop its last sample and warn."""
    if scanned > available:
        where = (f"the last member's data runs to byte {scanned} but the shard ends at byte "
                 f"{available}")
    else:
        where = ("no end-of-archive marker after the last member (the shard ends at byte "
                 f"{available})")
    if not allow:
        which = f"sample {layout.keys[-1]!r} may be incomplete" if layout.keys else \
            "no sample began before the cut"
        raise ShardError(name, f"truncated: {where}; {which}. Re-create the shard, or index it "
                         "with allow_truncated=True (es-stream index --allow-truncated) to drop "
                         "its last sample and keep the rest")
    layout.truncated = True
    key = layout.drop_last()
    layout.dropped = [] if key is None else [key]
    dropped = f"dropped its last sample {key!r} (it may be incomplete)" if key is not None \
        else "no sample began before the cut"
    warnings.warn(f"{name}: truncated: {where}; {dropped}, kept {len(layout)} samples "
                  "(allow_truncated)", stacklevel=3)


def scan_local_shard(url: str, allow_truncated: bool) -> tuple[ShardLayout, int, int, str | None]:
    """Scan a local tar shard by seeking: (layout, size, mtime_ns, content check)."""
    path = local_path(url)
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            check = content_check(f.fileno(), st.st_size)
            layout = scan_tar(f, url, seekable=True, allow_truncated=allow_truncated)
    except FileNotFoundError as exc:
        raise ShardError(url, "no such shard file; check the path or pattern") from exc
    except ShardError:
        raise
    except OSError as exc:  # a directory, no permission, an I/O error: name the shard
        raise ShardError(url, f"cannot read the shard ({exc.strerror or exc}); a tar file is "
                         "expected here") from exc
    return layout, st.st_size, st.st_mtime_ns, check


def scan_streamed_shard(url: str, allow_truncated: bool, storage_options: dict[str, Any] | None = None
                 ) -> tuple[ShardLayout, int, int, None]:
    """Scan a ``pipe:`` or remote shard in one forward pass: (layout, bytes read, -1, None).
    An object-store URL read by range is streamed through obstore (one GET); other URLs through
    webdataset's ``gopen``."""
    from webdataset import gopen

    try:
        if reads_by_range(url):
            from .remote.objects import ObjectStream

            stream: Any = ObjectStream(url, storage_options)
        else:
            stream = gopen(url, "rb")
    except ShardError:
        raise
    except Exception as exc:  # gopen raises many kinds; name the URL whatever it was
        raise ShardError(url, f"cannot open ({exc})") from exc
    try:
        layout = scan_tar(stream, url, seekable=False, allow_truncated=allow_truncated)
    finally:
        try:
            stream.close()
        except Exception as exc:  # a pipe: command that failed reports it on close
            raise ShardError(url, f"stream failed: {exc}") from exc
    return layout, layout.size, -1, None
