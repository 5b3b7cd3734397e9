"""MDS sources: compressed shards decompressed once across DataLoader workers and processes,
malformed index.json refused naming the entry and key, garbage corpus index files named."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import signal
import threading
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

pytest.importorskip("streaming")

from es_stream import Corpus, ESDataset, IndexFileError, ShardError, loader  # noqa: E402
from es_stream.sources.mds import shard_lock  # noqa: E402
from conftest import write_mds, write_wds  # noqa: E402

# Few, large samples: one ~6 MB shard takes long enough to decompress that workers starting
# together overlap on it (with 64 KB shards the race hit about 1 fresh run in 4).
BIG_N, BIG_BYTES = 24, 256 << 10
WORKERS = 3
FORK = mp.get_context("fork")


def big_payload(i: int) -> bytes:
    return np.random.default_rng(1000 + i).bytes(BIG_BYTES)  # random: zstd cannot shrink it


@pytest.fixture(scope="module")
def zstd_src(tmp_path_factory) -> Path:
    from streaming import MDSWriter

    out = tmp_path_factory.mktemp("zstd") / "src"
    with MDSWriter(out=str(out), columns={"bin": "bytes", "idx": "int"}, compression="zstd",
                   size_limit=1 << 26) as w:
        for i in range(BIG_N):
            w.write({"bin": big_payload(i), "idx": i})
    # MDSWriter keeps only the compressed files: readers must decompress them
    assert sorted(os.listdir(out)) == ["index.json", "shard.00000.mds.zstd"]
    return out


def fresh_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    assert not (dst / "shard.00000.mds").exists()
    return dst


def read_all(corpus: Corpus, barrier=None) -> list[int]:
    """Every id one epoch yields through WORKERS DataLoader workers, payloads checked. The
    workers wait for each other (and, with ``barrier``, for another process) before reading,
    so they reach the compressed shard together, as workers of a fresh run do."""
    start = FORK.Barrier(WORKERS)
    ds = ESDataset(corpus, meta_batch_size=4)
    if barrier is not None:
        barrier.wait(timeout=60)
    ids = []
    for mb in loader(ds, num_workers=WORKERS, persistent_workers=False,
                     worker_init_fn=lambda _: start.wait(timeout=60)):
        assert mb.data["idx"].tolist() == mb.ids.tolist()
        assert list(mb.data["bin"]) == [big_payload(i) for i in mb.ids.tolist()]
        ids += mb.ids.tolist()
    return ids


@pytest.mark.parametrize("remote", [False, True], ids=["local-zstd", "remote-zstd"])
def test_fresh_compressed_copies_decompress_once_with_three_workers(zstd_src, tmp_path, remote):
    # before: each variant failed in each of 3 tries, in the first or second fresh copy (a
    # worker renaming a .tmp another worker had already renamed, the zip removed under another
    # worker, or a worker that "exited unexpectedly" mapping a file another was truncating)
    for run in range(4):
        if remote:  # the zip is fetched into an empty cache and removed after decompressing
            corpus = Corpus.from_mds(tmp_path / f"cache{run}", remote=str(zstd_src))
        else:
            corpus = Corpus.from_mds(fresh_copy(zstd_src, tmp_path / f"run{run}"))
        assert sorted(read_all(corpus)) == list(range(BIG_N)), f"run {run}"
        local = Path(corpus.mds.local)
        assert (local / "shard.00000.mds").stat().st_size == corpus.shards[0].size
        assert not list(local.glob("*.tmp"))  # nothing half-written left behind


def _process_reads(local: str, barrier, results) -> None:
    try:
        results.put(sorted(read_all(Corpus.from_mds(local), barrier)))
    except BaseException as exc:  # report, don't hang the parent
        results.put(f"{type(exc).__name__}: {exc}")


def test_two_processes_decompress_the_same_shard_once(zstd_src, tmp_path):
    for run in range(3):
        local = str(fresh_copy(zstd_src, tmp_path / f"run{run}"))
        barrier, results = FORK.Barrier(2), FORK.Queue()
        procs = [FORK.Process(target=_process_reads, args=(local, barrier, results))
                 for _ in range(2)]
        for p in procs:
            p.start()
        got = [results.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(timeout=60)
        assert got == [list(range(BIG_N))] * 2, f"run {run}: {got}"


def _hold_lock(path: str, ready) -> None:
    with shard_lock(path):
        ready.set()
        signal.pause()  # until SIGKILLed


def test_a_killed_lock_holder_does_not_block_the_others(zstd_src, tmp_path):
    local = fresh_copy(zstd_src, tmp_path / "run")
    ready = FORK.Event()
    holder = FORK.Process(target=_hold_lock, args=(str(local / "shard.00000.mds"), ready))
    holder.start()
    assert ready.wait(timeout=30)
    os.kill(holder.pid, signal.SIGKILL)  # dies holding the lock, mid-"decompression"
    holder.join(timeout=30)
    got: list = []
    reader = threading.Thread(target=lambda: got.append(read_all(Corpus.from_mds(local))))
    reader.start()
    reader.join(timeout=120)
    assert not reader.is_alive(), "readers still wait for a lock whose holder is dead"
    assert sorted(got[0]) == list(range(BIG_N))


# --------------------------------------------------------------------------- index.json checks
def _set(key_path: list, value):
    def edit(index: dict) -> None:
        target = index
        for key in key_path[:-1]:
            target = target[key]
        if value is _DELETE:
            del target[key_path[-1]]
        else:
            target[key_path[-1]] = value
    return edit


_DELETE = object()
S0 = ["shards", 0]

BROKEN_INDEX = {
    # name: (edit of the parsed index.json, words the error must contain)
    "a list": (lambda index: index["shards"], ["JSON object", "got a JSON list"]),
    "no version": (_set(["version"], _DELETE), ["'version' must be 2"]),
    "no shards": (_set(["shards"], _DELETE), ["'shards' must be a list"]),
    "shards a dict": (_set(["shards"], {}), ["'shards' must be a list"]),
    "entry a string": (_set(S0, "shard.00000.mds"), ["shard entry 0 must be an object"]),
    "no samples": (_set(S0 + ["samples"], _DELETE), ["shard entry 0", "no key 'samples'"]),
    "no raw_data": (_set(S0 + ["raw_data"], _DELETE), ["shard entry 0", "no key 'raw_data'"]),
    "no basename": (_set(S0 + ["raw_data", "basename"], _DELETE),
                    ["shard entry 0 raw_data", "no key 'basename'"]),
    "no column_encodings": (_set(S0 + ["column_encodings"], _DELETE),
                            ["shard entry 0", "'column_encodings'"]),
    "negative samples": (_set(S0 + ["samples"], -3), ["shard entry 0", "'samples'", "-3"]),
    "samples a string": (_set(S0 + ["samples"], "7"), ["shard entry 0", "'samples'"]),
    "samples a bool": (_set(S0 + ["samples"], True), ["shard entry 0", "'samples'"]),
    "negative bytes": (_set(S0 + ["raw_data", "bytes"], -1), ["shard entry 0 raw_data", "'bytes'"]),
    "raw_data a list": (_set(S0 + ["raw_data"], []), ["shard entry 0", "'raw_data'"]),
    "zip_data a string": (_set(S0 + ["zip_data"], "x.zstd"), ["shard entry 0", "'zip_data'"]),
    "compression a number": (_set(S0 + ["compression"], 5), ["shard entry 0", "'compression'"]),
    "format json": (_set(S0 + ["format"], "json"), ["shard entry 0", "'format'"]),
    "parent path": (_set(S0 + ["raw_data", "basename"], "../outside.mds"),
                    ["shard entry 0 raw_data", "'basename'", "plain file name"]),
    "absolute path": (_set(S0 + ["raw_data", "basename"], "/etc/passwd"),
                      ["shard entry 0 raw_data", "'basename'"]),
    "sub directory": (_set(S0 + ["raw_data", "basename"], "sub/shard.mds"),
                      ["shard entry 0 raw_data", "'basename'"]),
    "columns unequal": (_set(S0 + ["column_names"], ["bin", "cls"]),
                        ["shard entry 0", "equal lengths"]),
    "unknown encoding": (_set(S0 + ["column_encodings"], ["bytes", "nope", "int"]),
                         ["shard entry 0", "'nope'"]),
    "unknown key": (_set(S0 + ["colour"], "blue"), ["shard entry 0", "colour"]),
    "same file twice": (lambda index: index["shards"].__setitem__(1, index["shards"][0]),
                        ["shard entry 1", "as shard entry 0 does"]),
}


def break_index(directory: Path, edit) -> Path:
    index_json = directory / "index.json"
    index = json.loads(index_json.read_text())
    replaced = edit(index)
    index_json.write_text(json.dumps(index if replaced is None else replaced))
    return index_json


@pytest.mark.parametrize("case", list(BROKEN_INDEX))
def test_broken_index_json_names_the_entry_and_key(mds_dir, case):
    edit, words = BROKEN_INDEX[case]
    index_json = break_index(mds_dir, edit)
    with pytest.raises(ShardError) as info:
        Corpus.from_mds(mds_dir)
    message = str(info.value)
    assert message.startswith(f"{index_json}: ")
    assert "streaming.MDSWriter" in message
    for word in words:
        assert word in message


@pytest.mark.parametrize("case", ["no samples", "negative samples", "a list", "parent path"])
def test_index_json_broken_after_indexing_is_named_on_load(mds_dir, tmp_path, case):
    Corpus.from_mds(mds_dir).save(tmp_path / "corpus.parquet")
    index_json = break_index(mds_dir, BROKEN_INDEX[case][0])
    with pytest.raises(ShardError, match=f"^{index_json}: invalid index.json"):
        Corpus.load(tmp_path / "corpus.parquet")


def test_index_json_shard_size_change_is_stale(mds_dir, tmp_path):
    from es_stream import StaleIndexError

    # a remote corpus whose shards are not fetched yet: only index.json tells their size
    Corpus.from_mds(tmp_path / "cache", remote=str(mds_dir)).save(tmp_path / "corpus.parquet")
    break_index(tmp_path / "cache", _set(["shards", 1, "raw_data", "bytes"], 12345))
    with pytest.raises(StaleIndexError, match="shard.00001.mds changed since it was indexed"):
        Corpus.load(tmp_path / "corpus.parquet")


def test_streaming_dataset_names_a_broken_index_json(mds_dir):
    from es_stream.integrations.streaming_dataset import ESStreamingDataset

    index_json = break_index(mds_dir, _set(S0 + ["samples"], _DELETE))
    with pytest.raises(ShardError, match=f"^{index_json}: .*no key 'samples'"):
        ESStreamingDataset(local=str(mds_dir), batch_size=4)


# ----------------------------------------------------------------- garbage corpus index files
def rewrite_meta(path: Path, edit) -> None:
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[b"es_stream.corpus"])
    new = edit(meta)
    raw = new if isinstance(new, bytes) else json.dumps(meta)
    pq.write_table(table.replace_schema_metadata({b"es_stream.corpus": raw}), path)


def drop_column(path: Path, name: str) -> None:
    table = pq.read_table(path)
    pq.write_table(table.drop_columns([name]).replace_schema_metadata(table.schema.metadata),
                   path)


def cast_column(path: Path, name: str) -> None:
    table = pq.read_table(path)
    i = table.column_names.index(name)
    table = table.set_column(i, name, table.column(name).cast("string"))
    pq.write_table(table, path)


def drop_rows(path: Path) -> None:
    table = pq.read_table(path)
    pq.write_table(table.slice(0, table.num_rows - 3), path)


GARBAGE = {
    "text file": lambda p: p.write_text("shard,count\nx.tar,5\n"),
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "empty file": lambda p: p.write_bytes(b""),
    "no es-stream metadata": lambda p: pq.write_table(pq.read_table(p).replace_schema_metadata(),
                                                      p),
    "metadata not JSON": lambda p: rewrite_meta(p, lambda m: b"{not json"),
    "metadata a list": lambda p: rewrite_meta(p, lambda m: json.dumps([m]).encode()),
    "no shards key": lambda p: rewrite_meta(p, lambda m: m.pop("shards")),
    "no format key": lambda p: rewrite_meta(p, lambda m: m.pop("format")),
    "shard without size": lambda p: rewrite_meta(p, lambda m: m["shards"][0].pop("size")),
    "negative sample count": lambda p: rewrite_meta(
        p, lambda m: m["shards"][0].__setitem__("num_samples", -2)),
    "missing offset column": lambda p: drop_column(p, "offset"),
    "missing member_size column": lambda p: drop_column(p, "member_size"),
    "offset column of strings": lambda p: cast_column(p, "offset"),
    "rows missing": drop_rows,
}


@pytest.mark.parametrize("case", list(GARBAGE))
def test_garbage_corpus_index_is_named(tmp_path, case):
    write_wds(tmp_path / "wds")
    path = tmp_path / "corpus.parquet"
    Corpus.from_webdataset(str(tmp_path / "wds")).save(path)
    GARBAGE[case](path)
    with pytest.raises(IndexFileError) as info:
        Corpus.load(path)
    assert str(info.value).startswith(f"{path}: ")
    assert f"es-stream index SHARDS -o {path}" in str(info.value)
    assert isinstance(info.value, ValueError)


MDS_GARBAGE = {
    "no mds key": lambda m: m.pop("mds"),
    "mds index broken": lambda m: m["mds"]["index"]["shards"][0].__setitem__("samples", -1),
    "mds index a list": lambda m: m["mds"].__setitem__("index", []),
    "shards disagree": lambda m: m["shards"][0].__setitem__("num_samples", 999),
}


@pytest.mark.parametrize("case", list(MDS_GARBAGE))
def test_garbage_mds_corpus_index_is_named(mds_dir, tmp_path, case):
    path = tmp_path / "corpus.parquet"
    Corpus.from_mds(mds_dir).save(path)
    rewrite_meta(path, MDS_GARBAGE[case])
    with pytest.raises(IndexFileError, match=f"^{path}: .*es-stream index SHARDS -o {path}"):
        Corpus.load(path)


def test_a_directory_is_not_a_corpus_index(tmp_path):
    write_mds(tmp_path / "mds")
    Corpus.from_mds(tmp_path / "mds").save(tmp_path / "dir" / "part.parquet")
    with pytest.raises(IndexFileError, match="is a directory"):
        Corpus.load(tmp_path / "dir")

