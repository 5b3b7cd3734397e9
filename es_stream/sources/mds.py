"""MosaicML MDS shards: the index comes from ``index.json``, shards are fetched by
mosaicml-streaming's ``Stream`` (remote -> local cache, decompression, hash checks) and samples
are decoded by streaming's own ``MDSReader.decode_sample``.

Only the sample-offset table at the head of a raw MDS shard (uint32 count, then count + 1 uint32
offsets) is read here, with numpy, so a sample is one slice of a memory-mapped file.
"""

from __future__ import annotations

import json
import mmap
import os
from typing import Any

import numpy as np

from ..errors import MissingExtraError, SampleError, ShardError


def __getattr__(name: str) -> Any:
    # ESStreamingDataset subclasses streaming.StreamingDataset, so it lives in its own module and
    # is imported on first use: reading MDS through ESDataset must not need more than it does.
    if name == "ESStreamingDataset":
        _streaming()  # a missing extra raises MissingExtraError naming it
        from .streaming_dataset import ESStreamingDataset

        return ESStreamingDataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _streaming():
    try:
        import streaming  # noqa: F401
        from streaming.base.format import reader_from_json
        from streaming.base.stream import Stream
        from streaming.base.world import World
    except ImportError as exc:
        raise MissingExtraError("Reading MDS shards", "mds", "mosaicml-streaming") from exc
    return Stream, World, reader_from_json


def make_stream(local: str, remote: str | None, split: str | None):
    """A streaming ``Stream`` with the defaults ``StreamingDataset`` would apply."""
    Stream, _, _ = _streaming()
    stream = Stream(remote=remote, local=local, split=split)
    stream.apply_default({"split": split, "download_retry": 2, "download_timeout": 60,
                          "validate_hash": None, "keep_zip": False})
    return stream


def load_mds_index(local: str, remote: str | None, split: str | None) -> dict[str, Any]:
    """Return the parsed ``index.json`` of an MDS dataset, fetching it from ``remote`` first
    when given (the way ``StreamingDataset`` does)."""
    _, World, _ = _streaming()
    filename = os.path.join(local, split or "", "index.json")
    if remote is not None and not os.path.exists(filename):
        try:
            make_stream(local, remote, split).get_shards(World.detect(), False)
        except Exception as exc:
            raise ShardError(os.path.join(remote, split or "", "index.json"),
                             f"cannot fetch index.json ({exc})") from exc
    if not os.path.exists(filename):
        where = f" (remote {remote!r})" if remote else ""
        raise ShardError(filename, f"no index.json{where}: not an MDS dataset written by "
                         "streaming.MDSWriter — check local_dir/remote")
    try:
        with open(filename) as f:
            index = json.load(f)
    except json.JSONDecodeError as exc:
        raise ShardError(filename, f"index.json is not valid JSON ({exc})") from exc
    if index.get("version") != 2 or any(s.get("format") != "mds" for s in index.get("shards", [])):
        raise ShardError(filename, "unsupported index.json: es-stream reads MDS version 2 shards")
    return index


class MDSShardReader:
    """Random access to the samples of an MDS corpus, one memory map per open shard.

    Create it inside the process that reads (a DataLoader worker): it holds file maps.
    """

    def __init__(self, corpus) -> None:
        _, _, reader_from_json = _streaming()
        info = corpus.mds
        self.corpus = corpus
        self.stream = make_stream(info.local, info.remote, info.split)
        self.readers = [reader_from_json(info.local, info.split, s) for s in info.index["shards"]]
        self.open_shards: dict[int, tuple[mmap.mmap, np.ndarray]] = {}

    def _open(self, shard: int) -> tuple[mmap.mmap, np.ndarray]:
        opened = self.open_shards.get(shard)
        if opened is not None:
            return opened
        reader = self.readers[shard]
        path = self.corpus.local_path(shard)
        if not os.path.exists(path):
            try:
                self.stream.prepare_shard(reader)  # download / decompress like streaming does
            except Exception as exc:
                raise ShardError(path, f"cannot fetch shard ({exc})") from exc
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                expected = reader.raw_data.bytes
                if size != expected:
                    raise ShardError(path, f"shard has {size} bytes, index.json says {expected}: "
                                     "truncated or rewritten — re-create or re-fetch it")
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except FileNotFoundError as exc:
            raise ShardError(path, "shard file is missing") from exc
        count = int(np.frombuffer(mm, np.uint32, 1, 0)[0])
        if count != reader.samples:
            raise ShardError(path, f"shard header says {count} samples, index.json says "
                             f"{reader.samples}: the shard is corrupt or from another dataset")
        offsets = np.frombuffer(mm, np.uint32, count + 1, 4).astype(np.int64)
        if offsets[0] < 4 * (count + 2) or offsets[-1] > size or np.any(np.diff(offsets) < 0):
            raise ShardError(path, "sample offset table is corrupt; re-create the shard")
        self.open_shards[shard] = (mm, offsets)
        return mm, offsets

    def read(self, shard: int, position: int, sample_id: int) -> dict[str, Any]:
        """Decode one sample to the dict of columns ``MDSWriter`` was given."""
        mm, offsets = self._open(shard)
        data = mm[offsets[position]:offsets[position + 1]]
        try:
            return self.readers[shard].decode_sample(data)
        except Exception as exc:
            raise SampleError(self.corpus.local_path(shard), f"cannot decode sample ({exc})",
                              sample=sample_id) from exc

    def close(self) -> None:
        for mm, _ in self.open_shards.values():
            mm.close()
        self.open_shards.clear()
