"""Corpus: stable ids, locate, fingerprint, Parquet round trip, staleness, bad shards."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from es_stream import Corpus, ShardError, StaleIndexError
from conftest import SHARD_SIZES, payload, write_mds, write_wds


def raw_webdataset_keys(urls) -> list[str]:
    """What webdataset itself yields, in order: the reference for grouping."""
    return [s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False)]


def test_ids_follow_shard_order_and_sizes(wds_dir):
    corpus = Corpus.from_webdataset(str(wds_dir))
    assert corpus.num_samples == sum(SHARD_SIZES)
    assert [s.num_samples for s in corpus.shards] == list(SHARD_SIZES)
    assert [os.path.basename(s.name) for s in corpus.shards] == [
        f"train-{i:06d}.tar" for i in range(len(SHARD_SIZES))]
    keys = corpus.tar.keys.to_pylist()
    assert keys == [f"sample{i:06d}" for i in range(corpus.num_samples)]
    assert keys == raw_webdataset_keys(str(wds_dir / "train-{000000..000004}.tar"))


def test_brace_pattern_list_and_directory_agree(wds_dir):
    by_dir = Corpus.from_webdataset(str(wds_dir))
    by_brace = Corpus.from_webdataset(str(wds_dir / "train-{000000..000004}.tar"))
    by_list = Corpus.from_webdataset(sorted(str(p) for p in wds_dir.glob("*.tar")))
    assert by_dir.fingerprint == by_brace.fingerprint == by_list.fingerprint
    assert np.array_equal(by_dir.tar.offsets, by_list.tar.offsets)


def test_locate_round_trip(wds_dir):
    corpus = Corpus.from_webdataset(str(wds_dir))
    ids = np.random.default_rng(0).permutation(corpus.num_samples)
    shard, pos = corpus.locate(ids)
    assert np.array_equal(corpus.shard_starts[shard] + pos, ids)
    assert (pos < np.array(SHARD_SIZES)[shard]).all() and (pos >= 0).all()
    # the last sample of shard 2 (a one-sample shard) sits at position 0 of shard 2
    assert corpus.locate([7 + 13])[0].tolist() == [2]


def test_offsets_point_at_the_payloads(wds_dir):
    corpus = Corpus.from_webdataset(str(wds_dir))
    t = corpus.tar
    for sid in (0, 7, 20, corpus.num_samples - 1):
        shard, _ = corpus.locate([sid])
        with open(corpus.shards[int(shard[0])].name, "rb") as f:
            f.seek(int(t.offsets[sid]))
            span = f.read(int(t.lengths[sid]))
        members = range(t.member_ptr[sid], t.member_ptr[sid + 1])
        got = {t.suffixes[t.member_suffix[m]]: span[t.member_offset[m]:t.member_offset[m] + t.member_size[m]]
               for m in members}
        assert got["bin"] == payload(sid)
        assert got["cls"] == str(sid % 10).encode()


def test_locate_rejects_out_of_range_ids(wds_dir):
    corpus = Corpus.from_webdataset(str(wds_dir))
    with pytest.raises(IndexError, match=f"sample id {corpus.num_samples} is outside"):
        corpus.locate([0, corpus.num_samples])
    with pytest.raises(IndexError, match="sample id -1"):
        corpus.locate([-1])


def test_fingerprint_changes_when_a_shard_does(tmp_path):
    write_wds(tmp_path / "a")
    write_wds(tmp_path / "b")
    assert Corpus.from_webdataset(str(tmp_path / "a")).fingerprint == \
        Corpus.from_webdataset(str(tmp_path / "b")).fingerprint  # same data, other directory
    write_wds(tmp_path / "b", sizes=SHARD_SIZES[:-1] + (10,))
    assert Corpus.from_webdataset(str(tmp_path / "a")).fingerprint != \
        Corpus.from_webdataset(str(tmp_path / "b")).fingerprint


def test_pax_and_global_headers_are_not_samples(tmp_path):
    path = tmp_path / "pax.tar"
    long_key = "k" * 150  # longer than ustar's 100-char name: tarfile writes a PAX header
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "global"}) as tf:
        for key in ("a", long_key, "c"):
            for suffix, data in (("txt", key.encode()), ("cls", b"1")):
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                info.pax_headers = {"es": "x" * 10}
                tf.addfile(info, io.BytesIO(data))
    corpus = Corpus.from_webdataset([str(path)])
    assert corpus.num_samples == 3
    assert corpus.tar.keys.to_pylist() == ["a", long_key, "c"] == raw_webdataset_keys(str(path))


def test_directories_and_meta_files_are_skipped_like_webdataset(tmp_path):
    path = tmp_path / "odd.tar"
    with tarfile.open(path, "w") as tf:
        tf.addfile(tarfile.TarInfo("dir"), None) if False else None
        d = tarfile.TarInfo("sub")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
        for name, data in (("__meta__", b"m"), ("sub/x.txt", b"1"), ("sub/x.CLS", b"2"),
                           ("noext", b"z"), ("y.txt", b"3")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    corpus = Corpus.from_webdataset([str(path)])
    assert corpus.tar.keys.to_pylist() == raw_webdataset_keys(str(path)) == ["sub/x", "y"]
    assert "cls" in corpus.tar.suffixes  # lower-cased like webdataset


def test_pipe_urls_are_indexed_while_streaming(wds_dir):
    local = Corpus.from_webdataset(str(wds_dir))
    piped = Corpus.from_webdataset([f"pipe:cat {s.name}" for s in local.shards])
    assert piped.num_samples == local.num_samples
    assert np.array_equal(piped.tar.offsets, local.tar.offsets)
    assert [s.size for s in piped.shards] == [s.size for s in local.shards]
    assert all(s.mtime_ns == -1 for s in piped.shards)


def test_save_load_round_trip(wds_dir, tmp_path):
    corpus = Corpus.from_webdataset(str(wds_dir))
    corpus.save(tmp_path / "corpus.parquet")
    back = Corpus.load(tmp_path / "corpus.parquet")
    assert back.fingerprint == corpus.fingerprint
    assert back.shards == corpus.shards
    for name in ("offsets", "lengths", "member_ptr", "member_suffix", "member_offset", "member_size"):
        assert np.array_equal(getattr(back.tar, name), getattr(corpus.tar, name)), name
    assert back.tar.suffixes == corpus.tar.suffixes
    table = pq.read_table(tmp_path / "corpus.parquet")
    assert table.column("id").to_pylist() == list(range(corpus.num_samples))
    assert table.column("key").to_pylist()[:2] == ["sample000000", "sample000001"]


def test_stale_index_is_refused_naming_the_shard(wds_dir, tmp_path):
    Corpus.from_webdataset(str(wds_dir)).save(tmp_path / "corpus.parquet")
    index = tmp_path / "corpus.parquet"
    os.utime(wds_dir / "train-000003.tar", ns=(1, 1))  # same bytes, other mtime: refused
    with pytest.raises(StaleIndexError, match="train-000003.tar: shard changed since it was indexed"):
        Corpus.load(index)
    Corpus.from_webdataset(str(wds_dir)).save(index)
    write_wds(tmp_path / "other", sizes=(7, 14))  # shard 1 gains a sample
    shutil.copy(tmp_path / "other" / "train-000001.tar", wds_dir / "train-000001.tar")
    with pytest.raises(StaleIndexError, match="train-000001.tar: shard changed"):
        Corpus.load(index)
    assert Corpus.load(index, check=False).num_samples == sum(SHARD_SIZES)  # explicit opt-out


def test_missing_shard_is_named(wds_dir, tmp_path):
    Corpus.from_webdataset(str(wds_dir)).save(tmp_path / "corpus.parquet")
    os.remove(wds_dir / "train-000002.tar")
    with pytest.raises(ShardError, match="train-000002.tar.*missing"):
        Corpus.load(tmp_path / "corpus.parquet")
    with pytest.raises(ShardError, match="train-000002.tar.*no such shard"):
        Corpus.from_webdataset(str(wds_dir / "train-{000000..000004}.tar"))


@pytest.mark.parametrize("cut", [100, 1000, "last-payload"])
def test_truncated_tar_is_named(wds_dir, cut):
    path = wds_dir / "train-000003.tar"
    if cut == "last-payload":  # keep every header, lose the end of the last payload
        t = Corpus.from_webdataset([str(path)]).tar
        cut = int(t.offsets[-1] + t.member_offset[-2] + 10)
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(ShardError, match="train-000003.tar.*(truncated|corrupt|not a readable)"):
        Corpus.from_webdataset(str(wds_dir))


def test_corrupt_header_in_the_middle_is_named(wds_dir):
    path = wds_dir / "train-000003.tar"
    data = bytearray(path.read_bytes())
    corpus = Corpus.from_webdataset([str(path)])
    victim = int(corpus.tar.offsets[10])
    data[victim + 148:victim + 156] = b"garbage!"  # checksum field
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=f"train-000003.tar.*corrupt tar header at byte {victim}"):
        Corpus.from_webdataset([str(path)])


def test_truncated_pipe_stream_is_named(wds_dir):
    path = wds_dir / "train-000003.tar"
    with pytest.raises(ShardError, match="truncated|corrupt|not a readable"):
        Corpus.from_webdataset([f"pipe:head -c 3000 {path}"])


def test_empty_corpus_and_empty_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardError, match="empty.*no .tar shards"):
        Corpus.from_webdataset(str(tmp_path / "empty"))
    with tarfile.open(tmp_path / "nothing.tar", "w"):
        pass
    with pytest.raises(ShardError, match="nothing.tar.*no samples"):
        Corpus.from_webdataset([str(tmp_path / "nothing.tar")])


def test_duplicate_file_in_a_sample_is_refused(tmp_path):
    path = tmp_path / "dup.tar"
    with tarfile.open(path, "w") as tf:
        for name in ("a.txt", "a.txt"):
            info = tarfile.TarInfo(name)
            info.size = 1
            tf.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(ShardError, match="dup.tar.*duplicate file 'a.txt'"):
        Corpus.from_webdataset([str(path)])


# ------------------------------------------------------------------------------------ MDS
def test_mds_index(mds_dir):
    import json

    corpus = Corpus.from_mds(mds_dir)
    index = json.loads((mds_dir / "index.json").read_text())
    assert corpus.num_samples == 50
    assert [s.num_samples for s in corpus.shards] == [s["samples"] for s in index["shards"]]
    assert len(corpus.shards) > 3 and len({s.num_samples for s in corpus.shards}) > 1


def test_mds_from_remote_fetches_into_local(mds_dir, tmp_path):
    local = tmp_path / "cache"
    corpus = Corpus.from_mds(local, remote=str(mds_dir))
    assert (local / "index.json").exists()
    assert corpus.fingerprint == Corpus.from_mds(mds_dir).fingerprint
    assert all(s.mtime_ns == -1 for s in corpus.shards)  # shards are fetched when first read


def test_mds_without_index_json_is_named(tmp_path):
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ShardError, match="nothing/index.json.*no index.json"):
        Corpus.from_mds(tmp_path / "nothing")


def test_mds_stale_count_is_refused(mds_dir, tmp_path):
    Corpus.from_mds(mds_dir).save(tmp_path / "mds.parquet")
    shutil.rmtree(mds_dir)
    write_mds(mds_dir, n=60)
    with pytest.raises(StaleIndexError, match="changed since it was indexed|now lists"):
        Corpus.load(tmp_path / "mds.parquet")


def test_core_imports_without_streaming_and_names_the_extra(mds_dir):
    code = ("import sys; sys.modules['streaming'] = None\n"
            "import es_stream\n"
            f"try:\n    es_stream.Corpus.from_mds({str(mds_dir)!r})\n"
            "except ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'es-stream[mds]'" in out.stdout
