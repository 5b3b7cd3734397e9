"""MixedDataset: several real corpora (webdataset tar and MDS) in chosen proportions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from conftest import payload
from es_stream import Corpus, ESDataset, loader
from es_stream.mixing import MixedDataset, mix_counts, mix_order, mix_share_ids

HERE = Path(__file__).parent


# ------------------------------------------------------------------------------ pure planning
def test_mix_counts_largest_remainder():
    assert mix_counts([50, 50], [0.7, 0.3], 100).tolist() == [70, 30]
    # 42.7 and 18.3: floors 42 + 18, the one left goes to the larger fraction
    assert mix_counts([50, 50], [0.7, 0.3], 61).tolist() == [43, 18]
    assert mix_counts([9, 9, 9], [1, 1, 1], 4).tolist() == [2, 1, 1]  # tie: lower index
    assert mix_counts([9, 9], [7, 3], 10).tolist() == [7, 3]  # weights are normalised
    with pytest.raises(ValueError, match="one number per corpus"):
        mix_counts([9, 9], [1], 10)
    with pytest.raises(ValueError, match=">= 0"):
        mix_counts([9, 9], [1, -1], 10)
    with pytest.raises(ValueError, match="corpus 1 has no samples"):
        mix_counts([9, 0], [1, 1], 10)


def test_mix_share_ids_repeat_and_choose():
    once = mix_share_ids(50, 20, seed=1, epoch=0, corpus=0)
    assert len(once) == 20 == len(set(once.tolist())) and once.max() < 50
    assert not np.array_equal(once, mix_share_ids(50, 20, seed=1, epoch=1, corpus=0))
    np.testing.assert_array_equal(once, mix_share_ids(50, 20, seed=1, epoch=0, corpus=0))
    twice = np.bincount(mix_share_ids(5, 12, seed=1, epoch=0, corpus=0), minlength=5)
    assert twice.sum() == 12 and set(twice.tolist()) == {2, 3}  # floor or ceil of 12/5


def test_mix_order_counts_and_determinism():
    order = mix_order([5, 2, 0, 3], seed=4, epoch=2)
    assert np.bincount(order, minlength=4).tolist() == [5, 2, 0, 3]
    np.testing.assert_array_equal(order, mix_order([5, 2, 0, 3], seed=4, epoch=2))


# ------------------------------------------------------------------------------ real corpora
@pytest.fixture
def corpora(wds_dir, mds_dir):
    return Corpus.from_webdataset(str(wds_dir)), Corpus.from_mds(mds_dir)  # 50 and 50 samples


def _mix(corpora, proportions=(0.7, 0.3), epoch_size=60, b=4, **kw):
    parts = [ESDataset(c, b, seed=3, rank=kw.pop("rank", 0), world_size=kw.pop("world_size", 1))
             for c in corpora]
    return MixedDataset(parts, proportions, epoch_size=epoch_size, seed=5, **kw)


def _check_data(mix, mb):
    """Each sample's bytes are those of the sample its id names."""
    corpus, local = mix.corpus_of(mb.ids)
    assert len(set(corpus.tolist())) == 1  # one corpus per meta-batch
    if corpus[0] == 0:
        assert list(mb.data["bin"]) == [payload(i) for i in local.tolist()]
    else:
        assert mb.data["idx"].tolist() == local.tolist()
        assert list(mb.data["bin"]) == [payload(i) for i in local.tolist()]


def _epoch(mix, epoch, workers=0):
    mix.set_epoch(epoch)
    out = []
    for mb in loader(mix, num_workers=workers):
        _check_data(mix, mb)
        out.append(mb)
    return out


def test_proportions_exact_counts_once_within_share(corpora):
    mix = _mix(corpora)  # 0.7 and 0.3 of 60: 42 and 18 samples
    assert mix.offsets.tolist() == [0, 50, 100] and mix.num_samples == 100
    shares = []
    for epoch in range(2):
        ids = np.concatenate([mb.ids.numpy() for mb in _epoch(mix, epoch)])
        corpus, local = mix.corpus_of(ids)
        assert np.bincount(corpus, minlength=2).tolist() == [42, 18]
        for c in range(2):  # exactly once within each share, nothing else of that corpus
            assert len(set(local[corpus == c].tolist())) == (42, 18)[c]
        shares.append(set(ids.tolist()))
    assert shares[0] != shares[1]  # each epoch draws its own share
    again = np.concatenate([mb.ids.numpy() for mb in _epoch(_mix(corpora), 0)])
    assert set(again.tolist()) == shares[0]  # deterministic per seed and epoch


def test_share_larger_than_corpus_repeats(corpora):
    mix = _mix(corpora, epoch_size=None)  # default size 100: 70 of a 50-sample corpus
    ids = np.concatenate([mb.ids.numpy() for mb in _epoch(mix, 0)])
    corpus, local = mix.corpus_of(ids)
    per_sample = np.bincount(local[corpus == 0], minlength=50)
    assert per_sample.sum() == 70 and set(per_sample.tolist()) == {1, 2}
    assert sorted(local[corpus == 1].tolist()) == sorted(set(local[corpus == 1].tolist()))
    assert len(local[corpus == 1]) == 30


def test_set_proportions_next_epoch(corpora):
    mix = _mix(corpora)
    _epoch(mix, 0)
    mix.set_proportions([1, 1])
    np.testing.assert_allclose(mix.proportions, [0.5, 0.5])
    corpus, _ = mix.corpus_of(np.concatenate([mb.ids.numpy() for mb in _epoch(mix, 1)]))
    assert np.bincount(corpus).tolist() == [30, 30]
    assert mix.state_dict()["proportions"] == [1.0, 1.0]


@pytest.mark.parametrize("workers,stop_after", [(0, 5), (2, 7)])
def test_resume_bit_identical(corpora, workers, stop_after):
    full_mix = _mix(corpora)
    full_mix.set_proportions([0.6, 0.4])  # the state carries the proportions in force
    full = _epoch(full_mix, 1, workers)
    mix = _mix(corpora)
    mix.set_proportions([0.6, 0.4])
    mix.set_epoch(1)
    it = iter(loader(mix, num_workers=workers))
    head = [next(it) for _ in range(stop_after)]
    state = mix.state_dict()
    del it
    assert state["batches"] == stop_after and state["epoch"] == 1
    resumed_mix = _mix(corpora)  # built anew with the first proportions: the state restores them
    resumed_mix.load_state_dict(state)
    rest = _epoch(resumed_mix, 1, workers)
    assert len(head) + len(rest) == len(full)
    for a, b in zip(head + rest, full):
        assert a.ids.tolist() == b.ids.tolist()
        assert list(a.data["bin"]) == list(b.data["bin"])


def test_state_of_another_mix_refused(corpora):
    state = _mix(corpora).state_dict()
    other = _mix(corpora[::-1])
    with pytest.raises(ValueError, match="cannot resume"):
        other.load_state_dict(state)


def test_datasets_must_agree(corpora):
    a, b = (ESDataset(c, 4) for c in corpora)
    with pytest.raises(ValueError, match="meta_batch_size"):
        MixedDataset([a, ESDataset(corpora[1], 5)])
    with pytest.raises(TypeError):
        MixedDataset([])
    # default: each sample once; each corpus is planned alone, so each has its own short tail
    assert len(MixedDataset([a, b])) == 2 * -(-50 // 4)


def test_two_gloo_ranks_disjoint(corpora, tmp_path):
    from test_distributed import free_port

    paths = [tmp_path / "wds.parquet", tmp_path / "mds.parquet"]
    for c, p in zip(corpora, paths):
        c.save(p)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               WORLD_SIZE="2", OMP_NUM_THREADS="1")
    procs = []
    for rank in range(2):
        out = tmp_path / f"rank{rank}.json"
        procs.append((out, subprocess.Popen(
            [sys.executable, str(HERE / "_dist_mix.py"), str(paths[0]), str(paths[1]), "4", "2",
             "60", str(out)], env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)))))
    for _, p in procs:
        assert p.wait(timeout=240) == 0, "a rank failed or hung (unequal step counts?)"
    records = [json.loads(out.read_text()) for out, _ in procs]
    single = _mix(corpora)  # the same share, planned in one process
    for epoch in range(2):
        per_rank = [r["epochs"][epoch] for r in records]
        assert len(per_rank[0]) == len(per_rank[1])  # equal steps
        ids = [i for batches in per_rank for batch in batches for i in batch]
        assert len(ids) == len(set(ids)) == 60  # disjoint ranks, none twice
        assert Counter(int(i >= 50) for i in ids) == {0: 42, 1: 18}
        single.set_epoch(epoch)
        expected = np.concatenate([mb.ids.numpy() for mb in loader(single, num_workers=0)])
        assert sorted(ids) == sorted(expected.tolist())  # the share does not depend on ranks


def test_pruning_manifest_honoured_per_corpus(corpora, tmp_path):
    import pyarrow.dataset as pads
    import torch

    from es_stream import ESWPPolicy, Pruner, ScoreStore

    wds_corpus, mds_corpus = corpora
    store = ScoreStore(wds_corpus.num_samples)  # the manifest is in the corpus's own ids
    store.scatter(torch.arange(50), torch.rand(50, generator=torch.Generator().manual_seed(0)))
    Pruner(wds_corpus, store, ESWPPolicy(ratio=0.5, burn_in_epochs=0, anneal=0.0),
           tmp_path / "m").on_epoch_end(0, 4)
    table = pads.dataset(str(tmp_path / "m" / "epoch=00001")).to_table()
    kept = set(np.asarray(table.column("id"))[np.asarray(table.column("keep"))].tolist())
    assert 0 < len(kept) < 50
    parts = [ESDataset(wds_corpus, 4, seed=3, manifests=tmp_path / "m"), ESDataset(mds_corpus, 4)]
    mix = MixedDataset(parts, (0.5, 0.5), seed=5)  # default size: kept + 50
    ids = np.concatenate([mb.ids.numpy() for mb in _epoch(mix, 1)])
    corpus, local = mix.corpus_of(ids)
    total = len(kept) + 50
    assert np.bincount(corpus).tolist() == mix_counts([len(kept), 50], [0.5, 0.5], total).tolist()
    assert set(local[corpus == 0].tolist()) <= kept  # pruned samples never drawn
    assert len(set(local[corpus == 0].tolist())) == min(len(kept), int((corpus == 0).sum()))
