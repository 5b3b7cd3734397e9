"""The batched tar read (coalesced preads, checksums in bulk) and the packed worker transport of
MetaBatch, on real shards and real DataLoader workers."""

from __future__ import annotations

import copy
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from es_stream import Corpus, ESDataset, loader
from es_stream.errors import SampleError
from es_stream.metabatch import MetaBatch
from es_stream.sources.wds import WDSShardReader

from conftest import forget_content_checks

BIG = 48 << 10  # a payload that makes a big gap when pruned or skipped


def _size(i: int) -> int:
    """Mixed member sizes: mostly small, every 7th sample bigger than the coalescing gap."""
    return BIG if i % 7 == 3 else 1 + (i * 37) % 900


def _payload(i: int) -> bytes:
    return np.random.default_rng(i).integers(0, 256, _size(i), dtype=np.uint8).tobytes()


def _write(directory: Path, sizes=(30, 25)) -> Corpus:
    directory.mkdir(parents=True)
    i = 0
    for s, n in enumerate(sizes):
        with wds.TarWriter(str(directory / f"mixed-{s:06d}.tar")) as w:
            for _ in range(n):
                sample = {"__key__": f"k{i:05d}", "bin": _payload(i), "cls": i}
                if i % 5 == 0:  # some samples have one more member
                    sample["txt"] = "x" * (i % 13)
                w.write(sample)
                i += 1
    return Corpus.from_webdataset(str(directory))


@pytest.fixture
def mixed(tmp_path: Path) -> Corpus:
    return _write(tmp_path / "mixed")


def _truth(corpus: Corpus) -> dict[str, dict]:
    """Every sample as webdataset itself reads it, by key."""
    urls = [s.name for s in corpus.shards]
    return {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)}


def _counting(reader: WDSShardReader) -> list[tuple[int, int, int]]:
    """Record each pread the reader makes (shard, length, offset); it still reads for real."""
    calls: list[tuple[int, int, int]] = []
    real = reader._pread_local

    def pread(shard: int, length: int, offset: int) -> bytes:
        calls.append((shard, length, offset))
        return real(shard, length, offset)

    reader._pread_local = pread
    return calls


def test_batched_read_equals_webdataset_with_pruned_gaps(mixed):
    """Shuffled ids with pruned samples in between, over two shards with mixed member sizes and
    member sets: each sample equals webdataset's, in the order asked; small gaps are read in one
    pread, big pruned samples are seeked past (never read)."""
    truth = _truth(mixed)
    keep = np.array([i for i in range(mixed.num_samples) if i % 4 != 1])  # pruned: every 4th
    ids = np.random.default_rng(0).permutation(keep)
    shards, _ = mixed.locate(ids)
    reader = WDSShardReader(mixed)
    calls = _counting(reader)
    got = reader.read_batch(ids, shards)
    for sid, sample in zip(ids.tolist(), got):
        key = mixed.tar.key(sid)
        want = {k: v for k, v in truth[key].items() if k != "__local_path__"}
        assert sample == want, sid
    assert len(calls) < len(ids) / 2  # neighbours coalesced
    pruned_big = [i for i in range(mixed.num_samples) if i % 4 == 1 and _size(i) == BIG]
    assert pruned_big  # the corpus has some; none of their bytes were read
    for sid in pruned_big:
        shard = int(mixed.locate([sid])[0][0])
        off = int(mixed.tar.offsets[sid])
        payload_at = off + int(mixed.tar.member_offset[mixed.tar.member_ptr[sid]])
        assert not any(s == shard and o <= payload_at + 1000 < o + n for s, n, o in calls), sid
    assert reader.bytes_read < sum(int(mixed.tar.lengths[i]) for i in range(mixed.num_samples))
    reader.close()


def _corrupt_header(corpus: Corpus, sid: int) -> None:
    """Flip one byte of sample ``sid``'s header name after indexing (size and mtime kept)."""
    forget_content_checks(corpus)
    path = corpus.shards[int(corpus.locate([sid])[0][0])].name
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(int(corpus.tar.offsets[sid]) + 1)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x55]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_member_mid_run_skips_that_sample_only(mixed, workers):
    """One corrupt header inside a coalesced run: on_error='skip' loses that sample alone (in
    lost_ids), every other sample arrives with its bytes, through 0 and 2 workers."""
    bad = 12  # small neighbours on both sides: read in the same pread
    assert _size(bad - 1) < BIG and _size(bad) < BIG and _size(bad + 1) < BIG
    _corrupt_header(mixed, bad)
    ds = ESDataset(mixed, 8, decode=lambda s: s, collate=list, on_error="skip", seed=3)
    if workers == 0:
        with pytest.warns(RuntimeWarning, match=f"sample id {bad}.*corrupt tar header"):
            batches = list(loader(ds, num_workers=0))
    else:
        batches = list(loader(ds, num_workers=workers, persistent_workers=False))
    lost = torch.cat([mb.lost_ids for mb in batches]).tolist()
    assert lost == [bad]
    seen = {}
    for mb in batches:
        for sid, sample in zip(mb.ids.tolist(), mb.data or []):
            seen[sid] = sample
    assert sorted(seen) == [i for i in range(mixed.num_samples) if i != bad]
    for sid, sample in seen.items():
        assert sample["bin"] == _payload(sid) and int(sample["cls"]) == sid


def test_corrupt_member_raises_naming_it(mixed):
    _corrupt_header(mixed, 12)
    ds = ESDataset(mixed, 8, decode=lambda s: s, collate=list, shuffle=False)
    with pytest.raises(SampleError, match=r"mixed-000000.tar \(sample id 12\).*corrupt tar header"):
        list(ds)


def test_checksum_written_otherwise_is_still_accepted(mixed):
    """A valid header whose checksum is not written as Python's tarfile writes it (7 octal
    digits, then NUL) is judged by tarfile's own parse, not refused by the bulk check."""
    sid = 5
    path = mixed.shards[0].name
    off = int(mixed.tar.offsets[sid])
    mixed.verify_shards = False  # rewritten in place after indexing, on purpose
    with open(path, "r+b") as f:
        f.seek(off)
        header = bytearray(f.read(512))
        chksum = 256 + sum(header[:148]) + sum(header[156:])
        header[148:156] = f"{chksum:07o}\0".encode()
        f.seek(off)
        f.write(header)
    reader = WDSShardReader(mixed)
    ids = np.arange(mixed.num_samples)
    got = reader.read_batch(ids, mixed.locate(ids)[0])
    assert got[sid]["bin"] == _payload(sid)
    assert not any(isinstance(g, Exception) for g in got)
    reader.close()


def test_missing_shard_mid_batch_loses_the_rest_of_it(mixed):
    """A shard deleted after indexing: each of its samples gets the ShardError naming it, the
    other shard's samples of the same meta-batch are all read."""
    os.remove(mixed.shards[1].name)  # (ESDataset would refuse it up front; the reader cannot)
    reader = WDSShardReader(mixed)
    ids = np.arange(mixed.num_samples)
    got = reader.read_batch(ids, mixed.locate(ids)[0])
    first = int(mixed.shard_starts[1])
    assert all(isinstance(g, dict) for g in got[:first])
    assert all(isinstance(g, Exception) and "missing" in str(g) for g in got[first:])
    reader.close()


# ----------------------------------------------------------------------------- transport
def _assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert type(a) is type(b) and list(a) == list(b)
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b) and a.dtype == b.dtype
    else:
        assert type(a) is type(b) and a == b


def test_pickle_round_trip_is_exact_and_packed():
    data = {"__key__": ["a", "b\udcff", "", "ü"], "bin": [b"x", b"", b"\0yz", b"q" * 3000],
            "f": torch.rand(4, 3).t(), "half": torch.tensor(3.5, dtype=torch.float16),
            "flag": torch.tensor([True, False, True, True]), "cls": torch.arange(4),
            "empty": torch.empty(0, 5), "nested": [torch.ones(2), {"z": torch.zeros(3, 1)}],
            "mixed": [1, "a", b"b"], "none": None, "arr": np.arange(3.0), "grad": torch.ones(
                2, requires_grad=True), "list_empty": [], "tup": (torch.arange(2), "s"),
            "big_shared": torch.arange(300_000, dtype=torch.float32).share_memory_(),
            "from_numpy_empty": torch.from_numpy(np.zeros(0, np.int64)),
            "expanded": torch.tensor([2.5]).expand(3, 4)}
    empty = MetaBatch(ids=torch.from_numpy(np.zeros(0, np.int64)), data=None, epoch=1,
                      lost_ids=torch.tensor([4, 5]))  # a meta-batch lost whole (on_error skip)
    _assert_same(pickle.loads(pickle.dumps(empty)).lost_ids, empty.lost_ids)
    mb = MetaBatch(ids=torch.arange(4) * 7, data=data, epoch=5,
                   lost_ids=torch.tensor([3, 9]), weights=torch.tensor([1, 2, 3, 4.0]))
    back = pickle.loads(pickle.dumps(mb))
    for name in ("ids", "data", "epoch", "lost_ids", "weights"):
        _assert_same(getattr(mb, name), getattr(back, name))
    # the plain CPU tensors now share one storage: one shared-memory segment across processes
    ptr = back.ids.untyped_storage().data_ptr()
    for t in (back.weights, back.lost_ids, back.data["f"], back.data["cls"],
              back.data["nested"][1]["z"]):
        assert t.untyped_storage().data_ptr() == ptr
    assert back.data["grad"].requires_grad  # kept out of the pack, pickled as it is
    # already in shared memory and big (default_collate's output in a worker): not copied
    assert back.data["big_shared"].untyped_storage().data_ptr() != ptr
    back.data["f"].add_(1)  # writable, and a view of its own slice only
    assert torch.equal(back.data["cls"], torch.arange(4))
    assert copy.copy(mb).data is mb.data  # shallow copy shares, as before
    deep = copy.deepcopy(mb)
    assert deep.data["f"] is not mb.data["f"] and torch.equal(deep.data["f"], mb.data["f"])


def _epoch(ds: ESDataset, workers: int) -> dict[int, tuple]:
    """Every sample of an epoch, by id: (its collated row's fields)."""
    out = {}
    for mb in loader(ds, num_workers=workers, persistent_workers=False, pin_memory=False):
        rows = len(mb)
        for j, sid in enumerate(mb.ids.tolist()):
            out[sid] = tuple((k, v[j] if isinstance(v, list) else v[j].clone())
                             for k, v in sorted(mb.data.items()))
        assert mb.weights.shape == (rows,)
    return out


@pytest.mark.parametrize("kind", ["wds", "mds"])
def test_worker_transport_equals_in_process(kind, wds_dir, mds_dir):
    """Default decode and collate (lists of keys, URLs, bytes; int tensors) through 2 real
    workers arrive exactly as iterated in this process, all tensors of a meta-batch in one
    shared storage."""
    corpus = Corpus.from_webdataset(str(wds_dir)) if kind == "wds" else Corpus.from_mds(mds_dir)
    ds = ESDataset(corpus, 8, seed=1)
    here, there = _epoch(ds, 0), _epoch(ds, 2)
    assert sorted(here) == list(range(corpus.num_samples)) and list(here) != sorted(here)
    for sid in here:
        _assert_same(here[sid], there[sid])
    mb = next(iter(loader(ds, num_workers=2, persistent_workers=False, pin_memory=False)))
    tensors = [mb.ids, mb.weights, mb.lost_ids] + [v for v in mb.data.values()
                                                  if isinstance(v, torch.Tensor)]
    assert len({t.untyped_storage().data_ptr() for t in tensors}) == 1
