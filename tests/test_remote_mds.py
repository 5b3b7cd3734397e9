"""MDS corpora in an object store (moto's S3 API, a Range HTTP server): raw shards read by byte
range (only kept samples cross the network), compressed ones fetched whole into a bounded cache,
and a shard whose requests all fail lost under on_error="skip" like an unreadable local one."""

from __future__ import annotations

import os
import re
import shutil
import warnings

import numpy as np
import pytest

pytest.importorskip("obstore")
pytest.importorskip("streaming")

from conftest import payload  # noqa: E402
from es_stream import Corpus, ESDataset, loader  # noqa: E402
from es_stream.errors import ShardError  # noqa: E402
from es_stream.remote import RetryPolicy  # noqa: E402
from es_stream.remote.mds import RemoteMDSReader  # noqa: E402
from es_stream.sources import open_reader  # noqa: E402
from es_stream.sources.mds import MDSShardReader, header_size, sample_offsets  # noqa: E402
from remote_fixtures import s3_server  # noqa: E402,F401 (fixture)
from servers import FaultProxy, RangeHTTPServer  # noqa: E402

FAST = RetryPolicy(attempts=2, backoff=0.01, max_backoff=0.05, total_timeout=3,
                   request_timeout=2, connect_timeout=1)


def _epoch(corpus, workers, epoch=0, **kw):
    ds = ESDataset(corpus, 4, seed=1, **kw)
    ds.set_epoch(epoch)
    # obstore ran in this process (from_mds read index.json through it), so not fork; spawn,
    # not forkserver: a forkserver started here would keep this test's environment (its moto
    # endpoint) for the workers of every later test in the session
    extra = {"multiprocessing_context": "spawn"} if workers else {}
    return [(mb.ids.tolist(), list(mb.data["bin"]) if mb.data else [],
             mb.data["cls"].tolist() if mb.data else [], mb.lost_ids.tolist())
            for mb in loader(ds, num_workers=workers, **extra)]


def _spans(mds_dir, corpus) -> np.ndarray:
    """Byte length of each sample, from the local shards' headers."""
    out = []
    for shard in corpus.shards:
        with open(os.path.join(mds_dir, shard.name), "rb") as f:
            head = f.read()
        off = sample_offsets(head, shard.num_samples, len(head), shard.name)
        out.append(np.diff(off))
    return np.concatenate(out)


@pytest.fixture
def s3_mds(s3_server, mds_dir, monkeypatch):
    """(local corpus, the same MDS dataset in moto's S3 read by range)."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    s3_server.upload_dir("mdsdata", mds_dir, prefix="ds")
    remote = Corpus.from_mds("s3://mdsdata/ds")
    # the endpoint indexed against (AWS_ENDPOINT_URL) travels with the corpus into workers
    assert remote.storage_options == {"endpoint": s3_server.url}
    return Corpus.from_mds(str(mds_dir)), remote


@pytest.mark.parametrize("workers", [0, 2])
def test_s3_mds_epoch_equals_local(s3_mds, workers):
    local, remote = s3_mds
    assert remote.mds.remote == "s3://mdsdata/ds"
    assert remote.fingerprint == local.fingerprint  # one score store / manifests for both
    assert all(s.etag for s in remote.shards)  # identities recorded at indexing
    assert type(open_reader(remote)).__name__ == "RemoteMDSReader"
    got = _epoch(remote, workers, epoch=1)
    assert got == _epoch(local, workers, epoch=1)
    assert sorted(i for ids, *_ in got for i in ids) == list(range(local.num_samples))
    assert all(b == payload(i) for ids, bins, *_ in got for i, b in zip(ids, bins))


def test_local_cache_and_remote_keywords_like_streaming(s3_mds, tmp_path):
    """from_mds(local, remote=...) as StreamingDataset(remote=, local=) takes them: raw shards
    are still read by range (nothing written to local), the corpus is the same."""
    local, remote = s3_mds
    cached = Corpus.from_mds(str(tmp_path / "cache"), remote="s3://mdsdata/ds",
                             storage_options=remote.storage_options)
    assert cached.fingerprint == local.fingerprint
    assert _epoch(cached, 0) == _epoch(local, 0)
    assert not (tmp_path / "cache").exists() or not any(
        n.endswith(".mds") for n in os.listdir(tmp_path / "cache"))


def test_pruned_mds_samples_never_cross_the_network(mds_dir, tmp_path, monkeypatch):
    import torch

    from es_stream import ESWPPolicy, Pruner, ScoreStore

    # range reads only, so the bytes are exactly the samples' spans (staging the shards an
    # unpruned epoch reads whole is tested by test_unpruned_mds_epoch_stages_raw_shards)
    monkeypatch.setenv("ES_STREAM_STAGE_ABOVE", "2")

    local = Corpus.from_mds(str(mds_dir))
    store = ScoreStore(local.num_samples)
    store.scatter(torch.arange(50), torch.rand(50, generator=torch.Generator().manual_seed(0)))
    Pruner(local, store, ESWPPolicy(ratio=0.5, burn_in_epochs=0, anneal=0.0),
           tmp_path / "m").on_epoch_end(0, 4)
    spans = _spans(mds_dir, local)
    headers = sum(header_size(s.num_samples) for s in local.shards)
    with RangeHTTPServer(mds_dir.parent) as server:
        remote = Corpus.from_mds(f"{server.url}/{mds_dir.name}")
        before = server.bytes_sent
        full = _epoch(remote, 0, epoch=1)
        unpruned = server.bytes_sent - before
        pruned_run = _epoch(remote, 0, epoch=1, manifests=tmp_path / "m")
        pruned = server.bytes_sent - before - unpruned
    kept = sorted(i for ids, *_ in pruned_run for i in ids)
    assert 0 < len(kept) < local.num_samples and len(full) > len(pruned_run)
    assert unpruned == int(spans.sum()) + headers  # each sample once, each header once
    touched = set(local.locate(np.array(kept))[0].tolist())
    assert pruned == int(spans[kept].sum()) + sum(
        header_size(local.shards[s].num_samples) for s in touched)
    assert pruned <= 0.55 * unpruned


def test_read_batch_coalesces_touching_samples(mds_dir):
    local = Corpus.from_mds(str(mds_dir))
    with RangeHTTPServer(mds_dir.parent) as server:
        remote = Corpus.from_mds(f"{server.url}/{mds_dir.name}")
        reader = open_reader(remote)
        try:
            ids = np.array([3, 1, 2, 5])  # shard 0: 1..3 touch (one request), 5 another
            shards, _ = remote.locate(ids)
            assert set(shards.tolist()) == {0}
            server.requests = 0
            samples = reader.read_batch(ids, shards)
            assert server.requests == reader.fetcher.requests == 1 + 2  # header + 2 runs
            assert [s["idx"] for s in samples] == ids.tolist()
            spans = _spans(mds_dir, local)
            assert reader.fetcher.bytes_fetched == header_size(local.shards[0].num_samples) + \
                int(spans[ids].sum())
            again = reader.read_batch(np.array([4]), np.array([0]))  # header known: 1 request
            assert again[0]["idx"] == 4 and reader.fetcher.requests == 4
            assert reader.read_batch(ids, shards, skip_shards={0}) == [None] * 4
        finally:
            reader.close()


def test_shard_header_checked_against_index_json(mds_dir, tmp_path):
    www = tmp_path / "www"
    shutil.copytree(mds_dir, www / "ds")
    remote_ok = None
    with RangeHTTPServer(www) as server:
        remote_ok = Corpus.from_mds(f"{server.url}/ds")
        name = remote_ok.shards[1].name
        with open(www / "ds" / name, "r+b") as f:  # the header now claims one sample more
            count = int(np.frombuffer(f.read(4), np.uint32)[0])
            f.seek(0)
            f.write(np.uint32(count + 1).tobytes())
        reader = open_reader(remote_ok)
        try:
            first = int(remote_ok.shard_starts[1])
            got = reader.read_batch(np.array([first, 0]), np.array([1, 0]))
            assert isinstance(got[0], ShardError) and not isinstance(got[1], ShardError)
            assert f"{server.url}/ds/{name}" in str(got[0]) and "header says" in str(got[0])
            with pytest.raises(ShardError, match="header says"):
                reader.read(1, 0, first)
        finally:
            reader.close()


def test_compressed_mds_fetched_whole_into_a_bounded_cache(s3_server, tmp_path, monkeypatch):
    from streaming import MDSWriter

    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    src = tmp_path / "zmds"
    with MDSWriter(out=str(src), columns={"bin": "bytes", "cls": "int", "idx": "int"},
                   compression="zstd",
                   size_limit=1 << 10) as w:
        for i in range(60):
            w.write({"bin": payload(i), "cls": i % 10, "idx": i})
    assert not any(n.endswith(".mds") for n in os.listdir(src))  # only .mds.zstd uploaded
    s3_server.upload_dir("zdata", src, prefix="z")
    cache = tmp_path / "cache"
    remote = Corpus.from_mds(str(cache), remote="s3://zdata/z")
    raw = [e["raw_data"]["bytes"] for e in remote.mds.index["shards"]]
    limit = 2 * max(raw)
    reader = RemoteMDSReader(remote, cache_limit=limit)
    try:
        assert not reader.by_range.any()
        for i in list(range(remote.num_samples)) * 2:  # the second pass finds some evicted
            shard, pos = remote.locate(np.array([i]))
            assert reader.read_batch(np.array([i]), shard) == [None]  # left to read()
            sample = reader.read(int(shard[0]), int(pos[0]), i)
            assert sample["idx"] == i and sample["bin"] == payload(i)
            cached = [os.path.getsize(cache / n) for n in os.listdir(cache) if n.endswith(".mds")]
            assert sum(cached) <= limit  # the bound holds at every step
        assert reader.fetcher.requests > len(raw)  # evicted shards fetched again...
    finally:
        reader.close()
    # ...and the cache never held a file it did not make: only decompressed shards and locks
    assert all(n.endswith(".mds") or n.endswith(".es-stream-lock") for n in os.listdir(cache))
    unbounded = Corpus.from_mds(str(tmp_path / "cache2"), remote="s3://zdata/z",
                                storage_options={"endpoint": s3_server.url})
    got = _epoch(unbounded, 2)
    assert sorted(i for ids, *_ in got for i in ids) == list(range(60))
    assert all(b == payload(i) for ids, bins, *_ in got for i, b in zip(ids, bins))


def _shard_lost_under_skip(corpus, workers, shard):
    """The epoch under on_error="skip": (ids read, ids lost, warnings seen here)."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        got = _epoch(corpus, workers, on_error="skip")
    read = [i for ids, *_ in got for i in ids]
    lost = [i for *_, lost in got for i in lost]
    return read, lost, [str(w.message) for w in seen]


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("fmt", ["mds", "wds"])
def test_shard_failing_after_retries_is_lost_like_a_local_one(fmt, workers, mds_dir, wds_dir):
    """Every request for one shard's object fails (503 after the retries): its samples are
    lost and reported in MetaBatch.lost_ids, the others read, nothing silently dropped."""
    from es_stream.remote.tar import remote_corpus

    root = mds_dir if fmt == "mds" else wds_dir
    local = Corpus.from_mds(str(root)) if fmt == "mds" else Corpus.from_webdataset(str(root))
    bad = 1
    name = os.path.basename(local.shards[bad].name)
    with RangeHTTPServer(root) as server, FaultProxy(
            server.port, kinds=("503",), only_paths=[f"/{name}"]) as proxy:
        if fmt == "mds":
            remote = Corpus.from_mds(proxy.url, retry=FAST)
        else:
            remote = remote_corpus(local, [f"{proxy.url}/{os.path.basename(s.name)}"
                                           for s in local.shards], retry=FAST)
        proxy.fail_rate = 1.0  # from now on (indexed while it was healthy)
        read, lost, seen = _shard_lost_under_skip(remote, workers, bad)
        assert proxy.faults >= FAST.attempts
        with pytest.raises(ShardError, match=re.escape(f"{proxy.url}/{name}")):
            _epoch(remote, 0)  # on_error="raise": the same fault is an error naming the URL
    first, end = int(local.shard_starts[bad]), int(local.shard_starts[bad + 1])
    assert sorted(lost) == list(range(first, end))
    assert sorted(read) == [i for i in range(local.num_samples) if not first <= i < end]
    if workers == 0:  # a worker's warnings go to its stderr
        assert any(name in w and "skipping" in w for w in seen)


@pytest.mark.parametrize("workers", [0, 2])
def test_server_gone_mds_samples_lost_or_named(mds_dir, workers):
    with RangeHTTPServer(mds_dir.parent) as server:
        remote = Corpus.from_mds(f"{server.url}/{mds_dir.name}", retry=FAST)
    read, lost, _ = _shard_lost_under_skip(remote, workers, None)
    assert read == [] and sorted(lost) == list(range(remote.num_samples))
    with pytest.raises(ShardError, match=r"http://127\.0\.0\.1:\d+/mds/shard\.\d+\.mds"):
        _epoch(remote, workers)


def test_local_reader_unchanged_for_local_mds(mds_dir):
    assert type(open_reader(Corpus.from_mds(str(mds_dir)))) is MDSShardReader


def test_raw_shard_already_in_local_cache_is_not_fetched(mds_dir, tmp_path):
    """streaming's local= is a cache: a shard already there is mapped, the others fetched."""
    cache = tmp_path / "cache"
    cache.mkdir()
    with RangeHTTPServer(mds_dir.parent) as server:
        remote = Corpus.from_mds(str(cache), remote=f"{server.url}/{mds_dir.name}")
        shutil.copy(mds_dir / remote.shards[0].name, cache / remote.shards[0].name)
        reader = open_reader(remote)
        try:
            ids = np.arange(int(remote.shard_starts[2]))  # shards 0 (cached) and 1
            shards, _ = remote.locate(ids)
            got = reader.read_batch(ids, shards)
            first = int(remote.shard_starts[1])
            assert got[:first] == [None] * first and all(g is not None for g in got[first:])
            assert [reader.read(0, i, i)["idx"] for i in range(first)] == list(range(first))
            assert [g["idx"] for g in got[first:]] == ids[first:].tolist()
            spans = _spans(mds_dir, remote)
            assert reader.fetcher.bytes_fetched == header_size(remote.shards[1].num_samples) + \
                int(spans[first:len(ids)].sum())  # nothing of shard 0 crossed the network
        finally:
            reader.close()
