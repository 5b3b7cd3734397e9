"""on_error: what a bad sample or shard costs, and where it is reported — over real shards,
real DataLoader workers and two ranks."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch
import webdataset as wds
from torch._utils import ExceptionWrapper

import es_stream.errors as errors
from es_stream import Corpus, ESDataset, MetaBatch, ShardError, loader
from es_stream.dataset import webdataset_decode
from conftest import forget_content_checks, write_wds

N, SHARDS, B = 1000, 4, 32
BAD = 537  # the sample whose .json is not JSON


def write_json_shards(directory: Path, bad: int | None = BAD) -> list[str]:
    """N samples in SHARDS shards, each with a ``.json`` and a ``.cls``; sample ``bad`` gets a
    ``.json`` member that webdataset's default decoder cannot parse."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(SHARDS):
        path = str(directory / f"train-{s:06d}.tar")
        with wds.TarWriter(path) as w:
            for i in range(s * N // SHARDS, (s + 1) * N // SHARDS):
                text = b"{not json" if i == bad else json.dumps({"i": i}).encode()
                w.write({"__key__": f"sample{i:06d}", "json": text, "cls": i % 10})
        paths.append(path)
    return paths


def run(ds: ESDataset, workers: int) -> list[MetaBatch]:
    return list(loader(ds, num_workers=workers, persistent_workers=False))


def cat(batches: list[MetaBatch], field: str = "ids") -> list[int]:
    return torch.cat([getattr(mb, field) for mb in batches]).tolist()


def check_planned(batches: list[MetaBatch], clean: list[MetaBatch]) -> None:
    """Each meta-batch holds exactly its planned ids, read or lost, and read ones carry data."""
    assert len(batches) == len(clean)
    for mb, want in zip(batches, clean):
        assert sorted(mb.ids.tolist() + mb.lost_ids.tolist()) == sorted(want.ids.tolist())
        if len(mb):
            assert mb.data["cls"].tolist() == (mb.ids % 10).tolist()
        else:
            assert mb.data is None


@pytest.fixture(scope="module")
def json_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("json")
    write_json_shards(directory)
    return directory


@pytest.mark.parametrize("workers", [0, 2])
def test_one_undecodable_sample_loses_only_itself(json_dir, workers):
    ds = ESDataset(Corpus.from_webdataset(str(json_dir)), B, on_error="skip")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = run(ds, workers)
    got, lost = cat(batches), cat(batches, "lost_ids")
    assert lost == [BAD]
    assert sorted(got) == [i for i in range(N) if i != BAD]
    assert len(batches) == len(ds)
    if workers == 0:  # one warning, naming the shard and the sample; the counter agrees
        named = [w for w in caught if f"sample id {BAD}" in str(w.message)]
        assert len(named) == 1 and "train-000002.tar" in str(named[0].message)
        assert named[0].category is RuntimeWarning
        assert ds.samples_lost == 1


def test_undecodable_sample_raises_naming_it(json_dir):
    ds = ESDataset(Corpus.from_webdataset(str(json_dir)), B)
    want = f"train-000002.tar \\(sample id {BAD}\\): cannot decode.*'json'.*JSONDecodeError"
    with pytest.raises(errors.SampleError, match=want):
        run(ds, 0)


class FailOnIds:
    """A user decode that fails for some samples (picklable, for worker processes)."""

    def __init__(self, bad: set[int]) -> None:
        self.bad = bad
        self.decode = webdataset_decode()

    def __call__(self, sample: dict):
        if int(sample["__key__"][len("sample"):]) in self.bad:
            raise ValueError("bad pixels")
        return self.decode(sample)


@pytest.mark.parametrize("workers", [0, 2])
def test_lost_ids_ride_on_their_own_meta_batch_also_the_last(tmp_path, workers):
    corpus = Corpus.from_webdataset(write_json_shards(tmp_path / "j", bad=None))
    clean = run(ESDataset(corpus, B, decode=FailOnIds(set())), workers)
    bad = {int(mb.ids[0]) for mb in clean}  # one per meta-batch: every worker's last one too
    ds = ESDataset(corpus, B, decode=FailOnIds(bad), on_error="skip")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = run(ds, workers)
    check_planned(batches, clean)
    assert [mb.lost_ids.tolist() for mb in batches] == [[int(mb.ids[0])] for mb in clean]


@pytest.mark.parametrize("workers", [0, 2])
def test_deleted_shard_loses_exactly_its_samples(tmp_path, workers):
    paths = write_json_shards(tmp_path / "d", bad=None)
    corpus = Corpus.from_webdataset(paths)
    ds = ESDataset(corpus, B, on_error="skip", block_size=B)  # some meta-batches: all shard 1
    clean = run(ds, workers)
    os.remove(paths[1])  # after indexing: only reading finds out
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = run(ds, workers)
    check_planned(batches, clean)
    shard1 = list(range(int(corpus.shard_starts[1]), int(corpus.shard_starts[2])))
    assert sorted(cat(batches, "lost_ids")) == shard1
    assert sorted(cat(batches)) == sorted(set(range(N)) - set(shard1))
    assert any(len(mb) == 0 for mb in batches)  # meta-batches lost whole are still yielded
    if workers == 0:  # one warning for the shard, not one per sample
        named = [w for w in caught if "train-000001.tar" in str(w.message)]
        assert len(named) == 1 and "missing" in str(named[0].message)


@pytest.mark.parametrize("workers", [0, 2])
def test_two_ranks_equal_counts_every_id_once(tmp_path, workers):
    paths = write_json_shards(tmp_path / "r")
    corpus = Corpus.from_webdataset(paths)
    ranks = [ESDataset(corpus, B, on_error="skip", block_size=B, rank=r, world_size=2)
             for r in range(2)]
    os.remove(paths[3])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        per_rank = [run(ds, workers) for ds in ranks]
    assert len(per_rank[0]) == len(per_rank[1]) == len(ranks[0])  # DDP lockstep kept
    got = sum((cat(b) for b in per_rank), [])
    lost = sum((cat(b, "lost_ids") for b in per_rank), [])
    assert sorted(got + lost) == list(range(N))  # each id exactly once, read or lost
    shard3 = range(int(corpus.shard_starts[3]), N)
    assert sorted(lost) == sorted([BAD, *shard3])


def pipe_corpus(directory: Path) -> Corpus:
    local = Corpus.from_webdataset(write_wds(directory, sizes=(30, 40, 30)))
    return Corpus.from_webdataset([f"pipe:cat {s.name}" for s in local.shards])


@pytest.mark.parametrize("workers", [0, 2])
def test_failing_pipe_command_loses_its_shard(tmp_path, workers):
    corpus = pipe_corpus(tmp_path / "p")
    os.remove(corpus.shards[1].name[len("pipe:cat "):])  # `cat` now fails at read time
    ds = ESDataset(corpus, 8, on_error="skip")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = run(ds, workers)
    assert len(batches) == len(ds)
    assert sorted(cat(batches, "lost_ids")) == list(range(30, 70))
    assert sorted(cat(batches)) == [*range(30), *range(70, 100)]


@pytest.mark.parametrize("workers", [0, 2])
def test_failing_pipe_command_raises_shard_error_naming_it(tmp_path, workers):
    corpus = pipe_corpus(tmp_path / "p")
    corpus.shards[1] = dataclasses.replace(corpus.shards[1], name="pipe:false")
    with pytest.raises(ShardError, match="pipe:false"):
        run(ESDataset(corpus, 8), workers)


def test_shard_error_keeps_its_type_through_workers(wds_dir):
    corpus = Corpus.from_webdataset(str(wds_dir))
    ds = ESDataset(corpus, 8)
    os.remove(wds_dir / "train-000003.tar")
    with pytest.raises(ShardError, match="train-000003.tar.*missing"):
        run(ds, 2)


def test_every_error_survives_worker_reraise_and_pickle():
    """DataLoader rebuilds a worker's exception as ``type(msg)`` (RuntimeError if that fails)."""
    made = [errors.ShardError("a.tar", "corrupt", sample=3),
            errors.SampleError("a.tar", "bad", sample=4), errors.StaleIndexError("a.tar: changed"),
            errors.ManifestError("m: unfinished"), errors.ESStreamError("es: failed"),
            errors.IndexFileError("corpus.parquet: not an index"),
            errors.ScoreError("scores.npy: sample 3 is NaN"),
            errors.MissingExtraError("Reading MDS shards", "mds", "mosaicml-streaming"),
            errors.RankMismatchError("ranks disagree on seed: rank 0 has 1, rank 1 has 2")]
    defined = {c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, Exception)
               and c.__module__ == errors.__name__}
    assert {type(e) for e in made} == defined  # a new error class gets checked here too
    for exc in made:
        try:
            raise exc
        except Exception:
            wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
        with pytest.raises(Exception, match="in DataLoader worker process 0") as info:
            wrapped.reraise()
        assert type(info.value) is type(exc) and str(exc) in str(info.value)
        back = pickle.loads(pickle.dumps(exc))
        assert type(back) is type(exc) and str(back) == str(exc)
        assert getattr(back, "sample", None) == getattr(exc, "sample", None)


def write_field_shards(directory: Path, missing: set[int]) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    path = str(directory / "train-000000.tar")
    with wds.TarWriter(path) as w:
        for i in range(24):
            sample = {"__key__": f"sample{i:06d}", "txt": f"t{i}"}
            if i not in missing:
                sample["cls"] = i % 10
            w.write(sample)
    return [path]


# odd sample first in its meta-batch (the field was dropped) or later (a bare KeyError)
@pytest.mark.parametrize("odd", [0, 5])
def test_missing_field_raises_naming_sample_and_field(tmp_path, odd):
    corpus = Corpus.from_webdataset(write_field_shards(tmp_path / "f", {odd}))
    ds = ESDataset(corpus, 8, shuffle=False)
    with pytest.raises(ShardError, match=f"train-000000.tar \\(sample id {odd}\\).*sample{odd:06d}"
                       ".*missing \\['cls'\\]"):
        run(ds, 0)


@pytest.mark.parametrize("workers", [0, 2])
def test_missing_field_skipped_and_reported(tmp_path, workers):
    corpus = Corpus.from_webdataset(write_field_shards(tmp_path / "f", {0, 13}))
    ds = ESDataset(corpus, 8, shuffle=False, on_error="skip")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = run(ds, workers)
    assert sorted(cat(batches, "lost_ids")) == [0, 13]
    assert sorted(cat(batches)) == [i for i in range(24) if i not in (0, 13)]
    for mb in batches:  # no meta-batch lost the field
        assert mb.data["cls"].tolist() == (mb.ids % 10).tolist()


def test_mds_undecodable_sample_loses_only_itself(tmp_path):
    from streaming import MDSWriter

    out = tmp_path / "mds"
    with MDSWriter(out=str(out), columns={"j": "json", "cls": "int"}, size_limit=1 << 10) as w:
        for i in range(60):
            w.write({"j": {"i": i}, "cls": i % 10})
    corpus = Corpus.from_mds(out)
    forget_content_checks(corpus)  # so that only decoding finds the change below
    path = next(out / s.name for s in corpus.shards if b'{"i": 7}' in (out / s.name).read_bytes())
    st = os.stat(path)
    data = path.read_bytes()
    path.write_bytes(data.replace(b'{"i": 7}', b'x"i": 7}'))  # same size: only decoding finds it
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    ds = ESDataset(corpus, 8, on_error="skip")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = run(ds, 2)
    assert cat(batches, "lost_ids") == [7]
    assert sorted(cat(batches)) == [i for i in range(60) if i != 7]
