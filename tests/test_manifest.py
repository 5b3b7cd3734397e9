"""Pruning manifests: layout, metadata, atomicity, readers (pyarrow, DuckDB), and the stream
skipping pruned samples without reading them."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
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
    # the same run (same policy) writes its next epoch with new scores
    Pruner(corpus, scored_store(corpus, seed=1), ESWPPolicy(ratio=0.5, burn_in_epochs=0, anneal=0.0), out).on_epoch_end(1, 4)
    table = pads.dataset(str(out), partitioning="hive").to_table()
    assert table.num_rows == 2 * corpus.num_samples
    assert sorted(set(table.column("epoch").to_pylist())) == [1, 2]
    duckdb = pytest.importorskip("duckdb")
    rows = duckdb.sql(f"select epoch, count(*), sum(keep::int) from read_parquet('{out}/*/*.parquet', "
                      "hive_partitioning=true) group by epoch order by epoch").fetchall()
    assert [(int(e), n) for e, n, _ in rows] == [(1, 50), (2, 50)]
    assert rows[1][2] == 25


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
    Pruner(corpus, scored_store(corpus, seed=1), ESWPPolicy(ratio=0.2, burn_in_epochs=0, anneal=0.0),
           out, overwrite=True).on_epoch_end(0, 4)
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
    Pruner(corpus, scored_store(corpus, seed=1), ESWPPolicy(ratio=0.5, burn_in_epochs=0, anneal=0.0),
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
                   ESWPPolicy(ratio=0.3, burn_in_epochs=0, anneal=0.0), out, overwrite=True)
    with pytest.raises(ValueError, match="checkpoint's pruner has ratio='0.5', this one ratio='0.3'"):
        other.load_state_dict(state)
    decayed = Pruner(corpus, ScoreStore(corpus.num_samples), policy, out, decay=0.1,
                     overwrite=True)
    with pytest.raises(ValueError, match="decay=0.0.*decay=0.1"):
        decayed.load_state_dict(state)


# ---------------------------------------------------------------- manifests checked, not trusted
def rewrite(path, edit) -> None:
    """Rewrite one manifest file with pyarrow, as a user's own tool would: ``edit(table)``
    returns the new table; the file's key-value metadata is kept."""
    table = pq.read_table(path)
    new = edit(table)
    pq.write_table(new.replace_schema_metadata(table.schema.metadata), path)


def test_reordered_manifest_keeps_the_same_ids_and_weights(wds_dir, tmp_path):
    corpus = Corpus.from_webdataset(str(wds_dir))
    out = tmp_path / "ib"
    Pruner(corpus, scored_store(corpus, seed=5), InfoBatchPolicy(ratio=0.5, anneal=0.0),
           out).on_epoch_end(0, 4)
    before = ESDataset(corpus, 4, manifests=out).epoch_keep(1)
    assert before.weights is not None  # InfoBatch: some kept samples weigh 2
    perm = np.random.default_rng(0).permutation(20)
    path = out / "epoch=00001" / "shard=00003.parquet"  # 20 samples
    rewrite(path, lambda t: t.take(perm))
    shuffled = pq.read_table(path).column("keep").to_numpy()
    assert (shuffled != pq.read_table(path).take(np.argsort(perm)).column("keep").to_numpy()).any()
    after = ESDataset(corpus, 4, manifests=out).epoch_keep(1)
    np.testing.assert_array_equal(after.kept_ids, before.kept_ids)
    np.testing.assert_array_equal(after.weights, before.weights)
    ds = ESDataset(corpus, 4, manifests=out)
    ds.set_epoch(1)
    assert sorted(torch.cat([mb.ids for mb in ds]).tolist()) == before.kept_ids.tolist()


@pytest.mark.parametrize("column,type_", [("keep", "string"), ("keep", "int64"), ("id", "string"),
                                          ("weight", "string"), ("score", "string")])
def test_a_column_of_the_wrong_type_is_refused(pruned, column, type_):
    corpus, out = pruned
    path = out / "epoch=00001" / "shard=00001.parquet"
    if column == "keep" and type_ == "string":  # the strings "true"/"false": "false" is truthy
        rewrite(path, lambda t: t.set_column(2, "keep", pa.array(
            ["true" if k else "false" for k in t.column("keep").to_pylist()])))
    else:
        rewrite(path, lambda t: t.set_column(t.schema.get_field_index(column), column,
                                             t.column(column).cast(type_)))
    with pytest.raises(ManifestError, match=rf"shard=00001.parquet: column '{column}' is {type_}, "
                                            "expected"):
        ESDataset(corpus, 4, manifests=out).plan(1)


@pytest.mark.parametrize("column", ["id", "keep", "weight"])
def test_a_missing_column_is_named(pruned, column):
    corpus, out = pruned
    path = out / "epoch=00001" / "shard=00002.parquet"
    rewrite(path, lambda t: t.drop_columns([column]))
    with pytest.raises(ManifestError, match=rf"shard=00002.parquet: no column '{column}'"):
        ESDataset(corpus, 4, manifests=out).plan(1)


def test_a_file_that_is_not_parquet_is_named(pruned):
    corpus, out = pruned
    (out / "epoch=00001" / "shard=00004.parquet").write_text("id,keep\n41,true\n")
    with pytest.raises(ManifestError, match=r"shard=00004.parquet: not a readable Parquet file"):
        ESDataset(corpus, 4, manifests=out).plan(1)


def test_an_epoch_that_keeps_nothing_is_refused_naming_it(pruned):
    corpus, out = pruned
    for path in sorted((out / "epoch=00001").glob("*.parquet")):
        rewrite(path, lambda t: t.set_column(2, "keep", pa.array(np.zeros(t.num_rows, bool))))
    with pytest.raises(ManifestError, match=r"epoch=00001: epoch 1 keeps no sample"):
        ESDataset(corpus, 4, manifests=out).plan(1)


@pytest.mark.parametrize("ids,message", [
    (lambda ids: np.r_[ids[0], ids[:-1]], r"repeats id 7 and lacks id 19"),
    (lambda ids: np.r_[ids[:-1], 50], r"holds id 50, outside shard 1's ids \[7, 20\)"),
    (lambda ids: ids - 7, r"holds id 0, outside shard 1's ids \[7, 20\)"),  # a shard's own positions
])
def test_ids_must_be_the_shards_own_each_once(pruned, ids, message):
    corpus, out = pruned
    path = out / "epoch=00001" / "shard=00001.parquet"
    rewrite(path, lambda t: t.set_column(1, "id", pa.array(ids(t.column("id").to_numpy()))))
    with pytest.raises(ManifestError, match=rf"shard=00001.parquet: column 'id' {message}"):
        ESDataset(corpus, 4, manifests=out).plan(1)


@pytest.mark.parametrize("bad", [np.nan, 0.0, -1.0, np.inf])
def test_a_kept_samples_weight_must_be_finite_and_positive(wds_dir, tmp_path, bad):
    corpus = Corpus.from_webdataset(str(wds_dir))
    out = tmp_path / "ib"
    Pruner(corpus, scored_store(corpus, seed=5), InfoBatchPolicy(ratio=0.5, anneal=0.0),
           out).on_epoch_end(0, 4)
    path = out / "epoch=00001" / "shard=00003.parquet"
    table = pq.read_table(path)
    row = int(np.flatnonzero(table.column("keep").to_numpy(zero_copy_only=False))[0])
    # shard 3's first id is 7 + 13 + 1 = 21
    weight = table.column("weight").to_numpy().copy()
    weight[row] = bad
    rewrite(path, lambda t: t.set_column(4, "weight", pa.array(weight)))
    with pytest.raises(ManifestError, match=rf"shard=00003.parquet: column 'weight' is {bad} for "
                                            rf"kept id {21 + row}"):
        ESDataset(corpus, 4, manifests=out).plan(1)


def test_a_null_keep_is_refused(pruned):
    corpus, out = pruned
    path = out / "epoch=00001" / "shard=00000.parquet"
    rewrite(path, lambda t: t.set_column(2, "keep", pa.array([None] + t.column("keep").to_pylist()[1:],
                                                             pa.bool_())))
    with pytest.raises(ManifestError, match=r"shard=00000.parquet: column 'keep' has 1 null value"):
        ESDataset(corpus, 4, manifests=out).plan(1)


# ---------------------------------------------------------------- concurrent writers
def test_an_epoch_mixing_two_writes_is_refused_old_manifests_still_read(pruned):
    corpus, out = pruned
    epoch = out / "epoch=00001"
    old = (epoch / "shard=00002.parquet").read_bytes()
    Pruner(corpus, scored_store(corpus, seed=9), ESWPPolicy(ratio=0.5, burn_in_epochs=0, anneal=0.0),
           out).on_epoch_end(0, 4)
    new = (epoch / "shard=00002.parquet").read_bytes()
    (epoch / "shard=00002.parquet").write_bytes(old)  # a file of the first write, _SUCCESS of the second
    with pytest.raises(ManifestError, match=r"shard=00002.parquet: written by write '[0-9a-f]+', "
                                            r"_SUCCESS marks write '[0-9a-f]+'"):
        ESDataset(corpus, 4, manifests=out).plan(1)
    # manifests of es-stream versions without write ids (no id in the files nor in _SUCCESS) read
    (epoch / "shard=00002.parquet").write_bytes(new)
    want = ESDataset(corpus, 4, manifests=out).epoch_keep(1).kept_ids
    for path in sorted(epoch.glob("*.parquet")):
        table = pq.read_table(path)
        meta = {k: v for k, v in table.schema.metadata.items() if k != b"write_id"}
        pq.write_table(table.replace_schema_metadata(meta), path)
    (epoch / "_SUCCESS").write_text("es-stream 0.1.0\n")
    np.testing.assert_array_equal(ESDataset(corpus, 4, manifests=out).epoch_keep(1).kept_ids, want)


def _write_epoch(corpus_dir: str, out: str, seed: int, ratio: float, hold, go, result) -> None:
    """A pruner in its own process; with ``hold`` set it pauses after its second shard file until
    ``go`` (so another writer can try the same epoch meanwhile)."""
    import es_stream.pruner as pruner_module

    if hold is not None:
        real, written = pruner_module.write_shard, [0]

        def slow_write_shard(*args, **kwargs):
            real(*args, **kwargs)
            written[0] += 1
            if written[0] == 2:
                hold.set()
                go.wait(60)

        pruner_module.write_shard = slow_write_shard
    corpus = Corpus.from_webdataset(corpus_dir)
    try:
        Pruner(corpus, scored_store(corpus, seed), ESWPPolicy(ratio=ratio, burn_in_epochs=0, anneal=0.0),
               out).write(1, 4)
        result.put((seed, "ok"))
    except Exception as exc:  # noqa: BLE001 - reported to the test
        result.put((seed, f"{type(exc).__name__}: {exc}"))


def test_a_second_writer_of_the_same_epoch_is_refused(wds_dir, tmp_path):
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    hold, go, result = ctx.Event(), ctx.Event(), ctx.Queue()
    out = tmp_path / "m"
    first = ctx.Process(target=_write_epoch, args=(str(wds_dir), str(out), 1, 0.5, hold, go, result))
    first.start()
    try:
        assert hold.wait(120), "the first writer never reached its second shard"
        # the same run (other scores): the run record lets it in, the epoch's lock does not
        second = ctx.Process(target=_write_epoch,
                             args=(str(wds_dir), str(out), 2, 0.5, None, None, result))
        second.start()
        second.join(120)
        refused = result.get(timeout=10)
    finally:
        go.set()
        first.join(120)
    assert refused[0] == 2 and refused[1].startswith("ManifestError: ")
    assert "epoch=00001: another writer" in refused[1], refused[1]
    assert result.get(timeout=10) == (1, "ok")
    # the epoch is exactly the first writer's decision, byte for byte as a writer alone writes it
    alone = tmp_path / "alone"
    corpus = Corpus.from_webdataset(str(wds_dir))
    Pruner(corpus, scored_store(corpus, 1), ESWPPolicy(ratio=0.5, burn_in_epochs=0, anneal=0.0),
           alone).write(1, 4)
    assert sorted(os.listdir(out / "epoch=00001")) == sorted(os.listdir(alone / "epoch=00001"))
    for name in os.listdir(alone / "epoch=00001"):
        assert (out / "epoch=00001" / name).read_bytes() == (alone / "epoch=00001" / name).read_bytes()
    np.testing.assert_array_equal(ESDataset(corpus, 4, manifests=out).epoch_keep(1).kept_ids,
                                  ESDataset(corpus, 4, manifests=alone).epoch_keep(1).kept_ids)


def test_a_shard_file_that_cannot_be_written_fails_the_write_and_publishes_nothing(wds_dir, tmp_path):
    """Shard files are written by a pool of threads: a failure in one of them still reaches the
    caller, after the others finished, and ``_SUCCESS`` is never written."""
    corpus = Corpus.from_webdataset(str(wds_dir))
    out = tmp_path / "manifests"
    from pathlib import Path

    from es_stream.manifest import shard_file

    blocked = Path(shard_file(out, 1, 1))
    blocked.mkdir(parents=True)  # a directory where shard 1's file goes: its rename fails
    pruner = Pruner(corpus, scored_store(corpus), ESWPPolicy(ratio=0.5, burn_in_epochs=0,
                                                              anneal=0.0), out)
    with pytest.raises(OSError):
        pruner.write(1, 4)
    assert not (out / "epoch=00001" / "_SUCCESS").exists()
    assert blocked.is_dir() and not list(blocked.iterdir())  # nothing of ours was lost there
    assert not [p for p in (out / "epoch=00001").iterdir() if p.name.endswith(".tmp")]
