"""The bytes served are the bytes indexed: each shard's size, mtime and content check are
recorded in the index and verified when a reader opens the shard, so a shard replaced after
indexing — between epochs, or by ``es-stream compact --overwrite`` under a running reader — is a
StaleIndexError naming it, never other samples under the old ids; and edited index values are an
IndexFileError naming the column, row and file. Real shards (webdataset's TarWriter, streaming's
MDSWriter), real index files, real DataLoader workers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds

from es_stream import Corpus, ESDataset, loader
from es_stream.errors import IndexFileError, StaleIndexError
from es_stream.index_file import META_KEY

N, SIZE = 24, 300  # equal-size samples: a replaced shard keeps the layout exactly


def write_equal(directory: Path, tag: bytes) -> list[str]:
    """3 tar shards of 8 samples, every payload SIZE bytes filled with ``tag`` and the id."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(3):
        path = str(directory / f"eq-{s:06d}.tar")
        with wds.TarWriter(path) as w:
            for i in range(8 * s, 8 * s + 8):
                w.tarstream.mtime = 0  # equal headers in both versions: only payloads differ
                w.write({"__key__": f"k{i:04d}", "bin": (tag + b"%04d" % i).ljust(SIZE, b".")})
        paths.append(path)
    return paths


def replace_keeping_mtime(path: str, new: str) -> None:
    """Put ``new``'s bytes at ``path`` (a rename, as a sync tool does), with ``path``'s mtime."""
    st = os.stat(path)
    os.replace(new, path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def read_epoch(ds: ESDataset, workers: int) -> dict[int, bytes]:
    got = {}
    for mb in loader(ds, num_workers=workers, persistent_workers=False):
        for sid, sample in zip(mb.ids.tolist(), mb.data):
            got[sid] = sample["bin"]
    return got


@pytest.mark.parametrize("workers", [0, 2])
def test_tar_shard_replaced_between_epochs_is_stale(tmp_path, workers):
    paths = write_equal(tmp_path / "a", b"A")
    write_equal(tmp_path / "b", b"B")
    Corpus.from_webdataset(paths).save(tmp_path / "idx.parquet")
    corpus = Corpus.load(tmp_path / "idx.parquet")
    ds = ESDataset(corpus, 8, decode=lambda s: s, collate=list, shuffle=False)
    first = read_epoch(ds, workers)
    assert sorted(first) == list(range(N)) and all(b.startswith(b"A") for b in first.values())
    assert os.path.getsize(paths[1]) == os.path.getsize(tmp_path / "b" / "eq-000001.tar")
    replace_keeping_mtime(paths[1], str(tmp_path / "b" / "eq-000001.tar"))
    ds.set_epoch(1)
    with pytest.raises(StaleIndexError, match=r"eq-000001\.tar: shard changed since it was "
                                              r"indexed \(same size and mtime, different content"):
        read_epoch(ds, workers)


def test_mds_shard_replaced_between_epochs_is_stale(tmp_path):
    from streaming import MDSWriter

    def write(out: Path, tag: bytes) -> None:
        with MDSWriter(out=str(out), columns={"bin": "bytes", "idx": "int"},
                       size_limit=2 << 10) as w:
            for i in range(N):
                w.write({"bin": (tag + b"%04d" % i).ljust(SIZE, b"."), "idx": i})

    write(tmp_path / "a", b"A")
    write(tmp_path / "b", b"B")
    Corpus.from_mds(tmp_path / "a").save(tmp_path / "idx.parquet")
    corpus = Corpus.load(tmp_path / "idx.parquet")
    assert all(s.check is not None for s in corpus.shards)
    ds = ESDataset(corpus, 8, decode=lambda s: s, collate=list, shuffle=False)
    assert all(b.startswith(b"A") for b in read_epoch(ds, 0).values())
    name = corpus.shards[1].name
    replace_keeping_mtime(str(tmp_path / "a" / name), str(tmp_path / "b" / name))
    ds.set_epoch(1)
    with pytest.raises(StaleIndexError, match=f"{name}: shard changed.*different content"):
        read_epoch(ds, 0)


def test_index_without_content_checks_still_loads(tmp_path):
    """An index written before the content check: loads, reads, and a changed mtime is still
    refused at load, as before."""
    paths = write_equal(tmp_path / "a", b"A")
    path = tmp_path / "idx.parquet"
    Corpus.from_webdataset(paths).save(path)
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[META_KEY])
    for shard in meta["shards"]:
        del shard["check"]
    pq.write_table(table.replace_schema_metadata({META_KEY: json.dumps(meta)}), path)
    corpus = Corpus.load(path)
    assert [s.check for s in corpus.shards] == [None] * 3
    ds = ESDataset(corpus, 8, decode=lambda s: s, collate=list, shuffle=False)
    assert sorted(read_epoch(ds, 0)) == list(range(N))
    os.utime(paths[2], ns=(1, 1))
    with pytest.raises(StaleIndexError, match="eq-000002.tar: shard changed"):
        Corpus.load(path)


def rewrite_column(path: Path, column: str, row: int, item: int | None, value: int) -> None:
    table = pq.read_table(path)
    values = table.column(column).to_pylist()
    if item is None:
        values[row] = value
    else:
        values[row][item] = value
    at = table.column_names.index(column)
    table = table.set_column(at, column, pa.array(values, table.schema.field(column).type))
    pq.write_table(table, path)


@pytest.mark.parametrize("column,row,item,value,why", [
    ("member_size", 5, 0, 1 << 36, "runs past the end of its sample"),
    ("member_size", 5, 0, -1, "is negative"),
    ("offset", 3, None, -512, "is negative"),
    ("offset", 9, None, 512, "overlaps the sample before it"),
    ("length", 7, None, 1 << 40, "past the end of its shard"),
    ("member_offset", 2, 0, 0, "inside the sample's first header"),
])
def test_edited_index_values_are_named(tmp_path, column, row, item, value, why):
    paths = write_equal(tmp_path / "a", b"A")
    path = tmp_path / "idx.parquet"
    Corpus.from_webdataset(paths).save(path)
    rewrite_column(path, column, row, item, value)
    with pytest.raises(IndexFileError) as info:
        Corpus.load(path)
    text = str(info.value)
    assert text.startswith(f"{path}: column {column!r} row {row} ")
    assert why in text and "es-stream index SHARDS -o" in text


def test_mds_index_json_hashes_are_part_of_the_identity(tmp_path):
    """An MDS dataset whose index.json now records other shard hashes (same names, counts and
    sizes) is not the one indexed: loading the index raises StaleIndexError naming index.json."""
    from streaming import MDSWriter

    for tag in (b"A", b"B"):
        with MDSWriter(out=str(tmp_path / tag.decode()), columns={"bin": "bytes"},
                       hashes=["sha1"], size_limit=2 << 10) as w:
            for i in range(N):
                w.write({"bin": (tag + b"%04d" % i).ljust(SIZE, b".")})
    Corpus.from_mds(tmp_path / "A").save(tmp_path / "idx.parquet")
    a, b = (json.loads((tmp_path / d / "index.json").read_text()) for d in "AB")
    assert [s["raw_data"]["bytes"] for s in a["shards"]] == \
        [s["raw_data"]["bytes"] for s in b["shards"]]
    (tmp_path / "A" / "index.json").write_text(json.dumps(b))
    with pytest.raises(StaleIndexError, match=r"A/index.json: shard shard.00000.mds changed"):
        Corpus.load(tmp_path / "idx.parquet")


def test_content_check_on_request_catches_an_in_place_rewrite_that_kept_its_mtime(tmp_path):
    """The same file (same inode), rewritten with other bytes of the same size and its mtime
    put back: size, mtime and file identity all agree; check="content" still finds it."""
    paths = write_equal(tmp_path / "a", b"A")
    write_equal(tmp_path / "b", b"B")
    Corpus.from_webdataset(paths).save(tmp_path / "idx.parquet")
    st = os.stat(paths[1])
    with open(paths[1], "r+b") as f:
        f.write((tmp_path / "b" / "eq-000001.tar").read_bytes())
    os.utime(paths[1], ns=(st.st_atime_ns, st.st_mtime_ns))
    Corpus.load(tmp_path / "idx.parquet")  # by stat alone: not seen
    with pytest.raises(StaleIndexError, match=r"eq-000001\.tar: shard changed since it was "
                                              r"indexed \(same size and mtime, different content"):
        Corpus.load(tmp_path / "idx.parquet", check="content")
