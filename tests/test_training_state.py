"""One training state: `TrainingState` + `Checkpointer.save(step, state)` /
`Checkpointer.restore(state)` resume a plain ES + ESWP loop (real shards, 2 DataLoader workers)
exactly: an interrupted run restored through the one object selects the same ids and ends with
bit-identical model parameters, scores and manifests as a run that never stopped."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import es_stream as es
from es_stream.dataset import BatchCount
from conftest import write_clusters

EPOCHS, META_BATCH, BATCH, EVERY = 4, 16, 6, 5


@pytest.fixture(scope="module")
def corpus_path(tmp_path_factory) -> Path:
    """200 samples, 4 classes, "npy": float[8], in shards of 45."""
    root = tmp_path_factory.mktemp("state")
    write_clusters(root / "data")
    es.Corpus.from_webdataset(str(root / "data")).save(root / "corpus.parquet")
    return root / "corpus.parquet"


def train(corpus_path: Path, out: Path, run: str, stop_at: int | None = None) -> dict:
    """A plain loop; stops iterating after step ``stop_at`` (an interruption), resumes from
    the last checkpoint in ``out`` when there is one. Returns its log and final state."""
    corpus = es.Corpus.load(corpus_path)
    n = corpus.num_samples
    dataset = es.ESDataset(corpus, META_BATCH, seed=3, drop_last=True, manifests=out / "manifests")
    store = es.ScoreStore.open(str(out / f"live-{run}.npy"), n, buffer_size=50)
    selector = es.ESSelector(n, BATCH, seed=5, store=store)
    pruner = es.Pruner(corpus, store, es.ESWPPolicy(ratio=0.3, anneal=0.25, burn_in_epochs=1),
                       out / "manifests")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.2), torch.nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    checkpoints = es.Checkpointer(out / "checkpoints")

    # the two lines of a resume
    state = es.TrainingState(dataset=dataset, selector=selector, pruner=pruner, model=model,
                             optimizer=opt)
    step = checkpoints.restore(state)
    first_step, log = step, []
    batches = es.loader(dataset, num_workers=2)
    for epoch in range(dataset.epoch, EPOCHS):
        dataset.set_epoch(epoch)
        for mb in batches:
            x, y = mb.data["npy"], mb.data["cls"]
            with torch.no_grad():
                losses = F.cross_entropy(model(x), y, reduction="none")
            keep = selector.select(mb.ids, losses)
            opt.zero_grad()
            F.cross_entropy(model(x[keep]), y[keep]).backward()  # dropout: the global RNG
            opt.step()
            step += 1
            log.append((step, epoch, sorted(mb.ids[keep].tolist())))
            if step % EVERY == 0:
                checkpoints.save(step, state)
            if step == stop_at:
                store.flush()
                return {"first_step": first_step, "log": log}
        pruner.on_epoch_end(epoch, EPOCHS)
    return {"first_step": first_step, "log": log,
            "params": [p.detach().clone() for p in model.parameters()],
            "scores": store.gather(torch.arange(n)).numpy().copy(),
            "manifests": {str(p.relative_to(out / "manifests")): p.read_bytes()
                          for p in sorted((out / "manifests").rglob("*")) if p.is_file()}}


@pytest.fixture(scope="module")
def reference(corpus_path, tmp_path_factory) -> dict:
    return train(corpus_path, tmp_path_factory.mktemp("reference"), "ref")


# 7: mid-epoch 0; 12: the last step of epoch 0, before its pruning decision; 23: mid-epoch 2,
# a pruned epoch (its checkpoint, step 20, is at the end of pruned epoch 1)
@pytest.mark.parametrize("stop_at", [7, 12, 23])
def test_interrupted_loop_resumes_bit_identical_through_one_state(corpus_path, reference,
                                                                  tmp_path, stop_at):
    ref = reference["log"]
    assert len(ref) == 12 + 8 + 8 + 12  # drop_last; epochs 1 and 2 keep ceil(0.7 * 200)
    first = train(corpus_path, tmp_path, "first", stop_at)
    assert first["log"] == ref[:stop_at]
    resumed = train(corpus_path, tmp_path, "resumed")
    checkpoint = stop_at // EVERY * EVERY
    assert resumed["first_step"] == checkpoint
    assert resumed["log"] == ref[checkpoint:]  # the same ids selected from there on
    for mine, theirs in zip(resumed["params"], reference["params"]):
        assert torch.equal(mine, theirs)
    assert resumed["scores"].tobytes() == reference["scores"].tobytes()
    assert resumed["manifests"] == reference["manifests"]


def test_dataset_state_dict_counts_what_the_loader_yielded(corpus_path):
    corpus = es.Corpus.load(corpus_path)
    dataset = es.ESDataset(corpus, META_BATCH, seed=3)
    assert dataset.state_dict()["batches"] == 0
    for workers in (0, 2):
        batches = es.loader(dataset, num_workers=workers)
        for k, mb in enumerate(batches, start=1):
            assert dataset.state_dict()["batches"] == k
            if workers:  # the loader owns the count the dataset reports
                assert (batches.count.epoch, batches.count.batches) == (0, k)
            if k == 4:
                break
    state = dataset.state_dict()
    assert (state["epoch"], state["batches"], state["num_workers"]) == (0, 4, 2)
    dataset.set_epoch(1)
    assert dataset.state_dict()["batches"] == 0
    # a DataLoader es-stream did not make cannot be counted: said, not guessed
    plain = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=1)
    next(iter(plain))
    with pytest.raises(ValueError, match="does not count the meta-batches.*es_stream.loader"):
        dataset.state_dict()
    assert dataset.state_at(1)["batches"] == 1
    with pytest.warns(DeprecationWarning, match="state_dict\\(num_batches\\) is deprecated"):
        assert dataset.state_dict(2)["batches"] == 2  # the old call still answers
    # a loop counting by itself reports its count the way the loader does
    dataset.track(BatchCount(1, 3))
    assert dataset.state_dict()["batches"] == 3


def test_restore_refuses_a_checkpoint_of_other_parts(corpus_path, tmp_path):
    corpus = es.Corpus.load(corpus_path)
    dataset = es.ESDataset(corpus, META_BATCH)
    selector = es.ESSelector(corpus.num_samples, BATCH)
    model = torch.nn.Linear(8, 4)
    checkpoints = es.Checkpointer(tmp_path / "ckpt")
    assert checkpoints.restore(es.TrainingState(dataset=dataset, selector=selector)) == 0
    checkpoints.save(3, es.TrainingState(dataset=dataset, selector=selector, model=model))
    before = selector.store.gather(torch.arange(5)).clone()
    with pytest.raises(ValueError, match=r"this TrainingState lacks \['model'\]"):
        checkpoints.restore(es.TrainingState(dataset=dataset, selector=selector))
    with pytest.raises(ValueError, match=r"the state lacks \['optimizer'\]"):
        checkpoints.restore(es.TrainingState(dataset=dataset, selector=selector, model=model,
                                             optimizer=torch.optim.SGD(model.parameters(), lr=1)))
    assert torch.equal(selector.store.gather(torch.arange(5)), before)
    with pytest.raises(TypeError, match="scheduler must have state_dict"):
        es.TrainingState(scheduler=object())
    with pytest.raises(TypeError, match="saves its own store"):
        checkpoints.save(4, es.TrainingState(selector=selector), store=selector.store)
    other = es.Pruner(corpus, es.ScoreStore(corpus.num_samples), es.ESWPPolicy(0.3), tmp_path / "m")
    with pytest.raises(ValueError, match="different score stores"):
        es.TrainingState(selector=selector, pruner=other)
