"""MDS sources: compressed shards decompressed once across DataLoader workers and processes."""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import signal
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("streaming")

from es_stream import Corpus, ESDataset, loader  # noqa: E402
from es_stream.sources.mds import shard_lock  # noqa: E402

# Few, large samples: one ~6 MB shard takes long enough to decompress that workers starting
# together overlap on it (with 64 KB shards the race hit about 1 fresh run in 4).
BIG_N, BIG_BYTES = 24, 256 << 10
WORKERS = 3
FORK = mp.get_context("fork")


def big_payload(i: int) -> bytes:
    return np.random.default_rng(1000 + i).bytes(BIG_BYTES)  # random: zstd cannot shrink it


@pytest.fixture(scope="module")
def zstd_src(tmp_path_factory) -> Path:
    from streaming import MDSWriter

    out = tmp_path_factory.mktemp("zstd") / "src"
    with MDSWriter(out=str(out), columns={"bin": "bytes", "idx": "int"}, compression="zstd",
                   size_limit=1 << 26) as w:
        for i in range(BIG_N):
            w.write({"bin": big_payload(i), "idx": i})
    # MDSWriter keeps only the compressed files: readers must decompress them
    assert sorted(os.listdir(out)) == ["index.json", "shard.00000.mds.zstd"]
    return out


def fresh_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    assert not (dst / "shard.00000.mds").exists()
    return dst


def read_all(corpus: Corpus, barrier=None) -> list[int]:
    """Every id one epoch yields through WORKERS DataLoader workers, payloads checked. The
    workers wait for each other (and, with ``barrier``, for another process) before reading,
    so they reach the compressed shard together, as workers of a fresh run do."""
    start = FORK.Barrier(WORKERS)
    ds = ESDataset(corpus, meta_batch_size=4)
    if barrier is not None:
        barrier.wait(timeout=60)
    ids = []
    for mb in loader(ds, num_workers=WORKERS, persistent_workers=False,
                     worker_init_fn=lambda _: start.wait(timeout=60)):
        assert mb.data["idx"].tolist() == mb.ids.tolist()
        assert list(mb.data["bin"]) == [big_payload(i) for i in mb.ids.tolist()]
        ids += mb.ids.tolist()
    return ids


@pytest.mark.parametrize("remote", [False, True], ids=["local-zstd", "remote-zstd"])
def test_fresh_compressed_copies_decompress_once_with_three_workers(zstd_src, tmp_path, remote):
    # before: each variant failed in each of 3 tries, in the first or second fresh copy (a
    # worker renaming a .tmp another worker had already renamed, the zip removed under another
    # worker, or a worker that "exited unexpectedly" mapping a file another was truncating)
    for run in range(4):
        if remote:  # the zip is fetched into an empty cache and removed after decompressing
            corpus = Corpus.from_mds(tmp_path / f"cache{run}", remote=str(zstd_src))
        else:
            corpus = Corpus.from_mds(fresh_copy(zstd_src, tmp_path / f"run{run}"))
        assert sorted(read_all(corpus)) == list(range(BIG_N)), f"run {run}"
        local = Path(corpus.mds.local)
        assert (local / "shard.00000.mds").stat().st_size == corpus.shards[0].size
        assert not list(local.glob("*.tmp"))  # nothing half-written left behind


def _process_reads(local: str, barrier, results) -> None:
    try:
        results.put(sorted(read_all(Corpus.from_mds(local), barrier)))
    except BaseException as exc:  # report, don't hang the parent
        results.put(f"{type(exc).__name__}: {exc}")


def test_two_processes_decompress_the_same_shard_once(zstd_src, tmp_path):
    for run in range(3):
        local = str(fresh_copy(zstd_src, tmp_path / f"run{run}"))
        barrier, results = FORK.Barrier(2), FORK.Queue()
        procs = [FORK.Process(target=_process_reads, args=(local, barrier, results))
                 for _ in range(2)]
        for p in procs:
            p.start()
        got = [results.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(timeout=60)
        assert got == [list(range(BIG_N))] * 2, f"run {run}: {got}"


def _hold_lock(path: str, ready) -> None:
    with shard_lock(path):
        ready.set()
        signal.pause()  # until SIGKILLed


def test_a_killed_lock_holder_does_not_block_the_others(zstd_src, tmp_path):
    local = fresh_copy(zstd_src, tmp_path / "run")
    ready = FORK.Event()
    holder = FORK.Process(target=_hold_lock, args=(str(local / "shard.00000.mds"), ready))
    holder.start()
    assert ready.wait(timeout=30)
    os.kill(holder.pid, signal.SIGKILL)  # dies holding the lock, mid-"decompression"
    holder.join(timeout=30)
    got: list = []
    reader = threading.Thread(target=lambda: got.append(read_all(Corpus.from_mds(local))))
    reader.start()
    reader.join(timeout=120)
    assert not reader.is_alive(), "readers still wait for a lock whose holder is dead"
    assert sorted(got[0]) == list(range(BIG_N))
