"""WebDataset tar shards read by byte offset.

The corpus index already knows where every sample's files lie, so reading a sample is one
``pread`` of its span and slicing; no tar parsing at read time beyond a checksum test of the
sample's first header, which catches a shard rewritten in place. Shards that cannot seek
(``pipe:`` commands, URLs) are streamed forward: the reader reads and discards the bytes before
a wanted sample and never decodes what it skips.

A meta-batch of local samples is read by :meth:`WDSShardReader.read_batch`: its samples are
sorted by (shard, offset), neighbours that touch on disk (``COALESCE_GAP`` = 0: nothing
between them is read, so pruned samples never are) are read by one ``pread`` into one buffer, and the header checksums of the whole meta-batch are
tested in one numpy pass (a header the pass cannot confirm goes through tarfile's own parse);
only the per-member ``bytes`` slices and the sample dicts are made one by one. Each sample gets
what :meth:`WDSShardReader.read` gives it alone — the same dict, or the same error for a short
read, a bad checksum or a missing shard — in the meta-batch's order.
"""

from __future__ import annotations

import os
import tarfile
from typing import Any, IO

import numpy as np

from ..errors import SampleError, ShardError
from ..shard_identity import ShardVerifier
from ..shard_paths import is_local_url, local_path
from .handles import MAX_OPEN_SHARDS, OpenShards
from ..tar_table import py_text

# Samples of a shard whose spans are at most this many bytes apart are read by one pread. It is
# 0: only samples that touch on disk share a read, so nothing between them — a pruned sample, or
# one another meta-batch reads — is ever read here (es-stream's promise: pruned samples are never
# read). Reading small gaps would save system calls but break that promise; the bulk header
# check, not the coalescing, is most of this path's speed-up (BENCHMARKS.md).
COALESCE_GAP = 0
# and one coalesced read stays under this, so a meta-batch never holds a whole shard twice
COALESCE_MAX = 8 << 20
_CHKSUM = slice(148, 156)  # the header's checksum field (ustar), counted as 8 spaces
_HEADER = tarfile.BLOCKSIZE


def _unsigned_sums(headers: np.ndarray) -> np.ndarray:
    """The unsigned tar checksums of ``headers`` [k, 512] uint8, as ``tarfile.calc_chksums``
    computes them for one header: every byte, the checksum field counted as 8 spaces. (The
    signed variant tarfile also accepts, written by some old tars, is left to tarfile.)"""
    return (headers.sum(1, dtype=np.int64) - headers[:, _CHKSUM].sum(1, dtype=np.int64)
            + 8 * ord(" "))


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

    Create it inside the process that reads: it holds open file descriptors, at most
    ``max_open`` (:data:`~es_stream.sources.handles.MAX_OPEN_SHARDS`, least recently used closed
    first). Each local shard is verified against the index when first opened (see
    :mod:`es_stream.shard_identity`). ``bytes_read`` counts payload and header bytes actually
    read.
    """

    def __init__(self, corpus, max_open: int = MAX_OPEN_SHARDS) -> None:
        self.corpus = corpus
        self.table = corpus.tar
        self.verifier = ShardVerifier(corpus)
        self.files: OpenShards[int] = OpenShards(self._open_local, os.close, max_open)
        self.streams: dict[int, _StreamedShard] = {}
        self.bytes_read = 0
        self.local = np.array([is_local_url(s.name) for s in corpus.shards], dtype=bool)

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

    def _open_local(self, shard: int) -> int:
        path = local_path(self.corpus.shards[shard].name)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError as exc:
            raise ShardError(path, "shard file is missing (deleted or moved since "
                             f"indexing): {self.corpus.where_looked(path)}") from exc
        except OSError as exc:
            raise ShardError(path, f"cannot open shard ({exc})") from exc
        try:
            self.verifier.verify(shard, fd, path)
        except OSError as exc:  # a directory, an I/O error while hashing its ends
            os.close(fd)
            raise ShardError(path, f"cannot read shard ({exc})") from exc
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _pread_local(self, shard: int, length: int, offset: int) -> bytes:
        fd = self.files.get(shard)
        try:
            return os.pread(fd, length, offset)
        except OSError as exc:
            path = local_path(self.corpus.shards[shard].name)
            raise ShardError(path, f"cannot read {length} bytes at offset {offset} "
                             f"({exc})") from exc

    def read(self, shard: int, position: int, sample_id: int) -> dict[str, Any]:
        """Return ``{"__key__", "__url__", suffix: bytes, ...}``, as webdataset does."""
        t = self.table
        offset, length = int(t.offsets[sample_id]), int(t.lengths[sample_id])
        name = self.corpus.shards[shard].name
        data = self._pread(shard, length, offset, sample_id)
        self.bytes_read += len(data)
        _check_length(name, data, 0, length, offset, sample_id)
        _check_header(name, data[:_HEADER], offset, sample_id)
        return self._sample(t.key(sample_id), name, memoryview(data), 0, sample_id)

    def _sample(self, key: str, name: str, view: memoryview, base: int,
                sample_id: int) -> dict[str, Any]:
        """The sample dict of ``sample_id``, whose span starts at ``view[base]``."""
        t = self.table
        sample: dict[str, Any] = {"__key__": key, "__url__": name}
        first, stop = int(t.member_ptr[sample_id]), int(t.member_ptr[sample_id + 1])
        for suffix, start, size in zip(t.member_suffix[first:stop].tolist(),
                                       t.member_offset[first:stop].tolist(),
                                       t.member_size[first:stop].tolist()):
            start += base
            sample[t.suffixes[suffix]] = bytes(view[start:start + size])
        return sample

    def read_batch(self, ids: np.ndarray, shards: np.ndarray,
                   skip_shards: set[int] = frozenset()) -> list[dict[str, Any] | ShardError | None]:
        """Read the local samples ``ids`` (of ``shards``) of one meta-batch together.

        Returns one entry per id, in order: the sample dict :meth:`read` would return, the
        :class:`ShardError` it would raise (not raised: the caller applies ``on_error`` in the
        meta-batch's order), or None for a sample this method leaves to :meth:`read` — those of
        streamed shards, which must be read forward in order, and those of ``skip_shards``.
        """
        out: list[Any] = [None] * len(ids)
        wanted = self.local[shards]
        if skip_shards:
            wanted &= ~np.isin(shards, list(skip_shards))
        local = np.flatnonzero(wanted)
        if not len(local):
            return out
        t = self.table
        order = local[np.lexsort((t.offsets[ids[local]], shards[local]))]  # each shard in order
        o_ids, o_shards = ids[order], shards[order]
        offs, lens = t.offsets[o_ids], t.lengths[o_ids]
        bufs, buf_of, base = self._read_runs(ids, shards, order, o_shards, offs, lens, out)
        whole = (buf_of >= 0) & (base + lens <= np.array([len(b) for b in bufs] + [0])[buf_of])
        good = _good_headers(bufs, buf_of, base, whole)
        keys = t.keys.take(o_ids).to_pylist()
        if not isinstance(keys[0], str):  # a binary keys column: names that are not UTF-8
            keys = [py_text(k) for k in keys]
        suffixes, starts, sizes, ptr = self._members(o_ids)
        names = [self.corpus.shards[s].name for s in o_shards.tolist()]
        for j, (i, sid, b, r, n, is_whole, is_good, key, name) in enumerate(zip(
                order.tolist(), o_ids.tolist(), buf_of.tolist(), base.tolist(), lens.tolist(),
                whole.tolist(), good.tolist(), keys, names)):
            if b < 0:
                continue  # its read failed: out[i] holds what read() gave
            data = bufs[b]
            try:
                if not is_whole:
                    _check_length(name, data, r, n, int(offs[j]), sid)
                if not is_good:
                    _check_header(name, data[r:r + _HEADER], int(offs[j]), sid)
            except ShardError as exc:
                out[i] = exc
                continue
            sample: dict[str, Any] = {"__key__": key, "__url__": name}
            for m in range(ptr[j], ptr[j + 1]):
                start = r + starts[m]
                sample[suffixes[m]] = data[start:start + sizes[m]]
            out[i] = sample
        return out

    def _read_runs(self, ids: np.ndarray, shards: np.ndarray, order: np.ndarray,
                   o_shards: np.ndarray, offs: np.ndarray, lens: np.ndarray, out: list
                   ) -> tuple[list[bytes], np.ndarray, np.ndarray]:
        """One pread per coalesced run of the samples ``order`` (sorted by shard and offset):
        the buffers, each sample's buffer (-1 when the read failed: ``out`` then holds what
        :meth:`read` gives it alone) and its offset in that buffer."""
        bufs: list[bytes] = []
        firsts, run_ends = _coalesce(o_shards, offs, lens)
        bounds = np.append(firsts, len(order)).tolist()
        failed: list[int] = []
        firsts_shard, firsts_off = o_shards[firsts].tolist(), offs[firsts].tolist()
        for r, (first, stop, end, shard, start) in enumerate(zip(
                bounds, bounds[1:], run_ends.tolist(), firsts_shard, firsts_off)):
            try:
                data = self._pread_local(shard, end - start, start)
            except ShardError as exc:
                failed.append(r)
                for i in order[first:stop].tolist():  # which samples it hits, one by one
                    try:
                        out[i] = self.read(shard, 0, int(ids[i])) if stop - first > 1 else exc
                    except ShardError as one:
                        out[i] = one
                data = b""
            self.bytes_read += len(data)
            bufs.append(data)
        run_of = np.repeat(np.arange(len(firsts)), np.diff(bounds))
        base = offs - offs[firsts][run_of]
        if failed:
            run_of[np.isin(run_of, failed)] = -1
        return bufs, run_of, base

    def _members(self, o_ids: np.ndarray) -> tuple[list[str], list[int], list[int], list[int]]:
        """The files of samples ``o_ids``, flat: suffix, offset in the sample, size; sample j's
        are ``[ptr[j], ptr[j+1])``."""
        t = self.table
        first, stop = t.member_ptr[o_ids], t.member_ptr[o_ids + 1]
        counts = stop - first
        ptr = np.concatenate([[0], np.cumsum(counts)])
        idx = np.repeat(first - ptr[:-1], counts) + np.arange(int(ptr[-1]))
        suffixes = [t.suffixes[c] for c in t.member_suffix[idx].tolist()]
        return suffixes, t.member_offset[idx].tolist(), t.member_size[idx].tolist(), ptr.tolist()

    def will_read(self, batches: Any, node_ids: Any) -> None:
        """Nothing to do ahead: local reads are cheap (see :class:`ShardReader`)."""

    def close(self) -> None:
        self.files.close()
        self.verifier.reset()
        for stream in self.streams.values():
            stream.close()
        self.streams.clear()


def _coalesce(shards: np.ndarray, offsets: np.ndarray, lengths: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
    """Runs of samples (sorted by shard, then offset) read by one pread each, as (index of each
    run's first sample, each run's end byte). A run stays in one shard, each sample starts at
    most ``COALESCE_GAP`` bytes past the end of the one before, and all of its samples start in
    the same ``COALESCE_MAX``-aligned window, so a run spans under ``COALESCE_MAX`` bytes plus
    its last sample."""
    ends = offsets + lengths
    cut = np.ones(len(offsets), dtype=bool)
    cut[1:] = ((shards[1:] != shards[:-1]) | (offsets[1:] - ends[:-1] > COALESCE_GAP)
               | (offsets[1:] // COALESCE_MAX != offsets[:-1] // COALESCE_MAX))
    firsts = np.flatnonzero(cut)
    return firsts, np.maximum.reduceat(ends, firsts)


def _check_length(name: str, data: bytes, base: int, length: int, offset: int,
                  sample_id: int) -> None:
    # A sample's own bytes being wrong leaves the index's offsets of the other samples valid
    # (a local shard is read by offset; a stream has read exactly this sample's span), so
    # these are SampleErrors: on_error="skip" loses this sample only.
    got = min(max(len(data) - base, 0), length)
    if got != length:
        raise SampleError(name, f"truncated: wanted {length} bytes at offset {offset}, got "
                          f"{got}; the shard changed since indexing — re-index it",
                          sample=sample_id)


def _check_header(name: str, block: bytes, offset: int, sample_id: int) -> None:
    """tarfile's own test of one header block: a :class:`SampleError` when it fails."""
    try:
        tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    except tarfile.HeaderError as exc:
        raise SampleError(name, f"corrupt tar header at offset {offset} ({exc}); the shard "
                          "changed since indexing — re-index or re-create it",
                          sample=sample_id) from exc


def _good_headers(bufs: list[bytes], buf_of: np.ndarray, base: np.ndarray,
                  whole: np.ndarray) -> np.ndarray:
    """Which samples' first header passes tarfile's checksum test, for a whole meta-batch in one
    numpy pass. A header this pass cannot confirm (a checksum not written as tarfile and GNU tar
    write it, six octal digits and a NUL, or one that does not match) is False here and goes
    through tarfile's own parse, which gives the verdict and the error message: a header whose
    checksum tarfile refuses is refused, with tarfile's reason. (Like the per-sample path's
    docstring says, this is a checksum test: other fields of a header whose checksum matches
    are not parsed.)"""
    good = np.zeros(len(buf_of), dtype=bool)
    at = np.flatnonzero(whole)
    if not len(at):
        return good
    blocks = b"".join([bufs[b][r:r + _HEADER] for b, r in zip(buf_of[at].tolist(),
                                                               base[at].tolist())])
    headers = np.frombuffer(blocks, np.uint8).reshape(len(at), _HEADER)
    digits = headers[:, 148:154].astype(np.int64) - ord("0")
    octal = ((digits >= 0) & (digits < 8)).all(1) & (headers[:, 154] == 0)
    stored = digits @ (8 ** np.arange(5, -1, -1, dtype=np.int64))
    good[at] = octal & (stored == _unsigned_sums(headers))
    return good
