"""Whole shards staged on local disk for the shards an epoch reads nearly whole: the same
samples as local, no request once staged, pruned shards never staged, one download per machine,
a bounded directory, nothing left by a failed download."""

from __future__ import annotations

import multiprocessing
import os

import numpy as np
import pytest

pytest.importorskip("obstore")

from es_stream import Corpus, ESDataset  # noqa: E402
from es_stream.remote.cache import STAGED_PREFIX, CachePolicy, ShardCache  # noqa: E402
from es_stream.remote.fetch import RangeFetcher, RetryPolicy  # noqa: E402
from es_stream.remote.tar import RemoteTarReader, remote_corpus  # noqa: E402
from es_stream.sources import open_reader  # noqa: E402
from servers import RangeHTTPServer  # noqa: E402


def _remote(local, server):
    return remote_corpus(local, [f"{server.url}/{os.path.basename(s.name)}" for s in local.shards])


def _read_all(reader, corpus, batches):
    out = []
    for ids in batches:
        shards, _ = corpus.locate(ids)
        out += [(s["__key__"], s["bin"]) for s in reader.read_batch(ids, shards)]
    return out


def _plan(corpus, **kw):
    ds = ESDataset(corpus, 8, seed=3, **kw)
    ds.set_epoch(1)
    return ds.plan().worker_batches()


def test_dense_shards_staged_then_read_without_requests(wds_dir, tmp_path):
    local = Corpus.from_webdataset(str(wds_dir))
    with RangeHTTPServer(wds_dir) as server:
        remote = _remote(local, server)
        batches = _plan(remote)
        expected = _read_all(open_reader(local), local, batches)
        reader = RemoteTarReader(remote, cache=CachePolicy(directory=str(tmp_path / "c")))
        try:
            reader.will_read(batches, lambda: np.concatenate(batches))
            for shard in remote.shards:
                reader.cache.wait(shard.name)
            for shard, path in zip(remote.shards, local.shards):
                staged = reader.cache.ready(shard.name, shard.size)
                with open(staged, "rb") as a, open(path.name, "rb") as b:
                    assert a.read() == b.read()
            before = server.requests
            assert _read_all(reader, remote, batches) == expected
            assert server.requests == before  # every sample from the staged copies
            assert reader.cache.staged == remote.num_shards
        finally:
            reader.close()


def test_pruned_shards_read_by_range_not_staged(wds_dir, tmp_path):
    local = Corpus.from_webdataset(str(wds_dir))
    kept = np.arange(0, local.num_samples, 2)  # about half of every shard
    kept = kept[local.locate(kept)[0] != 2]  # but the one-sample shard would be read whole
    with RangeHTTPServer(wds_dir) as server:
        remote = _remote(local, server)
        batches = [kept[i:i + 8] for i in range(0, len(kept), 8)]
        reader = RemoteTarReader(remote, cache=CachePolicy(directory=str(tmp_path / "c")))
        try:
            reader.will_read(batches, lambda: kept)
            got = _read_all(reader, remote, batches)
        finally:
            reader.close()
        assert got == _read_all(open_reader(local), local, batches)
        assert server.bytes_sent == int(local.tar.lengths[kept].sum())  # no whole shard
        assert not [f for f in os.listdir(tmp_path / "c") if f.startswith(STAGED_PREFIX)]


def test_stage_above_follows_the_machine_share(wds_dir, tmp_path):
    """A shard read 80% on this machine is staged, one read 70% is not (the default 0.8)."""
    local = Corpus.from_webdataset(str(wds_dir))
    first = int(local.shard_starts[3])
    count = int(local.shard_counts[3])  # 20 samples
    with RangeHTTPServer(wds_dir) as server:
        remote = _remote(local, server)
        for share, staged in ((16, True), (14, False)):
            ids = np.arange(first, first + share)
            reader = RemoteTarReader(remote, cache=CachePolicy(directory=str(tmp_path / str(share))))
            try:
                reader.will_read([ids], lambda: ids)
                reader.cache.wait(remote.shards[3].name)
                assert (reader.cache.ready(remote.shards[3].name, remote.shards[3].size)
                        is not None) is staged, (share, count)
            finally:
                reader.close()


def test_cache_bounded_lru_and_foreign_files_kept(wds_dir, tmp_path):
    local = Corpus.from_webdataset(str(wds_dir))
    directory = tmp_path / "c"
    directory.mkdir()
    (directory / "notes.txt").write_text("not a staged shard")
    sizes = [s.size for s in local.shards]
    limit = sizes[-1] + sizes[-2]
    with RangeHTTPServer(wds_dir) as server, RangeFetcher() as fetcher:
        remote = _remote(local, server)
        cache = ShardCache(fetcher, CachePolicy(directory=str(directory), limit_bytes=limit))
        for shard in remote.shards:  # one after another: the last ones are the most recent
            cache.request(shard.name, shard.size)
            cache.wait(shard.name)
        cache.close()
        present = [s for s in remote.shards if cache.ready(s.name, s.size)]
        assert remote.shards[-1] in present and remote.shards[-2] in present
        assert sum(s.size for s in present) <= limit
    assert (directory / "notes.txt").read_text() == "not a staged shard"


def _stage_in_process(url: str, size: int, directory: str, start) -> int:
    start.wait()
    with RangeFetcher() as fetcher:
        cache = ShardCache(fetcher, CachePolicy(directory=directory))
        cache.request(url, size)
        cache.wait(url)
        return cache.staged


def test_one_download_per_machine(wds_dir, tmp_path):
    """Two processes staging the same shard at once: one downloads, the other finds it."""
    local = Corpus.from_webdataset(str(wds_dir))
    shard = local.shards[3]
    with RangeHTTPServer(wds_dir) as server:
        url = f"{server.url}/{os.path.basename(shard.name)}"
        ctx = multiprocessing.get_context("spawn")
        with ctx.Manager() as manager:
            start = manager.Barrier(2)
            with ctx.Pool(2) as pool:
                staged = pool.starmap(_stage_in_process,
                                      [(url, shard.size, str(tmp_path), start)] * 2, chunksize=1)
        assert sorted(staged) == [0, 1]
        assert server.bytes_sent == shard.size


def test_failed_stage_leaves_nothing_and_reads_report(wds_dir, tmp_path):
    from es_stream.errors import ShardError

    local = Corpus.from_webdataset(str(wds_dir))
    with RangeHTTPServer(wds_dir) as server:
        remote = remote_corpus(local, [f"{server.url}/{os.path.basename(s.name)}"
                                       for s in local.shards],
                               retry=RetryPolicy(attempts=2, total_timeout=2, request_timeout=1))
    # the server is gone
    batches = _plan(remote)
    reader = RemoteTarReader(remote, cache=CachePolicy(directory=str(tmp_path / "c")))
    try:
        reader.will_read(batches, lambda: np.concatenate(batches))
        for shard in remote.shards:
            with pytest.raises(ShardError, match="attempt"):
                reader.cache.wait(shard.name)
            assert isinstance(reader.cache.error(shard.name), ShardError)
        out = reader.read_batch(batches[0], remote.locate(batches[0])[0])
        assert all(isinstance(o, ShardError) for o in out)
    finally:
        reader.close()
    assert not [f for f in os.listdir(tmp_path / "c") if not f.endswith("es-stream-lock")]


def test_cache_policy_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("ES_STREAM_STAGE_ABOVE", "0.5")
    monkeypatch.setenv("ES_STREAM_CACHE", str(tmp_path))
    monkeypatch.setenv("ES_STREAM_CACHE_LIMIT", "1000")
    policy = CachePolicy.from_env()
    assert (policy.stage_above, policy.directory, policy.limit_bytes) == (0.5, str(tmp_path), 1000)
    monkeypatch.setenv("ES_STREAM_CACHE_LIMIT", "lots")
    with pytest.raises(ValueError, match="ES_STREAM_CACHE_LIMIT"):
        CachePolicy.from_env()
    with pytest.raises(ValueError, match="stage_above"):
        CachePolicy(stage_above=0)


def test_unpruned_mds_epoch_stages_raw_shards(mds_dir, tmp_path):
    """Raw MDS shards a reader reads whole are staged and memory-mapped: the epoch's samples
    equal the local ones, and once staged nothing more is requested."""
    pytest.importorskip("streaming")
    from es_stream.remote.mds import RemoteMDSReader

    local = Corpus.from_mds(str(mds_dir))
    with RangeHTTPServer(mds_dir) as server:
        remote = Corpus.from_mds(remote=server.url, local=str(tmp_path / "local"))
        batches = _plan(remote)
        reader = RemoteMDSReader(remote, cache=CachePolicy(directory=str(tmp_path / "c")))
        want = open_reader(local)
        try:
            reader.will_read(batches, lambda: np.concatenate(batches))
            for url in reader.urls:
                reader.cache.wait(url)
            before = server.requests
            for ids in batches:
                shards, positions = remote.locate(ids)
                early = reader.read_batch(ids, shards)
                got = [e if e is not None else reader.read(s, p, i) for e, s, p, i in
                       zip(early, shards.tolist(), positions.tolist(), ids.tolist())]
                expected = [want.read(s, p, i) for s, p, i in
                            zip(shards.tolist(), positions.tolist(), ids.tolist())]
                assert [g["bin"] for g in got] == [e["bin"] for e in expected]
            assert server.requests == before  # every sample from the staged shards
            assert reader.cache.staged == remote.num_shards
        finally:
            reader.close()
            want.close()


def test_unwritable_cache_directory_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache directory would go")
    with pytest.raises(OSError, match=r"file/cache.*ES_STREAM_CACHE"):
        CachePolicy(directory=str(blocker / "cache")).where()
    if os.getuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(PermissionError, match="ES_STREAM_CACHE"):
            CachePolicy(directory=str(locked)).where()


def test_rewritten_object_of_the_same_size_is_staged_again(tmp_path):
    """A staged copy is keyed by the ETag the index records: an object rewritten with the same
    size (a new ETag in a new index) is never served from the old copy."""
    import dataclasses

    import webdataset as wds

    root = tmp_path / "www"
    root.mkdir()

    def write(tag: bytes) -> None:
        with wds.TarWriter(str(root / "s.tar")) as w:
            for i in range(4):
                w.write({"__key__": f"k{i}", "bin": tag * 100})

    write(b"A")
    local = Corpus.from_webdataset(str(root / "s.tar"))
    with RangeHTTPServer(root) as server:
        def staged_bytes(etag: str) -> list[bytes]:
            remote = _remote(local, server)
            remote.shards[:] = [dataclasses.replace(s, etag=etag) for s in remote.shards]
            ids = [np.arange(4)]
            reader = RemoteTarReader(remote, cache=CachePolicy(directory=str(tmp_path / "c")))
            try:
                reader.will_read(ids, lambda: ids[0])
                return [b for _, b in _read_all(reader, remote, ids)]
            finally:
                reader.close()

        assert staged_bytes('"v1"') == [b"A" * 100] * 4
        write(b"B")  # same size, new content: a store gives it a new ETag
        assert staged_bytes('"v2"') == [b"B" * 100] * 4
        assert staged_bytes('"v1"') == [b"A" * 100] * 4  # the old copy, still keyed by v1
