"""MosaicML MDS shards: the index comes from ``index.json``, shards are fetched by
mosaicml-streaming's ``Stream`` (remote -> local cache, decompression, hash checks) and samples
are decoded by streaming's own ``MDSReader.decode_sample``.

Only the sample-offset table at the head of a raw MDS shard (uint32 count, then count + 1 uint32
offsets) is read here, with numpy, so a sample is one slice of a memory-mapped file.

Fetching and decompressing a shard happens under a per-shard ``fcntl.flock`` on a hidden lock
file next to the shard in the local directory (``.<shard>.es-stream-lock``, left in place: it is
empty, and removing a lock file others may hold is itself a race). The lock is what
``StreamingDataset`` gets from its shared-memory shard states: one process (DataLoader worker,
rank, or another run on the same machine) makes the shard, the others wait for it and then find
it there. The kernel drops the lock when its holder dies, even by SIGKILL, so a crashed worker
never leaves the others waiting.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
from typing import Any, Iterator

import numpy as np

from .._deprecated import warn_moved
from ..errors import SampleError, ShardError
from ..shard_identity import ShardVerifier
from .decompress import decompress_bounded
from .handles import MAX_OPEN_SHARDS, OpenShards
# the index functions lived here before es_stream.mds_index; kept importable from here
from ..mds_index import (MDSIndexProblem, check_mds_index, import_streaming,  # noqa: F401
                         load_mds_index, make_stream, read_mds_index_file)


def __getattr__(name: str) -> Any:
    # A deprecated alias, resolved on first access only (PEP 562): the class is an integration
    # with streaming's StreamingDataset, which the core never imports.
    if name == "ESStreamingDataset":
        import_streaming()  # a missing extra raises MissingExtraError naming it
        from ..integrations.streaming_dataset import ESStreamingDataset

        warn_moved(f"{__name__}.ESStreamingDataset",
                   "es_stream.integrations.streaming_dataset")
        return ESStreamingDataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def writable_arrays(sample: dict[str, Any]) -> dict[str, Any]:
    """``sample`` with its read-only numpy arrays (streaming's ``ndarray`` columns, decoded by
    ``np.frombuffer`` over immutable bytes) replaced by writable copies, in place: torch warns
    "The given NumPy array is not writable" when it collates a read-only one."""
    for key, value in sample.items():
        if isinstance(value, np.ndarray) and not value.flags.writeable:
            sample[key] = value.copy()
    return sample


def header_size(count: int) -> int:
    """Bytes of a raw MDS shard's header for ``count`` samples: the uint32 count, then
    ``count + 1`` uint32 sample offsets (the last is the end of the last sample)."""
    return 4 * (count + 2)


def sample_offsets(header: Any, expected: int, size: int, where: str) -> np.ndarray:
    """The ``expected + 1`` sample offsets (int64) in a raw MDS shard's ``header`` (a buffer
    holding at least :func:`header_size` bytes: the shard's memory map, or its first bytes
    fetched by range), checked against ``index.json``: the count it declares, offsets that
    start after the header, never decrease and end within the shard's ``size``. A
    :class:`ShardError` naming ``where`` otherwise."""
    if len(header) < 4:
        raise ShardError(where, f"shard has {len(header)} bytes, too few for an MDS header; "
                         "re-create or re-fetch it")
    count = int(np.frombuffer(header, np.uint32, 1, 0)[0])
    if count != expected:
        raise ShardError(where, f"shard header says {count} samples, index.json says "
                         f"{expected}: the shard is corrupt or from another dataset")
    if len(header) < header_size(count):
        raise ShardError(where, f"shard header is cut short ({len(header)} of "
                         f"{header_size(count)} bytes); re-create or re-fetch it")
    offsets = np.frombuffer(header, np.uint32, count + 1, 4).astype(np.int64)
    if offsets[0] < header_size(count) or offsets[-1] > size or np.any(np.diff(offsets) < 0):
        raise ShardError(where, "sample offset table is corrupt; re-create the shard")
    return offsets


# ------------------------------------------------------------------------------ shard fetch
@contextlib.contextmanager
def shard_lock(path: str) -> Iterator[None]:
    """Hold the exclusive cross-process lock of shard file ``path`` (see the module docstring).

    Blocks (no polling) until the holder releases it or dies. Each call opens its own
    descriptor, so threads of one process exclude each other too.
    """
    lock_path = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.es-stream-lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise ShardError(path, f"cannot create the lock file {lock_path} ({exc}): the local "
                         "directory must be writable to fetch or decompress shards") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            raise ShardError(path, f"cannot lock {lock_path} ({exc}); use a local directory on "
                             "a filesystem that supports flock") from exc
        yield
    finally:
        os.close(fd)  # releases the lock


class MDSShardReader:
    """Random access to the samples of an MDS corpus, one memory map per open shard.

    Create it inside the process that reads (a DataLoader worker): it holds file maps, at most
    ``max_open`` (:data:`~es_stream.sources.handles.MAX_OPEN_SHARDS`, least recently used
    closed first: each map holds a file descriptor). Each shard is verified against the index
    when first opened (see :mod:`es_stream.shard_identity`).
    """

    def __init__(self, corpus, max_open: int = MAX_OPEN_SHARDS) -> None:
        _, _, reader_from_json = import_streaming()
        info = corpus.mds
        self.corpus = corpus
        self._stream: Any = None
        self.readers = [reader_from_json(info.local, info.split, s) for s in info.index["shards"]]
        self.verifier = ShardVerifier(corpus)
        self.open_shards: OpenShards[tuple[mmap.mmap, np.ndarray]] = OpenShards(
            self._map, lambda opened: opened[0].close(), max_open)

    @property
    def stream(self) -> Any:
        """streaming's ``Stream`` that fetches shards from ``remote`` (made on first use)."""
        if self._stream is None:
            info = self.corpus.mds
            self._stream = make_stream(info.local, info.remote, info.split)
        return self._stream

    def _open(self, shard: int) -> tuple[mmap.mmap, np.ndarray]:
        return self.open_shards.get(shard)

    def shard_path(self, shard: int) -> str:
        """The local file shard ``shard`` is memory-mapped from (a remote reader's staged copy
        may stand in for the corpus's local path)."""
        return self.corpus.local_path(shard)

    def _map(self, shard: int) -> tuple[mmap.mmap, np.ndarray]:
        reader = self.readers[shard]
        path = self.shard_path(shard)
        if not os.path.exists(path):
            self._fetch(shard, path)
        try:
            with open(path, "rb") as f:
                size = self.verifier.verify(shard, f.fileno(), path).st_size
                expected = reader.raw_data.bytes
                if size != expected:
                    raise ShardError(path, f"shard has {size} bytes, index.json says {expected}: "
                                     "truncated or rewritten — re-create or re-fetch it")
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except FileNotFoundError as exc:
            raise ShardError(path, f"shard file is missing: {self.corpus.where_looked(path)}"
                             ) from exc
        except ShardError:
            raise
        except (OSError, ValueError) as exc:  # a directory, no permission, an empty file
            raise ShardError(path, f"cannot read the shard ({exc}); an MDS shard file is "
                             "expected here — re-create or re-fetch it") from exc
        try:
            offsets = sample_offsets(mm, reader.samples, size, path)
        except BaseException:
            mm.close()
            raise
        return mm, offsets

    def _fetch(self, shard: int, path: str) -> None:
        """Download and/or decompress shard ``shard`` to ``path``, once across processes.

        Under :func:`shard_lock`, whoever comes second finds the file and does nothing. The raw
        file appears whole or not at all: it is written to a temporary name and renamed (by
        streaming's ``Stream`` for a download, by :func:`decompress_bounded` for a compressed
        shard, bounded by the raw size ``index.json`` declares), and the lock keeps that
        temporary name to one writer at a time — before, two workers decompressing the same
        shard truncated each other's file, failing the rename or crashing the reader that
        mapped it.
        """
        with shard_lock(path):
            if os.path.isfile(path):  # another worker, rank or run made it while we waited
                return
            reader = self.readers[shard]
            try:
                for raw_info, zip_info in reader.file_pairs:
                    if zip_info is None:
                        self.stream.prepare_shard(reader)  # download a raw shard
                        continue
                    where = os.path.dirname(path)
                    zip_path = os.path.join(where, zip_info.basename)
                    if not os.path.isfile(zip_path):
                        self.stream._download_file(zip_info.basename)
                    decompress_bounded(reader.compression, zip_path,
                                       os.path.join(where, raw_info.basename), raw_info.bytes,
                                       zip_info.bytes)
                    if not self.stream.safe_keep_zip:
                        os.remove(zip_path)
            except ShardError:
                raise
            except Exception as exc:
                raise ShardError(path, f"cannot fetch shard ({exc})") from exc

    def read(self, shard: int, position: int, sample_id: int) -> dict[str, Any]:
        """Decode one sample to the dict of columns ``MDSWriter`` was given.

        ``ndarray`` columns come back writable: streaming decodes them with ``np.frombuffer``
        over the sample's immutable bytes, and torch warns ("The given NumPy array is not
        writable") when such an array is collated; the copy costs one memcpy of the array."""
        mm, offsets = self._open(shard)
        return self.decode(shard, mm[offsets[position]:offsets[position + 1]], sample_id,
                           self.corpus.local_path(shard))

    def decode(self, shard: int, data: bytes, sample_id: int, where: str) -> dict[str, Any]:
        """Sample ``data`` of ``shard`` decoded by streaming's reader, its arrays writable (see
        :meth:`read`); a :class:`SampleError` naming ``where`` when it cannot be decoded."""
        try:
            sample = self.readers[shard].decode_sample(data)
        except Exception as exc:
            raise SampleError(where, f"cannot decode sample ({exc})", sample=sample_id) from exc
        return writable_arrays(sample)

    def read_batch(self, ids: np.ndarray, shards: np.ndarray,
                   skip_shards: set[int] = frozenset()) -> list[dict[str, Any] | ShardError | None]:
        """Leaves every sample to :meth:`read` (None each): an MDS sample is one slice of a
        memory map, so reading a meta-batch at once would save nothing."""
        return [None] * len(ids)

    def will_read(self, batches: Any, node_ids: Any) -> None:
        """Nothing to do ahead: local reads are cheap (see :class:`ShardReader`)."""

    def close(self) -> None:
        self.open_shards.close()
        self.verifier.reset()
