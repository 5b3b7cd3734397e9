"""Exact mid-epoch resume: the DataLoader's order checked against the real thing, then
``ESDataset.state_dict``/``load_state_dict`` through real workers over real shards."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

import es_stream.sources.mds as mds_source
from es_stream import Corpus, ESDataset, InfoBatchPolicy, Pruner, ScoreStore, loader
from es_stream.plan import (EpochPlan, loader_order, rank_loader_order, worker_batch_range,
                            worker_resume, worker_skips)
from conftest import payload, write_wds

B = 4  # 50 samples -> 13 meta-batches: runs of 4/4/5 with 3 workers, 6/7 with 2


# ----------------------------------------------------------------- the DataLoader's order
class _Tagged(IterableDataset):
    """Worker w yields (w, 0), (w, 1), .. (w, counts[w]-1); counts live in shared memory so one
    persistent loader serves many cases."""

    def __init__(self, num_workers: int) -> None:
        self.counts = torch.zeros(num_workers, dtype=torch.int64).share_memory_()

    def __iter__(self):
        info = get_worker_info()
        for j in range(int(self.counts[info.id])):
            yield info.id, j


@pytest.mark.parametrize("workers", [2, 3])
def test_dataloader_yields_round_robin_dropping_exhausted_workers(workers):
    ds = _Tagged(workers)
    dl = DataLoader(ds, batch_size=None, num_workers=workers, persistent_workers=True)
    cases = [[3, 1, 5][:workers], [0, 4, 2][:workers], [5, 0, 0][:workers], [1, 1, 1][:workers]]
    cases += [[stop - first for first, stop in (worker_batch_range(n, workers, w)
                                                for w in range(workers))] for n in (1, 2, 7, 13, 14)]
    for counts in cases:  # the same loader again and again: every iteration restarts at worker 0
        ds.counts.copy_(torch.tensor(counts))
        got = [(int(w), int(j)) for w, j in dl]
        expected = loader_order(counts)
        assert [w for w, _ in got] == expected.tolist(), counts
        assert [j for w, j in got] == [int((expected[:i] == w).sum()) for i, w in enumerate(expected)]
    for n in (1, 2, 7, 13, 14):
        ds.counts.copy_(torch.tensor([stop - first for first, stop in (
            worker_batch_range(n, workers, w) for w in range(workers))]))
        assert [int(w) for w, _ in dl] == rank_loader_order(n, workers).tolist()


# ----------------------------------------------------------------- pure functions
def test_loader_order_and_worker_skips_examples():
    assert loader_order([3, 1, 5]).tolist() == [0, 1, 2, 0, 2, 0, 2, 2, 2]
    assert loader_order([3, 1, 5], start=2).tolist() == [2, 0, 1, 2, 0, 2, 0, 2, 2]
    assert loader_order([]).tolist() == []
    # 7 meta-batches, 3 workers: runs [0,2) [2,4) [4,7), yielded 0 1 2 0 1 2 2
    assert rank_loader_order(7, 3).tolist() == [0, 1, 2, 0, 1, 2, 2]
    assert worker_skips(7, 3, 0).tolist() == [0, 0, 0]
    assert worker_skips(7, 3, 4).tolist() == [2, 1, 1]
    assert worker_skips(7, 3, 7).tolist() == [2, 2, 3]
    assert worker_skips(5, 1, 3).tolist() == [3]
    assert worker_skips(0, 2, 0).tolist() == [0, 0]


@pytest.mark.parametrize("workers", [1, 2, 3, 4, 5])
def test_worker_skips_are_counts_of_the_prefix(workers):
    for n in range(0, 30):
        runs = np.array([stop - first for first, stop in (worker_batch_range(n, workers, w)
                                                          for w in range(workers))])
        previous = np.zeros(workers, dtype=np.int64)
        for k in range(n + 1):
            skips = worker_skips(n, workers, k)
            assert skips.sum() == k and (skips <= runs).all() and (skips >= previous).all()
            previous = skips
        assert np.array_equal(previous, runs)


@pytest.mark.parametrize("workers", [1, 2, 3, 4, 5])
def test_worker_resume_continues_the_uninterrupted_order(workers):
    for n in range(0, 30):
        order = rank_loader_order(n, workers)
        position = [np.flatnonzero(order == w) for w in range(workers)]  # where each run's items go
        for k in range(n + 1):
            resumed = [worker_resume(n, workers, k, p) for p in range(workers)]
            counts = [len(position[run]) - skip for run, skip in resumed]
            # a DataLoader over the resumed workers, each yielding (run, index in run) in order
            got, taken = [], [0] * workers
            for p in loader_order(counts):
                run, skip = resumed[p]
                got.append(position[run][skip + taken[p]])
                taken[p] += 1
            assert got == list(range(k, n)), (n, k)
            assert sorted(run for run, _ in resumed) == list(range(workers))
            assert [skip for _, skip in sorted(resumed)] == worker_skips(n, workers, k).tolist()


def test_skipping_without_rotating_would_change_the_order():
    # 2 workers x 3 meta-batches, 1 consumed: worker 1 is next, but a DataLoader starts at 0
    order = rank_loader_order(6, 2)
    remaining = 3 - worker_skips(6, 2, 1)
    assert loader_order(remaining).tolist() != order[1:].tolist()
    assert worker_resume(6, 2, 1, 0) == (1, 0) and worker_resume(6, 2, 1, 1) == (0, 1)


@pytest.mark.parametrize("call,match", [
    (lambda: worker_skips(5, 2, -1), r"consumed=-1 meta-batches is outside \[0, num_batches=5\]"),
    (lambda: worker_skips(5, 2, 6), r"consumed=6 meta-batches is outside \[0, num_batches=5\]"),
    (lambda: worker_skips(5, 0, 1), "num_workers must be >= 1"),
    (lambda: worker_skips(-1, 2, 0), "num_batches must be >= 0"),
    (lambda: worker_resume(5, 2, 1, 2), "worker 2 is outside num_workers 2"),
    (lambda: loader_order([2, -1]), "counts must be a 1-d array of non-negative"),
    (lambda: loader_order([2, 1], start=2), r"start must be a worker in \[0, 2\)"),
    (lambda: EpochPlan((5, 6), meta_batch_size=2, seed=0, epoch=0).worker_batches(2, 0, skip=4),
     r"skip=4 is outside \[0, 3\] meta-batches of worker 0"),
])
def test_bad_resume_arguments_are_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_worker_batches_skip_is_the_tail():
    plan = EpochPlan((7, 13, 1, 20, 9), meta_batch_size=4, seed=3, epoch=2)
    full = plan.worker_batches(3, 2)
    for skip in range(len(full) + 1):
        tail = plan.worker_batches(3, 2, skip)
        assert len(tail) == len(full) - skip
        assert all(np.array_equal(a, b) for a, b in zip(tail, full[skip:]))


# ----------------------------------------------------------------- ESDataset through loaders
def corpus_of(kind, wds_dir, mds_dir) -> Corpus:
    return Corpus.from_webdataset(str(wds_dir)) if kind == "wds" else Corpus.from_mds(mds_dir)


def content(mb) -> tuple:
    """Everything a meta-batch carries, comparable with ==."""
    key = mb.data["__key__"] if "__key__" in mb.data else mb.data["idx"].tolist()
    return (mb.ids.tolist(), mb.epoch, mb.data["cls"].tolist(), list(mb.data["bin"]), list(key),
            None if mb.weights is None else mb.weights.tolist())


def check_data(batches) -> None:
    for mb in batches:
        assert list(mb.data["bin"]) == [payload(i) for i in mb.ids.tolist()]


def run_recording_states(ds, dl, epoch):
    """One uninterrupted epoch through ``dl``, with ``state_dict(k)`` after every k."""
    ds.set_epoch(epoch)
    batches, states = [], [ds.state_at(0)]
    for mb in dl:
        batches.append(content(mb))
        states.append(ds.state_at(len(batches)))
    assert len(batches) == len(ds)
    return batches, states


def cuts(n):
    return sorted({0, 1, 2, n // 2, n - 1, n})


@pytest.mark.parametrize("kind", ["wds", "mds"])
@pytest.mark.parametrize("workers", [0, 2, 3])
def test_resume_in_a_fresh_dataset(kind, workers, wds_dir, mds_dir):
    corpus = corpus_of(kind, wds_dir, mds_dir)
    ds = ESDataset(corpus, B, seed=7)
    ref, states = run_recording_states(ds, loader(ds, num_workers=workers), epoch=1)
    n = len(ref)
    assert n == 13
    assert all(s["num_workers"] == max(workers, 1) for s in states[1:])
    assert [s["batches"] for s in states] == list(range(n + 1))
    for k in cuts(n):
        fresh = ESDataset(corpus_of(kind, wds_dir, mds_dir), B, seed=7)  # a new process's view
        fresh.load_state_dict(states[k])
        assert fresh.epoch == 1
        got = list(loader(fresh, num_workers=workers))
        check_data(got)
        assert [content(mb) for mb in got] == ref[k:], k


@pytest.mark.parametrize("kind", ["wds", "mds"])
@pytest.mark.parametrize("workers", [0, 2, 3])
def test_resume_in_an_already_iterated_persistent_loader(kind, workers, wds_dir, mds_dir):
    corpus = corpus_of(kind, wds_dir, mds_dir)
    ds = ESDataset(corpus, B, seed=3)
    dl = loader(ds, num_workers=workers)
    ref, states = run_recording_states(ds, dl, epoch=2)
    next_epoch = run_recording_states(ds, dl, epoch=3)[0]
    for k in reversed(cuts(len(ref))):  # workers are running; they see the resume point
        ds.load_state_dict(states[k])
        ds.set_epoch(2)  # the usual loop re-selects the epoch: that keeps the resume point
        assert [content(mb) for mb in dl] == ref[k:], k
    # the resume point holds for the resumed epoch only
    ds.load_state_dict(states[5])
    ds.set_epoch(3)
    assert [content(mb) for mb in dl] == next_epoch
    ds.set_epoch(2)
    assert [content(mb) for mb in dl] == ref


@pytest.mark.parametrize("workers", [2, 3])
def test_resume_mid_iteration_then_the_next_epochs_are_unchanged(workers, wds_dir):
    corpus = Corpus.from_webdataset(str(wds_dir))
    ds = ESDataset(corpus, B, seed=1)
    dl = loader(ds, num_workers=workers)
    epochs = [run_recording_states(ds, dl, epoch=e)[0] for e in range(2)]
    # the interrupted run: 5 meta-batches of epoch 0, then a checkpoint
    ds.set_epoch(0)
    it = iter(dl)
    first = [content(next(it)) for _ in range(5)]
    state = ds.state_at(5)
    del it
    assert first == epochs[0][:5]
    fresh = ESDataset(corpus, B, seed=1)
    fresh.load_state_dict(state)
    dl2 = loader(fresh, num_workers=workers)
    seen = []
    for epoch in range(fresh.epoch, 2):  # a trainer's loop after the restart
        fresh.set_epoch(epoch)
        seen.append([content(mb) for mb in dl2])
    assert first + seen[0] == epochs[0] and seen[1] == epochs[1]
    # a state taken after the resume counts from the epoch's start
    fresh.set_epoch(0)
    fresh.load_state_dict(state)
    it = iter(dl2)
    more = [content(next(it)) for _ in range(3)]
    again = ESDataset(corpus, B, seed=1)
    again.load_state_dict(fresh.state_at(8))
    assert more == epochs[0][5:8]
    assert [content(mb) for mb in loader(again, num_workers=workers)] == epochs[0][8:]


def test_state_at_the_epoch_end_resumes_to_nothing(wds_dir):
    corpus = Corpus.from_webdataset(str(wds_dir))
    ds = ESDataset(corpus, B)
    ref = [content(mb) for mb in ds]
    state = ds.state_at(len(ds))
    assert state["batches"] == state["epoch_batches"] == 13
    fresh = ESDataset(corpus, B)
    fresh.load_state_dict(state)
    assert list(fresh) == []
    fresh.set_epoch(state["epoch"] + 1)
    after = [content(mb) for mb in fresh]
    ds.set_epoch(1)
    assert after == [content(mb) for mb in ds] and after != ref


def test_state_before_any_iteration(wds_dir):
    corpus = Corpus.from_webdataset(str(wds_dir))
    ds = ESDataset(corpus, B, seed=4)
    ds.set_epoch(3)
    state = ds.state_at(0)
    assert state == {"epoch": 3, "batches": 0, "epoch_batches": 13, "num_workers": 0,
                     "corpus_fingerprint": corpus.fingerprint, "world_size": 1, "seed": 4,
                     "meta_batch_size": B, "shuffle": True, "drop_last": False,
                     "block_size": 1 << 18}
    fresh = ESDataset(corpus, B, seed=4)
    fresh.load_state_dict(state)
    assert fresh.epoch == 3
    # nothing consumed: any number of workers will do
    assert ([content(mb) for mb in loader(fresh, num_workers=3)]
            == [content(mb) for mb in loader(ds, num_workers=3)])


@pytest.mark.parametrize("workers", [0, 3])
def test_skipped_meta_batches_are_neither_read_nor_decoded(workers, mds_dir, tmp_path, monkeypatch):
    log = tmp_path / "log.txt"  # appended by the (forked) workers too

    def recording(cls):
        real = cls.read

        def read(self, shard, position, sample_id):
            with open(log, "a") as f:
                f.write(f"read {sample_id}\n")
            return real(self, shard, position, sample_id)
        monkeypatch.setattr(cls, "read", read)

    def decode(sample):
        with open(log, "a") as f:
            f.write(f"decode {int(sample['idx'])}\n")
        return sample

    recording(mds_source.MDSShardReader)
    corpus = Corpus.from_mds(mds_dir)
    ds = ESDataset(corpus, B, decode=decode, seed=2)
    ref, states = run_recording_states(ds, loader(ds, num_workers=workers), epoch=0)
    log.write_text("")
    fresh = ESDataset(corpus, B, decode=decode, seed=2)
    fresh.load_state_dict(states[6])
    got = list(loader(fresh, num_workers=workers))
    assert [content(mb) for mb in got] == ref[6:]
    wanted = sorted(i for mb in ref[6:] for i in mb[0])
    lines = log.read_text().split()
    assert sorted(int(v) for kind, v in zip(lines[::2], lines[1::2]) if kind == "read") == wanted
    assert sorted(int(v) for kind, v in zip(lines[::2], lines[1::2]) if kind == "decode") == wanted


@pytest.mark.parametrize("workers", [2, 3])
def test_resume_a_manifest_pruned_epoch(workers, wds_dir, tmp_path):
    corpus = Corpus.from_webdataset(str(wds_dir))
    store = ScoreStore(corpus.num_samples)
    store.scatter(torch.arange(corpus.num_samples),
                  torch.from_numpy(np.random.default_rng(0).random(corpus.num_samples).astype(np.float32)))
    Pruner(corpus, store, InfoBatchPolicy(ratio=0.5, anneal=0.0), tmp_path / "m").on_epoch_end(0, 4)
    ds = ESDataset(corpus, B, manifests=tmp_path / "m")
    ref, states = run_recording_states(ds, loader(ds, num_workers=workers), epoch=1)
    assert len(ref) < 13 and all(mb[-1] is not None for mb in ref)  # pruned, with weights
    for k in cuts(len(ref)):
        fresh = ESDataset(corpus, B, manifests=tmp_path / "m")
        fresh.load_state_dict(states[k])
        assert [content(mb) for mb in loader(fresh, num_workers=workers)] == ref[k:], k
    # the manifest of the resumed epoch rewritten since: refused
    Pruner(corpus, ScoreStore(corpus.num_samples), InfoBatchPolicy(ratio=0.1, anneal=0.0),
           tmp_path / "m", overwrite=True).on_epoch_end(0, 4)
    with pytest.raises(ValueError, match=f"epoch 1 had {len(ref)} meta-batches when the state was "
                                         r"taken \(batches=3\) and has 1[0-9] now; was its pruning "
                                         "manifest rewritten"):
        ESDataset(corpus, B, manifests=tmp_path / "m").load_state_dict(states[3])


# ----------------------------------------------------------------- errors
@pytest.fixture
def state_after_5(wds_dir):
    corpus = Corpus.from_webdataset(str(wds_dir))
    ds = ESDataset(corpus, B, seed=9)
    return corpus, run_recording_states(ds, loader(ds, num_workers=2), epoch=1)[1][5]


@pytest.mark.parametrize("kwargs,match", [
    (dict(seed=8), "the state has seed=9, this dataset seed=8; build the ESDataset with seed=9"),
    (dict(meta_batch_size=5), "the state has meta_batch_size=4, this dataset meta_batch_size=5; "
                              "build the ESDataset with meta_batch_size=4"),
    (dict(rank=0, world_size=2), "the state has world_size=1, this dataset world_size=2; exact "
                                 "resume needs the same ranks: run with world_size=1"),
    (dict(shuffle=False), "the state has shuffle=True, this dataset shuffle=False"),
    (dict(drop_last=True), "the state has drop_last=False, this dataset drop_last=True"),
    (dict(block_size=16), "the state has block_size=262144, this dataset block_size=16"),
])
def test_state_for_other_arguments_is_refused(state_after_5, kwargs, match):
    corpus, state = state_after_5
    args = dict(seed=9, meta_batch_size=B) | kwargs
    ds = ESDataset(corpus, args.pop("meta_batch_size"), **args)
    with pytest.raises(ValueError, match="cannot resume: " + match):
        ds.load_state_dict(state)


def test_state_for_another_corpus_is_refused(state_after_5, tmp_path):
    corpus, state = state_after_5
    other = Corpus.from_webdataset(write_wds(tmp_path / "other", sizes=(10, 40)))
    with pytest.raises(ValueError, match=f"the state has corpus_fingerprint='{corpus.fingerprint}', "
                                         f"this dataset corpus_fingerprint='{other.fingerprint}'; "
                                         "the shards changed; resume only over the corpus"):
        ESDataset(other, B, seed=9).load_state_dict(state)


def test_missing_fields_are_named(state_after_5):
    corpus, state = state_after_5
    partial = {k: v for k, v in state.items() if k not in ("batches", "seed")}
    with pytest.raises(ValueError, match=r"not an ESDataset state: missing \['batches', 'seed'\]"):
        ESDataset(corpus, B, seed=9).load_state_dict(partial)


@pytest.mark.parametrize("workers,message", [
    (3, "the state was taken with num_workers=2 and this DataLoader has num_workers=3"),
    (0, "the state was taken with num_workers=2 and this DataLoader has num_workers=0 or 1"),
    (1, "the state was taken with num_workers=2 and this DataLoader has num_workers=0 or 1"),
])
def test_other_number_of_workers_is_refused_in_the_worker(state_after_5, workers, message):
    corpus, state = state_after_5
    ds = ESDataset(corpus, B, seed=9)
    ds.load_state_dict(state)
    with pytest.raises(ValueError, match=f"cannot resume epoch 1: {message}; resume with the same "
                                         "number of workers"):
        list(loader(ds, num_workers=workers))


def test_main_process_state_refuses_workers(wds_dir):
    corpus = Corpus.from_webdataset(str(wds_dir))
    ds = ESDataset(corpus, B)
    next(iter(ds))
    state = ds.state_at(1)
    assert state["num_workers"] == 1
    fresh = ESDataset(corpus, B)
    fresh.load_state_dict(state)
    with pytest.raises(ValueError, match="taken with num_workers=0 or 1 and this DataLoader has "
                                         "num_workers=2"):
        list(loader(fresh, num_workers=2, persistent_workers=False))
    assert len(list(loader(fresh, num_workers=1))) == 12  # one worker is one stream too


@pytest.mark.filterwarnings("ignore:ESDataset.state_dict\\(num_batches\\) is deprecated")
def test_bad_state_dict_arguments(wds_dir):
    """The deprecated argument is still checked as before (state_at takes the same checks)."""
    ds = ESDataset(Corpus.from_webdataset(str(wds_dir)), B)
    with pytest.raises(ValueError, match=r"num_batches=14 is outside \[0, 13\]: pass the "
                                         r"meta-batches of the current epoch \(0\)"):
        ds.state_dict(14)
    with pytest.raises(ValueError, match=r"num_batches=-1 is outside \[0, 13\]"):
        ds.state_dict(-1)
    with pytest.raises(TypeError):
        ds.state_dict(2.5)
    with pytest.raises(ValueError, match=r"state_dict\(num_batches=3\): this dataset was never "
                                         "iterated nor loaded from a state"):
        ds.state_dict(3)
