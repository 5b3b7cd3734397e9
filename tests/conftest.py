"""Shared fixtures: real shards written with webdataset.ShardWriter and streaming.MDSWriter."""

from __future__ import annotations

import atexit
import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

# Remote shards staged whole during the tests go to a directory of this session, removed at its
# end; set before any DataLoader worker server starts, so every worker inherits it.
if "ES_STREAM_CACHE" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="es-stream-test-cache-")
    os.environ["ES_STREAM_CACHE"] = _CACHE
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)

# Uneven shard sizes on purpose: ids must not assume equal shards.
SHARD_SIZES = (7, 13, 1, 20, 9)


def payload(i: int) -> bytes:
    """Deterministic, sample-specific payload so tests can check bytes, not just counts."""
    return np.random.default_rng(i).integers(0, 256, 64 + i % 50, dtype=np.uint8).tobytes()


def forget_content_checks(corpus) -> None:
    """Drop the content checks recorded at index time, as in an index written before they
    existed: a shard then corrupted in place with its size and mtime kept is found by the
    readers' per-sample checks alone, which is what the tests calling this exercise."""
    corpus.shards[:] = [dataclasses.replace(s, check=None) for s in corpus.shards]


def write_wds(directory: Path, sizes=SHARD_SIZES, start: int = 0) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    paths, i = [], start
    for s, size in enumerate(sizes):
        path = str(directory / f"train-{s:06d}.tar")
        with wds.TarWriter(path) as w:
            for _ in range(size):
                w.write({"__key__": f"sample{i:06d}", "bin": payload(i), "cls": i % 10})
                i += 1
        paths.append(path)
    return paths


def write_mds(directory: Path, n: int = 50, size_limit: int = 1 << 10) -> Path:
    from streaming import MDSWriter

    with MDSWriter(out=str(directory), columns={"bin": "bytes", "cls": "int", "idx": "int"},
                   size_limit=size_limit) as w:
        for i in range(n):
            w.write({"bin": payload(i), "cls": i % 10, "idx": i})
    return directory


def write_clusters(directory: Path, n: int = 200, classes: int = 4, maxcount: int = 45) -> None:
    """``n`` samples of ``classes`` Gaussian clusters, ``"npy": float32[8]`` and ``"cls"``, in
    shards of ``maxcount``: a corpus a tiny model learns in a few steps (resume tests)."""
    import io

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(classes, 8)).astype(np.float32)
    directory.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(directory / "train-%06d.tar"), maxcount=maxcount, verbose=0) as w:
        for i in range(n):
            buf = io.BytesIO()
            np.save(buf, centers[i % classes] + rng.normal(size=8).astype(np.float32))
            w.write({"__key__": f"{i:06d}", "npy": buf.getvalue(), "cls": i % classes})


@pytest.fixture
def wds_dir(tmp_path: Path) -> Path:
    write_wds(tmp_path / "wds")
    return tmp_path / "wds"


@pytest.fixture
def mds_dir(tmp_path: Path) -> Path:
    return write_mds(tmp_path / "mds")


@pytest.fixture(autouse=True)
def _clean_streaming_shm():
    # StreamingDataset leaves shared memory behind between tests in one process.
    yield
    try:
        from streaming.base.util import clean_stale_shared_memory

        clean_stale_shared_memory()
    except Exception:
        pass


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test, as the pipelines' CLIs use: more only contend on a busy
    2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def all_sizes_total() -> int:
    return sum(SHARD_SIZES)


os.environ.setdefault("OMP_NUM_THREADS", "1")
