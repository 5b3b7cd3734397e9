"""Pruning manifests: layout, metadata, atomicity, readers (pyarrow, DuckDB), and the stream
skipping pruned samples without reading them."""

from __future__ import annotations

import os

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch

import es_stream.sources.mds as mds_source
import es_stream.sources.wds as wds_source
from es_stream import (Corpus, ESDataset, ESWPPolicy, InfoBatchPolicy, ManifestError, Pruner,
                       ScoreStore, loader)
from conftest import write_wds


def scored_store(corpus: Corpus, seed: int = 0) -> ScoreStore:
    store = ScoreStore(corpus.num_samples)
    store.scatter(torch.arange(corpus.num_samples),
                  torch.from_numpy(np.random.default_rng(seed).random(corpus.num_samples).astype(np.float32)))
    return store


@pytest.fixture
def pruned(wds_dir, tmp_path):
    """A WebDataset corpus with epoch 1 pruned at ratio 0.5."""
    corpus = Corpus.from_webdataset(str(wds_dir))
    pruner = Pruner(corpus, scored_store(corpus), ESWPPolicy(ratio=0.5, burn_in_epochs=0, anneal=0.0),
                    tmp_path / "manifests")
    pruner.on_epoch_end(epoch=0, total_epochs=4)
    return corpus, tmp_path / "manifests"


def test_layout_columns_and_metadata(pruned):
    corpus, out = pruned
    epoch_dir = out / "epoch=00001"
    assert sorted(os.listdir(epoch_dir)) == ["_SUCCESS"] + [f"shard={s:05d}.parquet" for s in range(5)]
    table = pq.read_table(epoch_dir / "shard=00001.parquet")
    assert table.schema.names == ["sample", "id", "keep", "score", "weight"]
    assert [str(t) for t in table.schema.types] == ["uint32", "int64", "bool", "float", "float"]
    assert table.column("sample").to_pylist() == list(range(13))
    assert table.column("id").to_pylist() == list(range(7, 20))
    meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    assert meta["corpus_fingerprint"] == corpus.fingerprint
    assert meta["policy"] == "es" and float(meta["ratio"]) == 0.5 and meta["seed"] == "0"
    assert meta["epoch"] == "1" and meta["es_stream_version"]
    keep = pads.dataset(str(out), partitioning="hive").to_table().column("keep").to_numpy()
    assert keep.sum() == int(np.ceil(0.5 * corpus.num_samples))
    assert not [f for f in os.listdir(epoch_dir) if f.endswith(".tmp")]


def test_readable_as_one_table_with_pyarrow_and_duckdb(pruned, tmp_path):
    corpus, out = pruned
    store = ScoreStore(corpus.num_samples)
    Pruner(corpus, store, ESWPPolicy(ratio=0.3, burn_in_epochs=0, anneal=0.0), out).on_epoch_end(1, 4)
    table = pads.dataset(str(out), partitioning="hive").to_table()
    assert table.num_rows == 2 * corpus.num_samples
    assert sorted(set(table.column("epoch").to_pylist())) == [1, 2]
    duckdb = pytest.importorskip("duckdb")
    rows = duckdb.sql(f"select epoch, count(*), sum(keep::int) from read_parquet('{out}/*/*.parquet', "
                      "hive_partitioning=true) group by epoch order by epoch").fetchall()
    assert [(int(e), n) for e, n, _ in rows] == [(1, 50), (2, 50)]
    assert rows[1][2] == 35


@pytest.mark.parametrize("workers", [0, 3])
def test_pruned_ids_never_yielded_kept_exactly_once(pruned, workers):
    corpus, out = pruned
    keep = pads.dataset(str(out / "epoch=00001")).to_table()
    kept = set(np.asarray(keep.column("id"))[np.asarray(keep.column("keep"))].tolist())
    ds = ESDataset(corpus, 4, manifests=out)
    ds.set_epoch(1)
    got = torch.cat([mb.ids for mb in loader(ds, num_workers=workers, persistent_workers=False)]).tolist()
    assert sorted(got) == sorted(kept)
    ds.set_epoch(0)  # no manifest for epoch 0: everything
    assert len(torch.cat([mb.ids for mb in ds])) == corpus.num_samples
    assert len(ds) == int(np.ceil(corpus.num_samples / 4))


def test_wds_reads_only_kept_bytes(pruned, monkeypatch):
    corpus, out = pruned
    seen = {"bytes": 0}
    real = os.pread

    def counting_pread(fd, length, offset):
        data = real(fd, length, offset)
        seen["bytes"] += len(data)
        return data

    monkeypatch.setattr(wds_source.os, "pread", counting_pread)
    ds = ESDataset(corpus, 4, manifests=out)
    ds.set_epoch(1)
    ids = torch.cat([mb.ids for mb in ds]).numpy()
    kept_bytes = int(corpus.tar.lengths[ids].sum())  # payloads plus their own headers, padded
    all_bytes = int(corpus.tar.lengths.sum())
    assert 0 < seen["bytes"] <= kept_bytes < all_bytes


def test_mds_never_reads_pruned(mds_dir, tmp_path, monkeypatch):
    corpus = Corpus.from_mds(mds_dir)
    Pruner(corpus, scored_store(corpus), ESWPPolicy(ratio=0.5, burn_in_epochs=0, anneal=0.0),
           tmp_path / "m").on_epoch_end(0, 4)
    read = []
    real = mds_source.MDSShardReader.read

    def recording_read(self, shard, position, sample_id):
        read.append(sample_id)
        return real(self, shard, position, sample_id)

    monkeypatch.setattr(mds_source.MDSShardReader, "read", recording_read)
    ds = ESDataset(corpus, 4, manifests=tmp_path / "m")
    ds.set_epoch(1)
    yielded = torch.cat([mb.ids for mb in ds]).tolist()
    assert sorted(read) == sorted(yielded) and len(yielded) == 25


def test_infobatch_weights_reach_the_meta_batch(wds_dir, tmp_path):
    corpus = Corpus.from_webdataset(str(wds_dir))
    store = scored_store(corpus, seed=3)
    Pruner(corpus, store, InfoBatchPolicy(ratio=0.5, anneal=0.0), tmp_path / "ib").on_epoch_end(0, 4)
    ds = ESDataset(corpus, 8, manifests=tmp_path / "ib")
    ds.set_epoch(1)
    batches = list(ds)
    ids = torch.cat([mb.ids for mb in batches])
    weights = torch.cat([mb.weights for mb in batches])
    scores = store.gather(ids)
    below = scores < store.to_numpy().astype(np.float64).mean()
    assert torch.allclose(weights[below], torch.tensor(2.0)) and (weights[~below] == 1).all()


def test_manifest_from_another_corpus_is_refused(pruned, tmp_path):
    corpus, out = pruned
    write_wds(tmp_path / "other", sizes=(7, 13, 1, 20, 10))
    other = Corpus.from_webdataset(str(tmp_path / "other"))
    ds = ESDataset(other, 4, manifests=out)
    with pytest.raises(ManifestError, match="epoch=00001/shard=00000.parquet: manifest of corpus"):
        ds.set_epoch(1)
        list(ds)


def test_unfinished_epoch_is_refused(pruned):
    corpus, out = pruned
    os.remove(out / "epoch=00001" / "_SUCCESS")
    with pytest.raises(ManifestError, match="epoch=00001: no _SUCCESS marker"):
        ESDataset(corpus, 4, manifests=out).plan(1)


def test_missing_shard_manifest_is_refused(pruned):
    corpus, out = pruned
    os.remove(out / "epoch=00001" / "shard=00003.parquet")
    with pytest.raises(ManifestError, match="shard=00003.parquet: manifest missing for shard 3"):
        ESDataset(corpus, 4, manifests=out).plan(1)


def test_rewriting_an_epoch_replaces_it(pruned):
    corpus, out = pruned
    Pruner(corpus, ScoreStore(corpus.num_samples), ESWPPolicy(ratio=0.2, burn_in_epochs=0, anneal=0.0),
           out).on_epoch_end(0, 4)
    ds = ESDataset(corpus, 4, manifests=out)
    assert ds.plan(1).num_samples == int(np.ceil(0.8 * corpus.num_samples))


def test_store_of_another_corpus_is_refused(pruned, tmp_path):
    corpus, out = pruned
    with pytest.raises(ValueError, match="store holds 3 scores, corpus has 50"):
        Pruner(corpus, ScoreStore(3), ESWPPolicy(), out)


@pytest.mark.parametrize("backing", ["memory", "memmap"])
def test_decay_pulls_only_pruned_scores_toward_the_mean(wds_dir, tmp_path, backing, monkeypatch):
    monkeypatch.setattr("es_stream.pruner.CHUNK", 16)  # several chunks over 50 samples
    corpus = Corpus.from_webdataset(str(wds_dir))
    store = scored_store(corpus, seed=4)
    if backing == "memmap":
        mapped = ScoreStore.open(tmp_path / "s.npy", corpus.num_samples)
        mapped.write_range(0, store.to_numpy())
        store = mapped
    before = store.to_numpy().astype(np.float64)
    Pruner(corpus, store, ESWPPolicy(ratio=0.5, burn_in_epochs=0, anneal=0.0), tmp_path / "m",
           decay=0.25).on_epoch_end(0, 4)
    kept = ESDataset(corpus, 4, manifests=tmp_path / "m").epoch_keep(1).kept_ids
    pruned = np.setdiff1d(np.arange(corpus.num_samples), kept)
    after = store.to_numpy()
    np.testing.assert_array_equal(after[kept], before[kept].astype(np.float32))
    np.testing.assert_allclose(after[pruned], 0.75 * before[pruned] + 0.25 * before.mean(), rtol=1e-6)
    # the manifests record the scores the decision saw, before the decay
    table = pads.dataset(str(tmp_path / "m"), partitioning="hive").to_table()
    np.testing.assert_array_equal(np.sort(table["score"].to_numpy()), np.sort(before.astype(np.float32)))


def test_rewriting_removes_a_killed_writers_temporary_files(pruned):
    corpus, out = pruned
    leftover = out / "epoch=00001" / ".shard=00002.parquet.x1y2.tmp"
    leftover.write_bytes(b"half a parquet file")
    Pruner(corpus, ScoreStore(corpus.num_samples), ESWPPolicy(ratio=0.2, burn_in_epochs=0, anneal=0.0),
           out).on_epoch_end(0, 4)
    assert not leftover.exists()
    assert (out / "epoch=00001" / "_SUCCESS").exists()


def test_pruner_state_round_trips_and_refuses_another_policy(pruned, tmp_path):
    corpus, out = pruned
    policy = ESWPPolicy(ratio=0.5, burn_in_epochs=0, anneal=0.0)
    state = Pruner(corpus, ScoreStore(corpus.num_samples), policy, out).state_dict()
    Pruner(corpus, ScoreStore(corpus.num_samples), ESWPPolicy(ratio=0.5, burn_in_epochs=0, anneal=0.0),
           out).load_state_dict(state)  # the same pruner: accepted
    other = Pruner(corpus, ScoreStore(corpus.num_samples),
                   ESWPPolicy(ratio=0.3, burn_in_epochs=0, anneal=0.0), out)
    with pytest.raises(ValueError, match="checkpoint's pruner has ratio='0.5', this one ratio='0.3'"):
        other.load_state_dict(state)
    decayed = Pruner(corpus, ScoreStore(corpus.num_samples), policy, out, decay=0.1)
    with pytest.raises(ValueError, match="decay=0.0.*decay=0.1"):
        decayed.load_state_dict(state)
