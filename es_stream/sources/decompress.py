"""Decompress a compressed MDS shard to its raw file, bounded by the size ``index.json``
declares for the raw file: the output is written in chunks and the work stops as soon as it
would pass that size, so a small file that expands to gigabytes (a decompression bomb, or a
shard from another dataset) costs at most one chunk beyond the declared size in memory and on
disk. The output goes to a temporary name beside the raw file and is renamed into place only
when complete and exactly the declared size; a partial output is removed.

streaming's own ``Stream`` decompresses a whole shard in memory before checking anything. Of
its compressions, gzip, bzip2 and brotli are decompressed as streams; zstd and snappy frames
declare their decompressed size in their headers, which is checked before decompressing them
(a zstd frame that does not declare it is refused).
"""

from __future__ import annotations

import bz2
import os
import zlib
from typing import IO, Iterator

from ..errors import ShardError

CHUNK = 1 << 20


class _Bound(ValueError):
    """Decompression stopped: the reason, without the file name."""


def _gzip(f: IO[bytes]) -> Iterator[bytes]:
    d = zlib.decompressobj(wbits=31)
    for chunk in iter(lambda: f.read(CHUNK), b""):
        data = chunk
        while data:
            if d.eof:  # another gzip member follows
                d = zlib.decompressobj(wbits=31)
            out = d.decompress(data, CHUNK)
            yield out
            data = d.unused_data if d.eof else d.unconsumed_tail
            while not d.eof and not data and len(out) == CHUNK:  # output still pending
                out = d.decompress(b"", CHUNK)
                yield out
    if not d.eof:
        raise _Bound("the compressed data ends early")


def _bz2(f: IO[bytes]) -> Iterator[bytes]:
    d = bz2.BZ2Decompressor()
    for chunk in iter(lambda: f.read(CHUNK), b""):
        if d.eof:
            raise _Bound("data follows the end of the bzip2 stream")
        yield d.decompress(chunk, CHUNK)
        while not d.eof and not d.needs_input:
            yield d.decompress(b"", CHUNK)
    if not d.eof:
        raise _Bound("the compressed data ends early")


def _brotli(f: IO[bytes]) -> Iterator[bytes]:
    import brotli

    d = brotli.Decompressor()
    for chunk in iter(lambda: f.read(CHUNK), b""):
        yield d.process(chunk, output_buffer_limit=CHUNK)
        while not d.can_accept_more_data():
            yield d.process(b"", output_buffer_limit=CHUNK)
    if not d.is_finished():
        raise _Bound("the compressed data ends early")


def _zstd_frames(data: bytes) -> Iterator[tuple[bytes, int]]:
    """(frame, declared decompressed size) of each zstd frame of ``data`` (skippable frames
    left out), read from the frame and block headers without decompressing."""
    at = 0
    while at < len(data):
        magic = int.from_bytes(data[at:at + 4], "little")
        if 0x184D2A50 <= magic <= 0x184D2A5F:  # a skippable frame
            at += 8 + int.from_bytes(data[at + 4:at + 8], "little")
            continue
        if magic != 0xFD2FB528 or at + 5 > len(data):
            raise _Bound(f"no zstd frame at byte {at}")
        start, fhd = at, data[at + 4]
        single = bool(fhd & 0x20)
        fcs_size = (1 if single else 0, 2, 4, 8)[fhd >> 6]
        at += 5 + (0 if single else 1) + (0, 1, 2, 4)[fhd & 3]
        if fcs_size == 0:
            raise _Bound(f"the zstd frame at byte {start} does not declare its decompressed "
                         "size, so it cannot be bounded")
        size = int.from_bytes(data[at:at + fcs_size], "little") + (256 if fcs_size == 2 else 0)
        at += fcs_size
        last = False
        while not last:  # the blocks: 3-byte headers, then their bytes
            if at + 3 > len(data):
                raise _Bound("the compressed data ends early")
            header = int.from_bytes(data[at:at + 3], "little")
            last, kind, block = header & 1, (header >> 1) & 3, header >> 3
            if kind == 3:
                raise _Bound(f"a reserved zstd block type at byte {at}")
            at += 3 + (1 if kind == 1 else block)
        at += 4 if fhd & 0x04 else 0  # the content checksum
        if at > len(data):
            raise _Bound("the compressed data ends early")
        yield data[start:at], size


def _zstd(f: IO[bytes], limit: int) -> Iterator[bytes]:
    import zstd

    total = 0
    for frame, size in _zstd_frames(f.read()):
        total += size
        if total > limit:
            raise _Bound(f"its zstd frames declare {total} bytes or more, more than the {limit} "
                         "bytes index.json declares for the raw shard")
        out = zstd.decompress(frame)
        if len(out) != size:
            raise _Bound(f"a zstd frame gave {len(out)} bytes, its header declares {size}")
        yield out


def _snappy(f: IO[bytes], limit: int) -> Iterator[bytes]:
    import snappy

    data = f.read()
    size, shift = 0, 0
    for byte in data[:10]:  # the raw length, a little-endian base-128 varint
        size |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    if size > limit:
        raise _Bound(f"its snappy header declares {size} bytes, more than the {limit} bytes "
                     "index.json declares for the raw shard")
    yield snappy.decompress(data)


def decompress_bounded(compression: str, zip_path: str, raw_path: str, limit: int,
                       zip_size: int | None = None) -> None:
    """Decompress ``zip_path`` (streaming's ``compression`` name, e.g. ``"zstd"`` or ``"gz:9"``)
    into ``raw_path``, which must come out exactly ``limit`` bytes (the raw size ``index.json``
    declares); ``zip_size``, when given, is the compressed size it declares, checked first. A
    :class:`ShardError` naming ``zip_path`` otherwise, with nothing left at ``raw_path`` or its
    temporary name."""
    family = compression.split(":")[0]
    tmp = f"{raw_path}.es-stream-tmp"
    try:
        with open(zip_path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if zip_size is not None and size != zip_size:
                raise _Bound(f"the compressed file has {size} bytes, index.json declares "
                             f"{zip_size}")
            _write_bounded(f, family, compression, tmp, limit)
        os.rename(tmp, raw_path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, ShardError) or not isinstance(exc, Exception):
            raise
        # a bound passed, corrupt data (each library has its own error class), a full disk
        raise ShardError(zip_path, f"cannot decompress the shard into {raw_path} ({exc}); "
                         "stopped, the partial output removed — re-create or re-fetch the "
                         "dataset") from exc


def _write_bounded(f: IO[bytes], family: str, compression: str, tmp: str, limit: int) -> None:
    """Decompress ``f`` into ``tmp`` chunk by chunk, stopping as soon as ``limit`` is passed."""
    chunks = {"gz": lambda: _gzip(f), "bz2": lambda: _bz2(f), "br": lambda: _brotli(f),
              "zstd": lambda: _zstd(f, limit), "snappy": lambda: _snappy(f, limit)}
    if family not in chunks:
        raise _Bound(f"unknown compression {compression!r}")
    written = 0
    with open(tmp, "wb") as out:
        for chunk in chunks[family]():
            written += len(chunk)
            if written > limit:
                raise _Bound(f"it decompresses to more than the {limit} bytes index.json "
                             "declares for the raw shard")
            out.write(chunk)
    if written != limit:
        raise _Bound(f"it decompresses to {written} bytes, index.json declares {limit}")
