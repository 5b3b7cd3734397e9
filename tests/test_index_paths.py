"""A saved index travels: its shard paths are stored relative to the index file (absolute when
the shards lie elsewhere), so it loads after the tree moves, from another working directory, from
the CLI run elsewhere; ``root=`` points it at shards moved apart from it; an index written before
(paths relative to the working directory it was built in) still loads the old way; a missing
shard says where it was looked for."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import SHARD_SIZES, payload, write_mds, write_wds
from es_stream import Corpus, ESDataset, ShardError

EXE = shutil.which("es-stream", path=str(Path(sys.executable).parent))
META = b"es_stream.corpus"


def metadata(index: Path) -> dict:
    return json.loads(pq.read_schema(index).metadata[META])


def rewrite_metadata(index: Path, edit) -> None:
    table = pq.read_table(index)
    meta = json.loads(table.schema.metadata[META])
    edit(meta)
    pq.write_table(table.replace_schema_metadata({META: json.dumps(meta)}), index)


def read_all(corpus: Corpus, key: str) -> dict[int, object]:
    """Every sample's ``key`` field by id, read through ESDataset in this process."""
    dataset = ESDataset(corpus, 8, decode=lambda s: s, collate=list, shuffle=False)
    out = {}
    for mb in dataset:
        for sid, sample in zip(mb.ids.tolist(), mb.data):
            out[sid] = sample[key]
    return out


def build_tar_tree(tree: Path, monkeypatch) -> Path:
    """``tree/shards/*.tar`` indexed by relative path from inside ``tree``, saved as
    ``tree/corpus.parquet``, as a user runs ``es-stream index shards -o corpus.parquet``."""
    write_wds(tree / "shards")
    monkeypatch.chdir(tree)
    Corpus.from_webdataset("shards").save("corpus.parquet")
    return tree / "corpus.parquet"


def check_tar_samples(corpus: Corpus) -> None:
    got = read_all(corpus, "bin")
    assert sorted(got) == list(range(sum(SHARD_SIZES)))
    assert all(got[i] == payload(i) for i in got)


def test_tar_index_moved_with_its_shards_loads_from_anywhere(tmp_path, monkeypatch):
    index = build_tar_tree(tmp_path / "a", monkeypatch)
    names = [s["name"] for s in metadata(index)["shards"]]
    assert names == [f"shards/train-{i:06d}.tar" for i in range(len(SHARD_SIZES))]
    shutil.move(tmp_path / "a", tmp_path / "b")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    corpus = Corpus.load(tmp_path / "b" / "corpus.parquet")
    assert corpus.shards[0].name == str(tmp_path / "b" / "shards" / "train-000000.tar")
    check_tar_samples(corpus)
    # and by a path relative to the working directory
    monkeypatch.chdir(tmp_path)
    check_tar_samples(Corpus.load("b/corpus.parquet"))


def test_shards_outside_the_index_directory_are_stored_absolute(tmp_path, monkeypatch):
    write_wds(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    Corpus.from_webdataset("data").save("indexes/c.parquet")
    names = [s["name"] for s in metadata(tmp_path / "indexes" / "c.parquet")["shards"]]
    assert names[0] == str(tmp_path / "data" / "train-000000.tar")
    shutil.move(tmp_path / "indexes" / "c.parquet", tmp_path / "c.parquet")  # the file alone
    monkeypatch.chdir(tmp_path / "indexes")
    check_tar_samples(Corpus.load(tmp_path / "c.parquet"))


def test_root_override_and_the_missing_shard_message(tmp_path, monkeypatch):
    index = build_tar_tree(tmp_path / "a", monkeypatch)
    shutil.move(index, tmp_path / "alone.parquet")  # the index moved apart from its shards
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ShardError) as err:
        Corpus.load(tmp_path / "alone.parquet")
    message = str(err.value)
    assert str(tmp_path / "shards" / "train-000000.tar") in message  # where it looked
    assert "index file's directory" in message and "root=" in message  # the rule, the fix
    check_tar_samples(Corpus.load(tmp_path / "alone.parquet", root=tmp_path / "a"))
    with pytest.raises(NotADirectoryError, match="root"):
        Corpus.load(tmp_path / "alone.parquet", root=tmp_path / "nowhere")


def test_an_index_written_before_loads_relative_to_the_working_directory(tmp_path, monkeypatch):
    index = build_tar_tree(tmp_path / "a", monkeypatch)
    rewrite_metadata(index, lambda meta: meta.pop("paths"))  # as earlier versions wrote it
    shutil.move(index, tmp_path / "a" / "sub.parquet")
    index = tmp_path / "a" / "sub.parquet"
    os.makedirs(tmp_path / "a" / "idx")
    shutil.move(index, tmp_path / "a" / "idx" / "old.parquet")
    index = tmp_path / "a" / "idx" / "old.parquet"
    check_tar_samples(Corpus.load(index))  # from the directory it was built in: as before
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ShardError, match="predates") as err:
        Corpus.load(index)
    assert str(tmp_path / "shards" / "train-000000.tar") in str(err.value)
    check_tar_samples(Corpus.load(index, root=tmp_path / "a"))


def test_mds_index_moved_with_its_shards_loads_from_anywhere(tmp_path, monkeypatch):
    pytest.importorskip("streaming")
    write_mds(tmp_path / "a" / "mds")
    monkeypatch.chdir(tmp_path / "a")
    Corpus.from_mds("mds").save("corpus.parquet")
    assert metadata(tmp_path / "a" / "corpus.parquet")["mds"]["local"] == "mds"
    shutil.move(tmp_path / "a", tmp_path / "b")
    monkeypatch.chdir(tmp_path)
    corpus = Corpus.load(tmp_path / "b" / "corpus.parquet")
    assert corpus.mds.local == str(tmp_path / "b" / "mds")
    got = read_all(corpus, "idx")
    assert [int(got[i]) for i in range(corpus.num_samples)] == list(range(corpus.num_samples))
    # the whole tree apart from the index: the missing shard names where it looked
    shutil.move(tmp_path / "b" / "corpus.parquet", tmp_path / "alone.parquet")
    with pytest.raises(ShardError, match="looked for .*mds"):
        Corpus.load(tmp_path / "alone.parquet")
    np.testing.assert_array_equal(
        Corpus.load(tmp_path / "alone.parquet", root=tmp_path / "b").shard_counts,
        corpus.shard_counts)
    # an index saved inside the MDS directory itself stores it as "."
    corpus.save(tmp_path / "b" / "mds" / "inside.parquet")
    assert metadata(tmp_path / "b" / "mds" / "inside.parquet")["mds"]["local"] == "."
    shutil.move(tmp_path / "b" / "mds", tmp_path / "c")
    assert Corpus.load(tmp_path / "c" / "inside.parquet").num_samples == corpus.num_samples


def test_cli_scores_an_index_given_by_absolute_path_from_another_directory(tmp_path, monkeypatch):
    index = build_tar_tree(tmp_path / "a", monkeypatch)
    (tmp_path / "scorer").mkdir()
    (tmp_path / "scorer" / "clsmodel.py").write_text(
        "from es_stream import Scorer\n\n"
        "def factory():\n"
        "    return Scorer(score_fn=lambda batch: batch['cls'].float() + 1)\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(tmp_path / "scorer"), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    out = elsewhere / "scores.npy"
    result = subprocess.run([EXE, "score", "--corpus", str(index), "--model", "clsmodel:factory",
                             "--out", str(out), "--meta-batch-size", "8", "--workers", "0",
                             "--no-progress"], cwd=elsewhere, env=env, capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    np.testing.assert_array_equal(np.load(out), np.arange(sum(SHARD_SIZES)) % 10 + 1)


def test_index_store_and_manifests_moved_together_still_train(tmp_path, monkeypatch):
    """The whole tree a run leaves (index, score store, manifests), moved and used from another
    working directory: the store opens for the same corpus and the pruned epoch reads exactly
    what its manifest keeps."""
    import torch

    from es_stream import ESWPPolicy, Pruner, ScoreStore

    index = build_tar_tree(tmp_path / "a", monkeypatch)
    corpus = Corpus.load(index)
    store = ScoreStore.open("scores.npy", corpus.num_samples, fingerprint=corpus.fingerprint)
    store.scatter(torch.arange(corpus.num_samples),
                  torch.rand(corpus.num_samples, generator=torch.Generator().manual_seed(0)))
    store.flush()
    Pruner(corpus, store, ESWPPolicy(ratio=0.5, burn_in_epochs=0, anneal=0.0),
           "manifests").on_epoch_end(0, 3)
    del store
    shutil.move(tmp_path / "a", tmp_path / "b")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    moved = Corpus.load(tmp_path / "b" / "corpus.parquet")
    reopened = ScoreStore.open(tmp_path / "b" / "scores.npy", moved.num_samples,
                               fingerprint=moved.fingerprint)
    assert reopened.scored_range(0, moved.num_samples).all()
    ds = ESDataset(moved, 8, manifests=tmp_path / "b" / "manifests", decode=lambda s: s,
                   collate=list)
    ds.set_epoch(1)
    got = sorted(i for mb in ds for i in mb.ids.tolist())
    import pyarrow.dataset as pads

    table = pads.dataset(str(tmp_path / "b" / "manifests" / "epoch=00001")).to_table()
    kept = np.asarray(table.column("id"))[np.asarray(table.column("keep"))]
    assert 0 < len(got) < moved.num_samples
    assert got == sorted(kept.tolist())
