"""WebDataset tar shards read by byte offset.

The corpus index already knows where every sample's files lie, so reading a sample is one
``pread`` of its span and slicing; no tar parsing at read time beyond a checksum test of the
sample's first header, which catches a shard rewritten in place. Shards that cannot seek
(``pipe:`` commands, URLs) are streamed forward: the reader reads and discards the bytes before
a wanted sample and never decodes what it skips.
"""

from __future__ import annotations

import os
import tarfile
from typing import Any, IO

from ..corpus import is_local_url, _local_path
from ..errors import ShardError


class _StreamedShard:
    """Forward-only reads from a ``gopen`` stream, tracking the current byte position."""

    def __init__(self, url: str) -> None:
        from webdataset import gopen

        self.url = url
        self.stream: IO[bytes] = gopen(url, "rb")
        self.position = 0

    def pread(self, length: int, offset: int) -> bytes:
        if offset < self.position:
            raise ShardError(self.url, "a streamed shard can only be read forward")
        skip = offset - self.position
        while skip > 0:  # read and drop: the bytes of samples this worker does not want
            dropped = len(self.stream.read(min(skip, 1 << 20)))
            if dropped == 0:
                break
            skip -= dropped
            self.position += dropped
        data = self.stream.read(length) if skip == 0 else b""
        self.position += len(data)
        return data

    def close(self) -> None:
        try:
            self.stream.close()
        except Exception:  # a pipe closed before it was drained reports an error; ignore it
            pass


class WDSShardReader:
    """Random access to the samples of an indexed WebDataset corpus.

    Create it inside the process that reads: it holds open file descriptors. ``bytes_read``
    counts payload and header bytes actually read.
    """

    def __init__(self, corpus) -> None:
        self.corpus = corpus
        self.table = corpus.tar
        self.fds: dict[int, int] = {}
        self.streams: dict[int, _StreamedShard] = {}
        self.bytes_read = 0

    def _pread(self, shard: int, length: int, offset: int) -> bytes:
        info = self.corpus.shards[shard]
        if is_local_url(info.name):
            fd = self.fds.get(shard)
            if fd is None:
                path = _local_path(info.name)
                try:
                    fd = os.open(path, os.O_RDONLY)
                except FileNotFoundError as exc:
                    raise ShardError(path, "shard file is missing") from exc
                self.fds[shard] = fd
            return os.pread(fd, length, offset)
        stream = self.streams.get(shard)
        if stream is None or stream.position > offset:
            if stream is not None:
                stream.close()
            # one stream at a time: a worker reads its shards one after another
            for other in self.streams.values():
                other.close()
            self.streams = {shard: _StreamedShard(info.name)}
            stream = self.streams[shard]
        return stream.pread(length, offset)

    def read(self, shard: int, position: int, sample_id: int) -> dict[str, Any]:
        """Return ``{"__key__", "__url__", suffix: bytes, ...}``, as webdataset does."""
        t = self.table
        offset, length = int(t.offsets[sample_id]), int(t.lengths[sample_id])
        name = self.corpus.shards[shard].name
        data = self._pread(shard, length, offset)
        self.bytes_read += len(data)
        if len(data) != length:
            raise ShardError(name, f"truncated: wanted {length} bytes at offset {offset}, got "
                             f"{len(data)}; the shard changed since indexing — re-index it",
                             sample=sample_id)
        try:
            tarfile.TarInfo.frombuf(data[:tarfile.BLOCKSIZE], "utf-8", "surrogateescape")
        except tarfile.HeaderError as exc:
            raise ShardError(name, f"corrupt tar header at offset {offset} ({exc}); the shard "
                             "changed since indexing — re-index or re-create it",
                             sample=sample_id) from exc
        sample: dict[str, Any] = {"__key__": t.key(sample_id), "__url__": name}
        view = memoryview(data)
        for m in range(int(t.member_ptr[sample_id]), int(t.member_ptr[sample_id + 1])):
            start = int(t.member_offset[m])
            sample[t.suffixes[t.member_suffix[m]]] = bytes(view[start:start + int(t.member_size[m])])
        return sample

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        for stream in self.streams.values():
            stream.close()
        self.fds.clear()
        self.streams.clear()
