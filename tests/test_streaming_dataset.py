"""ESStreamingDataset: streaming's StreamingDataset over real MDS shards (streaming.MDSWriter), with
es-stream ids, pruning manifests skipped in the epoch plan, len under pruning, and streaming's
deterministic mid-epoch resume on a pruned epoch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("streaming")

import es_stream as es  # noqa: E402
from es_stream.integrations.streaming_dataset import ESStreamingDataset  # noqa: E402

N = 150


def write_corpus(directory: Path, n: int = N) -> Path:
    from streaming import MDSWriter

    rng = np.random.default_rng(0)
    # small size_limit: many shards of unequal fill, so ids must be shard offset + position
    with MDSWriter(out=str(directory), columns={"x": "ndarray:float32:8", "idx": "int"},
                   size_limit=700) as w:
        for i in range(n):
            w.write({"x": rng.normal(size=8).astype(np.float32), "idx": i})
    return directory


def prune(corpus: es.Corpus, manifests: Path, epoch: int, ratio: float = 0.6) -> np.ndarray:
    store = es.ScoreStore(corpus.num_samples)
    store.write_range(0, np.random.default_rng(epoch).random(corpus.num_samples).astype(np.float32))
    policy = es.ESWPPolicy(ratio=ratio, burn_in_epochs=0, anneal=0.0)
    es.Pruner(corpus, store, policy, manifests).write(epoch, 10)
    keep = es.manifest.read_epoch(manifests, epoch, corpus.fingerprint, corpus.shard_counts)
    return keep.kept_ids


def epoch_ids(dataset, num_workers: int = 0, batch_size: int = 16, stop: int | None = None):
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    out = []
    for i, batch in enumerate(loader):
        if stop is not None and i == stop:
            break
        assert torch.equal(batch["es_id"], batch["idx"])  # the id is the sample's own index
        out.append(batch["es_id"].tolist())
    return out


class RecordingDataset(ESStreamingDataset):
    """Records every sample read (main-process iteration only)."""

    read: list[int] = []

    def get_item(self, sample_id: int, retry: int = 7):
        self.read.append(int(sample_id))
        return super().get_item(sample_id, retry)


@pytest.fixture
def mds(tmp_path: Path) -> Path:
    return write_corpus(tmp_path / "mds")


def test_ids_match_es_stream_corpus_ids(mds: Path):
    corpus = es.Corpus.from_mds(mds)
    assert corpus.num_shards > 5 and len(set(corpus.shard_counts.tolist())) > 1
    ds = ESStreamingDataset(local=mds, batch_size=16, shuffle=True, shuffle_seed=1)
    reader = es.sources.open_reader(corpus)
    for sample_id in (0, 7, 58, N - 1):
        sample = ds[sample_id]
        assert sample["es_id"] == sample_id
        shard, position = corpus.locate([sample_id])
        np.testing.assert_array_equal(reader.read(int(shard[0]), int(position[0]), sample_id)["x"],
                                      sample["x"])
    batches = epoch_ids(ds, num_workers=2)
    assert sorted(sum(batches, [])) == list(range(N))
    assert len(ds) == N


def test_pruned_epoch_plans_only_kept_ids_and_len_follows(mds: Path, tmp_path: Path):
    corpus = es.Corpus.from_mds(mds)
    kept = prune(corpus, tmp_path / "manifests", epoch=1)
    assert len(kept) == int(np.ceil(0.4 * N))
    ds = RecordingDataset(local=mds, batch_size=16, shuffle=True, manifests=tmp_path / "manifests")
    assert len(ds) == N  # epoch 0 has no manifest: everything
    first = sum(epoch_ids(ds), [])
    assert sorted(first) == list(range(N))
    assert len(ds) == len(kept)  # the next iteration runs epoch 1
    ds.read.clear()
    second = sum(epoch_ids(ds), [])
    assert sorted(second) == kept.tolist()
    assert sorted(ds.read) == kept.tolist()  # pruned samples were never read
    assert len(ds) == N  # epoch 2: no manifest


def test_mid_epoch_resume_on_a_pruned_epoch_is_exact(mds: Path, tmp_path: Path):
    corpus = es.Corpus.from_mds(mds)
    prune(corpus, tmp_path / "manifests", epoch=1)
    args = dict(batch_size=8, shuffle=True, shuffle_seed=5, manifests=tmp_path / "manifests")
    ds = ESStreamingDataset(local=mds, **args)
    epoch_ids(ds, batch_size=8)
    full = epoch_ids(ds, batch_size=8)  # epoch 1, pruned
    ds2 = ESStreamingDataset(local=mds, **args)
    epoch_ids(ds2, batch_size=8)
    head = epoch_ids(ds2, batch_size=8, stop=3)
    assert head == full[:3]
    state = ds2.state_dict(num_samples=3 * 8, from_beginning=True)
    assert state["epoch"] == 1 and state["sample_in_epoch"] == 24
    del ds, ds2
    ds3 = ESStreamingDataset(local=mds, **args)
    ds3.load_state_dict(state)
    assert len(ds3) == len(sum(full, []))  # the resumed epoch's (pruned) length
    assert epoch_ids(ds3, num_workers=2, batch_size=8) == full[3:]


def test_epoch_end_state_names_the_next_epoch(mds: Path):
    """Composer checkpoints at an epoch end with its epoch already advanced and
    sample_in_epoch 0: the state must resume the next epoch, not replay the finished one."""
    ds = ESStreamingDataset(local=mds, batch_size=16, shuffle=True)
    first = epoch_ids(ds)
    state = ds.state_dict(0, True)
    assert state["epoch"] == 1 and state["sample_in_epoch"] == 0
    second = epoch_ids(ds)
    del ds
    ds2 = ESStreamingDataset(local=mds, batch_size=16, shuffle=True)
    ds2.load_state_dict(state)
    assert ds2.state_dict(0, True)["epoch"] == 1  # loaded, not started: unchanged
    resumed = epoch_ids(ds2)
    assert resumed == second != first


def test_refused_arguments_and_errors(mds: Path, tmp_path: Path):
    with pytest.raises(ValueError, match="epoch_size"):
        ESStreamingDataset(local=mds, batch_size=8, epoch_size=50)
    with pytest.raises(ValueError, match="batching_method"):
        ESStreamingDataset(local=mds, batch_size=8, batching_method="stratified")
    ds = ESStreamingDataset(local=mds, batch_size=8, id_key="idx")
    with pytest.raises(ValueError, match="already has a column 'idx'"):
        ds[0]
    del ds
    other = write_corpus(tmp_path / "other", n=40)
    prune(es.Corpus.from_mds(other), tmp_path / "foreign", epoch=0)
    ds = ESStreamingDataset(local=mds, batch_size=8, manifests=tmp_path / "foreign")
    with pytest.raises(es.ManifestError, match="corpus"):
        len(ds)
