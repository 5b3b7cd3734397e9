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
from ..errors import SampleError, ShardError


class _StreamedShard:
    """Forward-only reads from a ``gopen`` stream, tracking the current byte position.

    Every failure of the stream (a ``pipe:`` command that cannot start or exits non-zero, a
    stream that ends before the bytes the index promised) is a :class:`ShardError` naming the
    URL: a stream that broke cannot be read further, so the rest of the shard is lost.
    """

    def __init__(self, url: str) -> None:
        from webdataset import gopen

        self.url = url
        self.position = 0
        try:
            self.stream: IO[bytes] = gopen(url, "rb")
        except Exception as exc:  # gopen raises many kinds; name the URL whatever it was
            raise ShardError(url, f"cannot open the stream ({exc}); check the URL or "
                             "command") from exc

    def _read(self, size: int) -> bytes:
        try:
            return self.stream.read(size)
        except OSError as exc:  # webdataset's Pipe raises a bare OSError when the command fails
            raise ShardError(self.url, f"stream failed at byte {self.position} ({exc}); check "
                             "the command or URL") from exc

    def _ended(self, length: int, offset: int, sample_id: int) -> ShardError:
        why = f"the stream ended at byte {self.position}"
        try:  # the exit status of a pipe: command tells why it ended early
            self.stream.close()
        except Exception as exc:
            why = f"{why} ({exc})"
        return ShardError(self.url, f"{why}, before the {length} bytes at offset {offset} the "
                          "index lists; the command failed or the shard changed since indexing "
                          "— fix it or re-index", sample=sample_id)

    def pread(self, length: int, offset: int, sample_id: int) -> bytes:
        if offset < self.position:
            raise ShardError(self.url, "a streamed shard can only be read forward")
        skip = offset - self.position
        while skip > 0:  # read and drop: the bytes of samples this worker does not want
            dropped = len(self._read(min(skip, 1 << 20)))
            if dropped == 0:
                raise self._ended(length, offset, sample_id)
            skip -= dropped
            self.position += dropped
        data = self._read(length)
        self.position += len(data)
        if len(data) != length:
            raise self._ended(length, offset, sample_id)
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

    def _pread(self, shard: int, length: int, offset: int, sample_id: int) -> bytes:
        info = self.corpus.shards[shard]
        if is_local_url(info.name):
            return self._pread_local(shard, length, offset)
        stream = self.streams.get(shard)
        if stream is None or stream.position > offset:
            if stream is not None:
                stream.close()
            # one stream at a time: a worker reads its shards one after another
            for other in self.streams.values():
                other.close()
            self.streams = {}
            stream = _StreamedShard(info.name)
            self.streams[shard] = stream
        try:
            return stream.pread(length, offset, sample_id)
        except ShardError:
            stream.close()  # a broken stream is not read again; end its command now
            del self.streams[shard]
            raise

    def _pread_local(self, shard: int, length: int, offset: int) -> bytes:
        fd = self.fds.get(shard)
        path = _local_path(self.corpus.shards[shard].name)
        if fd is None:
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError as exc:
                raise ShardError(path, "shard file is missing (deleted or moved since "
                                 "indexing); restore it or re-index the corpus") from exc
            except OSError as exc:
                raise ShardError(path, f"cannot open shard ({exc})") from exc
            self.fds[shard] = fd
        try:
            return os.pread(fd, length, offset)
        except OSError as exc:
            raise ShardError(path, f"cannot read {length} bytes at offset {offset} "
                             f"({exc})") from exc

    def read(self, shard: int, position: int, sample_id: int) -> dict[str, Any]:
        """Return ``{"__key__", "__url__", suffix: bytes, ...}``, as webdataset does."""
        t = self.table
        offset, length = int(t.offsets[sample_id]), int(t.lengths[sample_id])
        name = self.corpus.shards[shard].name
        data = self._pread(shard, length, offset, sample_id)
        self.bytes_read += len(data)
        # A sample's own bytes being wrong leaves the index's offsets of the other samples valid
        # (a local shard is read by offset; a stream has read exactly this sample's span), so
        # these are SampleErrors: on_error="skip" loses this sample only.
        if len(data) != length:
            raise SampleError(name, f"truncated: wanted {length} bytes at offset {offset}, got "
                              f"{len(data)}; the shard changed since indexing — re-index it",
                              sample=sample_id)
        try:
            tarfile.TarInfo.frombuf(data[:tarfile.BLOCKSIZE], "utf-8", "surrogateescape")
        except tarfile.HeaderError as exc:
            raise SampleError(name, f"corrupt tar header at offset {offset} ({exc}); the shard "
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
