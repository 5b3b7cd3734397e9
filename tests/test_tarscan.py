"""Tar shards that are cut short, not tar at all, or named in bytes that are not UTF-8.

Shards are written by webdataset's TarWriter (conftest.write_wds) and cut with os.truncate at
the points a crash or a partial copy leaves them: on a member boundary inside a sample, on a
sample boundary, inside a payload, inside a header, and right after the last member.
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import webdataset as wds

from es_stream import Corpus, ESDataset, ShardError, loader
from conftest import payload, write_wds

EXE = shutil.which("es-stream", path=str(Path(sys.executable).parent))


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([EXE, *args], capture_output=True, text=True)


SIZES = (6, 5)  # shard 0 is the one cut; shard 1 stays whole
K = 3  # the sample of shard 0 the cuts fall in or before


def cut_point(corpus: Corpus, where: str) -> tuple[int, int]:
    """(byte to cut shard 0 at, index of the last sample a scan still sees the start of)."""
    t = corpus.tar
    first = int(t.member_ptr[K])  # sample K's first member
    payload_start = int(t.offsets[K] + t.member_offset[first])
    if where == "member":  # after sample K's first file: K lost its other file
        return payload_start + -(-int(t.member_size[first]) // 512) * 512, K
    if where == "sample":  # between samples K-1 and K
        return int(t.offsets[K]), K - 1
    if where == "payload":  # 10 bytes into sample K's first payload
        return payload_start + 10, K
    if where == "header":  # inside sample K's first header
        return int(t.offsets[K]) + 100, K - 1
    last = SIZES[0] - 1  # "end": right after the last member, no end-of-archive marker
    return int(t.offsets[last] + t.lengths[last]), last


CUTS = ["member", "sample", "payload", "header", "end"]


@pytest.fixture
def cut_shards(tmp_path):
    def make(where: str) -> tuple[list[str], int]:
        paths = write_wds(tmp_path / "wds", sizes=SIZES)
        cut, last = cut_point(Corpus.from_webdataset([paths[0]]), where)
        os.truncate(paths[0], cut)
        return paths, last
    return make


def urls_of(paths: list[str], source: str) -> list[str]:
    return paths if source == "local" else [f"pipe:cat {p}" for p in paths]


@pytest.mark.parametrize("source", ["local", "pipe"])
@pytest.mark.parametrize("where", CUTS)
def test_truncated_shard_is_refused_naming_it(cut_shards, where, source):
    paths, last = cut_shards(where)
    with pytest.raises(ShardError, match=rf"train-000000\.tar: truncated: .*sample "
                       rf"'sample{last:06d}' may be incomplete.*allow_truncated=True"):
        Corpus.from_webdataset(urls_of(paths, source))


@pytest.mark.parametrize("source", ["local", "pipe"])
def test_end_marker_needs_one_whole_zero_block(tmp_path, source):
    paths = write_wds(tmp_path / "wds", sizes=(4,))
    whole = Corpus.from_webdataset(paths)
    end = int(whole.tar.offsets[-1] + whole.tar.lengths[-1])
    os.truncate(paths[0], end + 512)  # the second zero block and the record padding cut: no loss
    assert Corpus.from_webdataset(urls_of(paths, source)).num_samples == 4
    os.truncate(paths[0], end + 511)  # not even one whole zero block: cut
    with pytest.raises(ShardError, match="train-000000.tar: truncated: no end-of-archive marker"):
        Corpus.from_webdataset(urls_of(paths, source))


@pytest.mark.parametrize("source", ["local", "pipe"])
@pytest.mark.parametrize("where", CUTS)
def test_allow_truncated_drops_the_last_sample_and_says_so(cut_shards, tmp_path, where, source):
    paths, last = cut_shards(where)
    urls = urls_of(paths, source)
    with pytest.warns(UserWarning, match=rf"train-000000\.tar: truncated: .*dropped its last "
                      rf"sample 'sample{last:06d}'"):
        corpus = Corpus.from_webdataset(urls, allow_truncated=True)
    kept = [f"sample{i:06d}" for i in range(last)]
    later = [f"sample{i:06d}" for i in range(SIZES[0], sum(SIZES))]
    assert corpus.tar.keys.to_pylist() == kept + later
    assert corpus.truncated == {urls[0]: 1}  # the whole shard 1 is not listed
    assert [s.num_samples for s in corpus.shards] == [last, SIZES[1]]
    corpus.save(tmp_path / "corpus.parquet")
    assert Corpus.load(tmp_path / "corpus.parquet").truncated == {urls[0]: 1}
    # every sample kept reads back whole, through real workers
    batches = list(loader(ESDataset(corpus, 4), num_workers=2, persistent_workers=False))
    seen = {}
    for mb in batches:
        for i, key, data in zip(mb.ids.tolist(), mb.data["__key__"], mb.data["bin"]):
            seen[key] = data
            original = int(key[len("sample"):])
            assert data == payload(original) and i == corpus.tar.keys.to_pylist().index(key)
    assert sorted(seen) == kept + later


def test_allow_truncated_with_no_whole_sample_keeps_the_shard_empty(tmp_path):
    paths = write_wds(tmp_path / "wds", sizes=(3, 2))
    t = Corpus.from_webdataset([paths[0]]).tar
    os.truncate(paths[0], int(t.offsets[0] + t.member_offset[0]) + 5)  # inside the first payload
    with pytest.warns(UserWarning, match="dropped its last sample 'sample000000'"):
        corpus = Corpus.from_webdataset(paths, allow_truncated=True)
    assert corpus.truncated == {paths[0]: 1}
    assert corpus.tar.keys.to_pylist() == ["sample000003", "sample000004"]


def test_index_written_before_the_truncated_field_still_loads(tmp_path):
    import json

    import pyarrow.parquet as pq

    paths = write_wds(tmp_path / "wds", sizes=(3,))
    Corpus.from_webdataset(paths).save(tmp_path / "new.parquet")
    table = pq.read_table(tmp_path / "new.parquet")
    meta = json.loads(table.schema.metadata[b"es_stream.corpus"])
    for shard in meta["shards"]:
        shard.pop("dropped", None)  # as es-stream wrote it before truncated shards could be kept
    pq.write_table(table.replace_schema_metadata({b"es_stream.corpus": json.dumps(meta)}),
                   tmp_path / "old.parquet")
    old = Corpus.load(tmp_path / "old.parquet")
    assert old.truncated == {} and old.num_samples == 3


def test_cli_index_allow_truncated(cut_shards, tmp_path):
    paths, last = cut_shards("member")
    out = tmp_path / "corpus.parquet"
    refused = run("index", *paths, "-o", str(out))
    assert refused.returncode == 1 and "train-000000.tar: truncated" in refused.stderr
    assert "--allow-truncated" in refused.stderr and not out.exists()
    accepted = run("index", *paths, "-o", str(out), "--allow-truncated")
    assert accepted.returncode == 0, accepted.stderr
    assert f"dropped its last sample 'sample{last:06d}'" in accepted.stderr
    assert Corpus.load(out).truncated == {paths[0]: 1}


# ------------------------------------------------------------------- not a tar shard at all
@pytest.mark.parametrize("source", ["local", "pipe"])
@pytest.mark.parametrize("kind", ["gzip", "zip"])
def test_compressed_or_zip_file_is_named_as_such(tmp_path, kind, source):
    tar = write_wds(tmp_path / "wds", sizes=(3,))[0]
    path = tmp_path / "shard.tar"
    if kind == "gzip":  # a .tar.gz renamed, or handed over where an uncompressed tar belongs
        path.write_bytes(gzip.compress(open(tar, "rb").read()))
        what = "gzip-compressed"
    else:
        with zipfile.ZipFile(path, "w") as z:
            z.write(tar, "train-000000.tar")
        what = "a zip archive"
    with pytest.raises(ShardError, match=f"shard.tar: not a tar archive: the file is {what}.*"
                       "decompress"):
        Corpus.from_webdataset(urls_of([str(path)], source))


def test_directory_where_a_shard_is_expected_is_named(tmp_path):
    paths = write_wds(tmp_path / "wds", sizes=(3,))
    (tmp_path / "wds" / "oops.tar").mkdir()
    with pytest.raises(ShardError, match="oops.tar: cannot read the shard .*a tar file is expected"):
        Corpus.from_webdataset([paths[0], str(tmp_path / "wds" / "oops.tar")])


# ------------------------------------------------------------------ names that are not UTF-8
def write_non_utf8(path, producer: str) -> None:
    """Two samples, one whose key and one of whose suffixes are latin-1 bytes, not UTF-8."""
    samples = [("caf\udce9", b"first"), ("plain", b"second")]  # \udce9: byte 0xE9, escaped
    if producer == "TarWriter":
        with wds.TarWriter(str(path)) as w:
            for key, data in samples:
                w.write({"__key__": key, "d\udce9": data, "cls": 1})
        return
    # what GNU tar makes of files named in latin-1: raw bytes in the ustar name field
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT, encoding="latin-1") as tf:
        for key, data in samples:
            for suffix, value in (("d\xe9", data), ("cls", b"1")):
                info = tarfile.TarInfo(f"{key.replace(chr(0xdce9), chr(0xe9))}.{suffix}")
                info.size = len(value)
                tf.addfile(info, io.BytesIO(value))


@pytest.mark.parametrize("producer", ["TarWriter", "latin-1 tar"])
def test_non_utf8_member_names_read_as_webdataset_reads_them(tmp_path, producer):
    path = tmp_path / "names.tar"
    write_non_utf8(path, producer)
    assert b"caf\xe9" in path.read_bytes()
    reference = {s["__key__"]: s for s in wds.WebDataset(str(path), shardshuffle=False)}
    assert list(reference) == ["caf\udce9", "plain"]
    for urls in ([str(path)], [f"pipe:cat {path}"]):
        corpus = Corpus.from_webdataset(urls)
        corpus.save(tmp_path / "corpus.parquet")
        back = Corpus.load(tmp_path / "corpus.parquet")
        assert [back.tar.key(i) for i in range(2)] == list(reference)
        assert back.tar.suffixes == corpus.tar.suffixes
        ds = ESDataset(back, 2, shuffle=False,
                       decode=lambda s: s, collate=lambda batch: batch)
        got = [s for mb in loader(ds, num_workers=1, persistent_workers=False) for s in mb.data]
        assert [s["__key__"] for s in got] == list(reference)
        for sample in got:
            assert sample["d\udce9"] == reference[sample["__key__"]]["d\udce9"]


def claiming_tar(claim: int) -> bytes:
    """A two-member tar whose first header claims ``claim`` bytes of data (GNU base-256 size
    field, checksum recomputed), though the archive is 10 KiB."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for name in ("s0.txt", "s1.txt"):
            info = tarfile.TarInfo(name)
            info.size = 10
            tf.addfile(info, io.BytesIO(b"x" * 10))
    raw = bytearray(buf.getvalue())
    raw[124:136] = bytes([0x80]) + claim.to_bytes(11, "big")
    raw[148:156] = b" " * 8
    raw[148:156] = f"{sum(raw[:512]):06o}\0 ".encode()
    assert tarfile.TarInfo.frombuf(bytes(raw[:512]), "utf-8", "surrogateescape").size == claim
    return bytes(raw)


@pytest.mark.parametrize("claim", [1 << 40, 1 << 62])
def test_pipe_header_claiming_huge_size_ends_with_the_stream(tmp_path, claim):
    """Scanning a stream reads no further than the stream: a header's size claim past its end
    is a truncated shard, reported at once (it used to spin reading nothing for minutes)."""
    path = tmp_path / "claims.tar"
    path.write_bytes(claiming_tar(claim))
    try:
        proc = subprocess.run([EXE, "index", f"pipe:cat {path}", "-o", str(tmp_path / "i.parquet")],
                              capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("es-stream index of a pipe: tar claiming a huge member did not end in 60 s")
    assert proc.returncode != 0
    assert f"pipe:cat {path}" in proc.stderr and "truncated" in proc.stderr
    assert not (tmp_path / "i.parquet").exists()
