"""The README's object-store and mixing blocks run as written: the first against moto's S3 API
on 127.0.0.1 (bucket and shards made here), the second on two small real corpora."""

from __future__ import annotations

import io

import numpy as np
import pytest
import webdataset as wds

from es_stream import Corpus
from test_readme import readme_block


def write_corpus(directory, n: int, seed: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with wds.ShardWriter(str(directory / "train-%06d.tar"), maxcount=200, verbose=0) as w:
        for i in range(n):
            buf = io.BytesIO()
            np.save(buf, rng.normal(size=8).astype(np.float32))
            w.write({"__key__": f"{i:06d}", "npy": buf.getvalue(), "cls": i % 3})
    Corpus.from_webdataset(str(directory)).save(directory / "corpus.parquet")


def test_object_store_block_reads_every_sample_from_s3(tmp_path, monkeypatch):
    pytest.importorskip("obstore")
    pytest.importorskip("moto.server")
    from servers import S3Server

    write_corpus(tmp_path, 500, seed=0)
    monkeypatch.chdir(tmp_path)
    with S3Server() as server:
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        urls = server.upload_dir("my-bucket", tmp_path, prefix="train")
        assert sum(u.endswith(".tar") for u in urls) == 3
        scope: dict = {}
        exec(compile(readme_block("object-store"), "README.md", "exec"), scope)
    assert all(s.name.startswith("s3://my-bucket/train/") for s in scope["corpus"].shards)
    assert scope["seen"] == 500


def test_object_store_mds_block_reads_every_sample_by_range(tmp_path, monkeypatch):
    pytest.importorskip("obstore")
    pytest.importorskip("moto.server")
    pytest.importorskip("streaming")
    from conftest import write_mds
    from servers import S3Server

    write_mds(tmp_path / "mds", n=300)
    monkeypatch.chdir(tmp_path)
    with S3Server() as server:
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        server.upload_dir("my-bucket", tmp_path / "mds", prefix="mds")
        scope: dict = {}
        exec(compile(readme_block("object-store-mds"), "README.md", "exec"), scope)
        listed = server.client().list_objects_v2(Bucket="my-bucket", Prefix="mds/")["Contents"]
    assert "mds/es-stream-index.parquet" in {o["Key"] for o in listed}
    assert scope["corpus"].index_path == "s3://my-bucket/mds/es-stream-index.parquet"
    assert scope["corpus"].mds.remote == "s3://my-bucket/mds"
    assert scope["seen"] == 300


def test_mixing_block_gives_each_corpus_its_share(tmp_path, monkeypatch):
    write_corpus(tmp_path / "web", 1200, seed=1)
    write_corpus(tmp_path / "code", 800, seed=2)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(readme_block("mixing"), "README.md", "exec"), scope)
    assert scope["counts"] == [700, 300]
