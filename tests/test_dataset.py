"""ESDataset through real DataLoader workers over real WebDataset and MDS shards."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from es_stream import Corpus, ESDataset, MetaBatch, ShardError, StaleIndexError, loader
from conftest import SHARD_SIZES, forget_content_checks, payload


def corpus_of(kind, wds_dir, mds_dir) -> Corpus:
    return Corpus.from_webdataset(str(wds_dir)) if kind == "wds" else Corpus.from_mds(mds_dir)


def epoch_batches(ds: ESDataset, workers: int, epoch: int = 0) -> list[MetaBatch]:
    ds.set_epoch(epoch)
    return list(loader(ds, num_workers=workers, persistent_workers=False))


@pytest.mark.parametrize("kind", ["wds", "mds"])
@pytest.mark.parametrize("workers", [0, 2, 3])
def test_exactly_once_per_epoch(kind, workers, wds_dir, mds_dir):
    corpus = corpus_of(kind, wds_dir, mds_dir)
    ds = ESDataset(corpus, meta_batch_size=8)
    batches = epoch_batches(ds, workers)
    ids = torch.cat([mb.ids for mb in batches]).numpy()
    assert np.array_equal(np.sort(ids), np.arange(corpus.num_samples))
    assert len(batches) == len(ds)
    assert sum(len(mb) < 8 for mb in batches) <= max(workers, 1)
    for mb in batches:  # the data belongs to the ids
        assert isinstance(mb, MetaBatch) and mb.epoch == 0
        assert mb.data["cls"].tolist() == (mb.ids % 10).tolist()
        assert list(mb.data["bin"]) == [payload(i) for i in mb.ids.tolist()]
        if kind == "wds":
            assert mb.data["__key__"] == [f"sample{i:06d}" for i in mb.ids.tolist()]
        else:
            assert mb.data["idx"].tolist() == mb.ids.tolist()


@pytest.mark.parametrize("kind", ["wds", "mds"])
def test_same_order_twice_other_order_next_epoch(kind, wds_dir, mds_dir):
    corpus = corpus_of(kind, wds_dir, mds_dir)
    run1 = [mb.ids.tolist() for mb in epoch_batches(ESDataset(corpus, 8, seed=5), 2)]
    run2 = [mb.ids.tolist() for mb in epoch_batches(ESDataset(corpus, 8, seed=5), 2)]
    other = [mb.ids.tolist() for mb in epoch_batches(ESDataset(corpus, 8, seed=5), 2, epoch=1)]
    assert run1 == run2
    assert run1 != other
    assert sorted(sum(run1, [])) == sorted(sum(other, []))


def test_persistent_workers_see_set_epoch(wds_dir):
    ds = ESDataset(Corpus.from_webdataset(str(wds_dir)), 8, seed=1)
    dl = loader(ds, num_workers=2)  # persistent by default
    seen = []
    for epoch in range(3):
        ds.set_epoch(epoch)
        batches = list(dl)
        assert {mb.epoch for mb in batches} == {epoch}
        seen.append([mb.ids.tolist() for mb in batches])
    assert seen[0] != seen[1] != seen[2]
    fresh = epoch_batches(ESDataset(Corpus.from_webdataset(str(wds_dir)), 8, seed=1), 2, epoch=2)
    assert seen[2] == [mb.ids.tolist() for mb in fresh]


def test_pipe_urls_stream_exactly_once(wds_dir):
    local = Corpus.from_webdataset(str(wds_dir))
    piped = Corpus.from_webdataset([f"pipe:cat {s.name}" for s in local.shards])
    ds = ESDataset(piped, 8)
    assert not ds.seekable
    batches = epoch_batches(ds, 2)
    ids = torch.cat([mb.ids for mb in batches]).tolist()
    assert sorted(ids) == list(range(local.num_samples))
    assert all(list(mb.data["bin"]) == [payload(i) for i in mb.ids.tolist()] for mb in batches)


def test_custom_decode_and_collate(wds_dir):
    ds = ESDataset(Corpus.from_webdataset(str(wds_dir)), 4,
                   decode=lambda s: int(s["cls"]), collate=lambda xs: torch.tensor(xs) * 2)
    mb = next(iter(ds))
    assert mb.data.tolist() == (mb.ids % 10 * 2).tolist()


def test_pin_memory_and_to(wds_dir):
    mb = next(iter(ESDataset(Corpus.from_webdataset(str(wds_dir)), 4)))
    moved = mb.to("cpu")
    assert torch.equal(moved.ids, mb.ids) and torch.equal(moved.data["cls"], mb.data["cls"])
    if torch.cuda.is_available():
        assert mb.pin_memory().ids.is_pinned()


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_meta_batch_size_must_be_positive(wds_dir, bad):
    with pytest.raises(ValueError, match="meta_batch_size must be an integer >= 1"):
        ESDataset(Corpus.from_webdataset(str(wds_dir)), bad)


def test_other_bad_arguments(wds_dir):
    corpus = Corpus.from_webdataset(str(wds_dir))
    with pytest.raises(ValueError, match="on_error must be 'raise' or 'skip'"):
        ESDataset(corpus, 4, on_error="ignore")
    with pytest.raises(TypeError, match="corpus must be an es_stream.Corpus"):
        ESDataset(str(wds_dir), 4)
    with pytest.raises(ValueError, match="rank 3 is outside world_size 2"):
        ESDataset(corpus, 4, rank=3, world_size=2)


def test_missing_shard_at_construction_is_named(wds_dir):
    corpus = Corpus.from_webdataset(str(wds_dir))
    os.remove(wds_dir / "train-000001.tar")
    with pytest.raises(ShardError, match="train-000001.tar"):
        ESDataset(corpus, 4)


def _corrupt_in_place(corpus: Corpus, shard: int) -> str:
    """Overwrite a shard's headers after indexing, keeping size and mtime: without the content
    check (see forget_content_checks), only reading finds it."""
    forget_content_checks(corpus)
    path = corpus.shards[shard].name
    st = os.stat(path)
    first = int(corpus.shard_starts[shard])
    with open(path, "r+b") as f:
        for sid in range(first + 2, first + corpus.shards[shard].num_samples):
            f.seek(int(corpus.tar.offsets[sid]))
            f.write(b"\xff" * 512)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    return path


def test_corrupt_shard_mid_epoch_raises_naming_it(wds_dir):
    corpus = Corpus.from_webdataset(str(wds_dir))
    path = _corrupt_in_place(corpus, 3)
    ds = ESDataset(corpus, 8)
    with pytest.raises(ShardError, match=f"{os.path.basename(path)} \\(sample id \\d+\\).*corrupt tar header"):
        list(ds)


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_shard_skipped_and_counted(wds_dir, workers):
    corpus = Corpus.from_webdataset(str(wds_dir))
    _corrupt_in_place(corpus, 3)
    ds = ESDataset(corpus, 8, on_error="skip")
    if workers == 0:
        with pytest.warns(RuntimeWarning, match="train-000003.tar"):
            batches = epoch_batches(ds, workers)
    else:  # the warning is raised in a worker process; the lost ids still come back
        batches = epoch_batches(ds, workers)
    got = torch.cat([mb.ids for mb in batches]).tolist()
    lost = torch.cat([mb.lost_ids for mb in batches]).tolist()
    shard3 = set(range(int(corpus.shard_starts[3]), int(corpus.shard_starts[4])))
    assert sorted(got + lost) == list(range(corpus.num_samples))  # nothing vanishes unaccounted
    assert set(lost) <= shard3 and len(lost) >= SHARD_SIZES[3] - 2
    if workers == 0:
        assert ds.samples_lost == len(lost)


def test_truncated_mds_shard_is_named(mds_dir):
    corpus = Corpus.from_mds(mds_dir)
    ds = ESDataset(corpus, 8)
    victim = mds_dir / corpus.shards[2].name
    victim.write_bytes(victim.read_bytes()[:-10])  # truncated after the epoch was planned
    with pytest.raises(StaleIndexError, match=f"{corpus.shards[2].name}: shard changed.*size"):
        list(ds)
    with pytest.raises(StaleIndexError, match=f"{corpus.shards[2].name}: shard changed"):
        ESDataset(corpus, 8)


def test_mds_remote_shards_fetched_on_first_read(mds_dir, tmp_path):
    corpus = Corpus.from_mds(tmp_path / "cache", remote=str(mds_dir))
    batches = epoch_batches(ESDataset(corpus, 8), 2)
    assert sorted(torch.cat([mb.ids for mb in batches]).tolist()) == list(range(50))
    assert all((tmp_path / "cache" / s.name).exists() for s in corpus.shards)


def test_integer_arguments_take_numpy_integers_and_name_bad_ones(wds_dir):
    corpus = Corpus.from_webdataset(str(wds_dir))
    ds = ESDataset(corpus, np.int64(8), seed=np.int32(3), block_size=np.int64(16))
    assert ds.meta_batch_size == 8 and type(ds.meta_batch_size) is int
    ids = torch.cat([mb.ids for mb in loader(ds, num_workers=0)]).numpy()
    assert np.array_equal(np.sort(ids), np.arange(corpus.num_samples))
    for bad, match in ((dict(meta_batch_size=8.0), "meta_batch_size must be an integer >= 1, got 8.0"),
                       (dict(meta_batch_size=True), "meta_batch_size must be an integer >= 1"),
                       (dict(meta_batch_size=8, seed=-1), "seed must be an integer >= 0, got -1"),
                       (dict(meta_batch_size=8, block_size=0), "block_size must be an integer >= 1")):
        with pytest.raises(ValueError, match=match):
            ESDataset(corpus, **bad)
