"""Tar corpora in an object store (moto's S3 API, a Range HTTP server) read by byte range
through ESDataset: the same epoch as from local disk, faults retried, a dead server named."""

from __future__ import annotations

import os
import re
import time

import numpy as np
import pytest

pytest.importorskip("obstore")

from es_stream import Corpus, ESDataset, loader  # noqa: E402
from es_stream.errors import ShardError  # noqa: E402
from es_stream.remote.tar import RemoteTarReader, remote_corpus  # noqa: E402
from remote_fixtures import s3_server  # noqa: E402,F401 (fixture)
from servers import FaultProxy, RangeHTTPServer  # noqa: E402


def _epoch(corpus, workers, epoch=0, **kw):
    ds = ESDataset(corpus, 4, seed=1, **kw)
    ds.set_epoch(epoch)
    return [(mb.ids.tolist(), list(mb.data["bin"]), mb.data["cls"].tolist(), mb.lost_ids.tolist())
            for mb in loader(ds, num_workers=workers)]


@pytest.fixture
def s3_corpora(s3_server, wds_dir, monkeypatch):
    """(local corpus, the same shards in moto's S3) with the environment pointing at it."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    local = Corpus.from_webdataset(str(wds_dir))
    urls = s3_server.upload_dir("tars", wds_dir)
    assert [u.rsplit("/", 1)[1] for u in urls] == [s.name.rsplit("/", 1)[1] for s in local.shards]
    return local, remote_corpus(local, urls)


@pytest.mark.parametrize("workers", [0, 2])
def test_s3_epoch_equals_local(s3_corpora, workers):
    local, remote = s3_corpora
    assert remote.fingerprint == local.fingerprint  # one score store / manifest tree for both
    assert ESDataset(remote, 4).seekable  # block-shuffled like a local corpus
    got = _epoch(remote, workers, epoch=1)
    assert got == _epoch(local, workers, epoch=1)
    assert sorted(i for ids, *_ in got for i in ids) == list(range(local.num_samples))


def test_s3_faults_every_sample_exactly_once(s3_server, s3_corpora):
    from es_stream.remote import RetryPolicy

    local, remote = s3_corpora
    with FaultProxy(s3_server.port, fail_rate=0.05, fail_first=2, seed=9,
                    kinds=("503", "throttle", "reset", "truncate")) as proxy:
        # the endpoint by storage_options: they travel with the corpus into the workers
        remote = remote_corpus(local, [s.name for s in remote.shards],
                               storage_options={"endpoint": proxy.url},
                               retry=RetryPolicy(attempts=8, backoff=0.01, max_backoff=0.1))
        got = _epoch(remote, 2)
    assert proxy.faults >= 2
    assert got == _epoch(local, 2)  # same ids, bytes and order: nothing lost, nothing twice
    assert all(not lost for *_, lost in got)


def test_pruned_samples_never_cross_the_network(wds_dir, tmp_path, monkeypatch):
    import torch

    # range reads only, so the bytes are exactly the samples' spans (staging whole shards of
    # the unpruned epoch is tested in test_remote_cache.py)
    monkeypatch.setenv("ES_STREAM_STAGE_ABOVE", "2")

    from es_stream import ESWPPolicy, Pruner, ScoreStore

    local = Corpus.from_webdataset(str(wds_dir))
    store = ScoreStore(local.num_samples)
    store.scatter(torch.arange(50), torch.rand(50, generator=torch.Generator().manual_seed(0)))
    Pruner(local, store, ESWPPolicy(ratio=0.5, burn_in_epochs=0, anneal=0.0),
           tmp_path / "m").on_epoch_end(0, 4)
    with RangeHTTPServer(wds_dir) as server:
        remote = remote_corpus(local, [f"{server.url}/{s.name.rsplit('/', 1)[1]}"
                                       for s in local.shards])
        lengths = local.tar.lengths
        full = _epoch(remote, 0, epoch=1)
        unpruned = server.bytes_sent
        pruned = _epoch(remote, 0, epoch=1, manifests=tmp_path / "m")
        pruned_bytes = server.bytes_sent - unpruned
    kept = sorted(i for ids, *_ in pruned for i in ids)
    assert 0 < len(kept) < local.num_samples and len(full) > len(pruned)
    assert unpruned == int(lengths.sum())  # every sample's span once
    assert pruned_bytes == int(lengths[kept].sum())  # the kept spans, not one byte more


@pytest.mark.parametrize("workers", [0, 2])
def test_server_gone_shard_error_in_time(wds_dir, workers):
    from es_stream.remote import RetryPolicy

    local = Corpus.from_webdataset(str(wds_dir))
    with RangeHTTPServer(wds_dir) as server:
        remote = remote_corpus(local, [f"{server.url}/{s.name.rsplit('/', 1)[1]}"
                                       for s in local.shards],
                               retry=RetryPolicy(total_timeout=2, request_timeout=1))
    t = time.monotonic()
    with pytest.raises(ShardError, match=r"http://127\.0\.0\.1:\d+/train-\d+\.tar.*attempt"):
        _epoch(remote, workers)
    assert time.monotonic() - t < 2 + 1 + 15  # the deadline, plus starting the workers


def test_forked_worker_after_parent_used_obstore_fails_fast(s3_corpora, monkeypatch):
    """A plain DataLoader forking after this process used obstore: a clear error, no hang."""
    from torch.utils.data import DataLoader

    monkeypatch.setenv("ES_STREAM_STAGE_ABOVE", "2")  # no staged copy to read instead

    _, remote = s3_corpora
    _epoch(remote, 0)  # obstore's runtime now lives in this process
    ds = ESDataset(remote, 4)
    t = time.monotonic()
    with pytest.raises(ShardError, match="forkserver"):
        list(DataLoader(ds, batch_size=None, num_workers=1, multiprocessing_context="fork"))
    assert time.monotonic() - t < 30


def test_local_datasets_keep_fork_after_obstore_was_used(s3_corpora):
    """Only a dataset that reads object-store shards needs forkserver workers: a local one, with
    a decode function that cannot be pickled, still runs in forked workers in this process."""
    local, remote = s3_corpora
    _epoch(remote, 0)  # obstore's runtime now lives in this process
    ds = ESDataset(local, 4, decode=lambda s: s, collate=list)
    dl = loader(ds, num_workers=2)
    assert dl.multiprocessing_context is None
    assert sorted(i for mb in dl for i in mb.ids.tolist()) == list(range(local.num_samples))
    assert loader(ESDataset(remote, 4), num_workers=2).multiprocessing_context is not None


def test_reader_counts_network_bytes(wds_dir):
    local = Corpus.from_webdataset(str(wds_dir))
    with RangeHTTPServer(wds_dir) as server:
        remote = remote_corpus(local, [f"{server.url}/{s.name.rsplit('/', 1)[1]}"
                                       for s in local.shards])
        reader = RemoteTarReader(remote)
        try:
            ids = np.array([3, 4, 5, 30])  # 3..5 touch: one request; 30 another shard
            shards, _ = remote.locate(ids)
            samples = reader.read_batch(ids, shards)
            assert reader.fetcher.requests == 2 == server.requests
            assert reader.fetcher.bytes_fetched == int(local.tar.lengths[ids].sum())
            assert [s["__key__"] for s in samples] == [f"sample{i:06d}" for i in ids.tolist()]
        finally:
            reader.close()


def test_workers_see_the_environment_of_now(s3_corpora, monkeypatch, tmp_path):
    """forkserver workers fork from a server started with the environment of its first
    DataLoader: a cache directory set afterwards must still reach the workers of a later loader
    (as would credentials or an endpoint)."""
    from es_stream.remote.cache import STAGED_PREFIX

    local, remote = s3_corpora
    _epoch(remote, 0)  # obstore used here: loaders now start workers by forkserver
    assert _epoch(remote, 2) == _epoch(local, 2)  # starts the worker server, if not yet
    monkeypatch.setenv("ES_STREAM_CACHE", str(tmp_path))
    assert _epoch(remote, 2) == _epoch(local, 2)
    # the workers staged the shards they read whole in the directory set after they started
    assert [f for f in os.listdir(tmp_path) if f.startswith(STAGED_PREFIX)]


def test_tar_shards_indexed_straight_from_the_bucket(s3_server, wds_dir, monkeypatch):
    """No local copy: the shards are streamed once from S3 to be indexed (one GET each, the
    same index as a local scan), then read by byte range."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    urls = s3_server.upload_dir("direct", wds_dir)
    local = Corpus.from_webdataset(str(wds_dir))
    with FaultProxy(s3_server.port) as proxy:
        remote = Corpus.from_webdataset(urls, storage_options={"endpoint": proxy.url})
        assert proxy.requests == len(urls)  # one streamed GET per shard, nothing else
    assert remote.fingerprint == local.fingerprint
    assert remote.tar.offsets.tolist() == local.tar.offsets.tolist()
    assert [s.name for s in remote.shards] == urls
    assert remote.storage_options == {"endpoint": proxy.url}
    remote.storage_options = {"endpoint": s3_server.url}  # the proxy is gone
    assert _epoch(remote, 0) == _epoch(local, 0)


def test_a_download_cut_while_indexing_names_the_shard(s3_server, wds_dir, monkeypatch):
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    urls = s3_server.upload_dir("cut", wds_dir)
    with FaultProxy(s3_server.port, fail_first=1, kinds=("truncate",)) as proxy:
        with pytest.raises(ShardError, match=re.escape(urls[0])):
            Corpus.from_webdataset(urls, storage_options={"endpoint": proxy.url})
