"""`MetaBatch.weights` is a tensor in every epoch, and the pruning-only path (train on every
sample, update scores, prune at epoch ends) works on the short tail meta-batch of an epoch
without ``drop_last`` and on a meta-batch whose samples were all lost."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import es_stream as es
from conftest import SHARD_SIZES, write_wds


def _losses(model: torch.nn.Module, mb: es.MetaBatch) -> torch.Tensor:
    x = torch.nn.functional.one_hot(mb.data["cls"], 10).float()
    return (model(x).squeeze(1) - mb.data["cls"].float()) ** 2


@pytest.mark.parametrize("memory_mapped", [False, True], ids=["memory", "mmap"])
def test_infobatch_loop_weights_are_a_tensor_every_epoch(tmp_path, memory_mapped):
    corpus = es.Corpus.from_webdataset(write_wds(tmp_path / "wds"))
    n, epochs = corpus.num_samples, 4
    dataset = es.ESDataset(corpus, meta_batch_size=8, manifests=tmp_path / "manifests")  # tail of 2
    store = (es.ScoreStore.open(str(tmp_path / "scores.npy"), n, buffer_size=16) if memory_mapped
             else es.ScoreStore(n))
    # the InfoBatch use: train on everything, score = last loss, prune with rescaling
    pruner = es.Pruner(corpus, store, es.InfoBatchPolicy(ratio=0.5, anneal=0.25), tmp_path / "manifests")
    model = torch.nn.Linear(10, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    seen: list[tuple[int, int, torch.Tensor]] = []
    for epoch in range(epochs):
        dataset.set_epoch(epoch)
        for mb in es.loader(dataset, num_workers=2):
            losses = _losses(model, mb)
            loss = (losses * mb.weights).mean()              # the README's InfoBatch line
            opt.zero_grad()
            loss.backward()
            opt.step()
            store.scatter(mb.ids, losses)                    # InfoBatch's score: the last loss
            seen.append((epoch, len(mb), mb.weights))
        pruner.on_epoch_end(epoch, epochs)
    for epoch, size, weights in seen:
        assert isinstance(weights, torch.Tensor) and weights.dtype == torch.float32
        assert weights.shape == (size,)
    assert any(size < 8 for _, size, _ in seen)  # the tail meta-batch was trained on too
    by_epoch = {e: torch.cat([w for ep, _, w in seen if ep == e]) for e in range(epochs)}
    assert torch.equal(by_epoch[0], torch.ones(n))           # no manifest: all ones
    assert torch.equal(by_epoch[epochs - 1], torch.ones(len(by_epoch[epochs - 1])))  # annealed
    rescaled = by_epoch[1]
    assert len(rescaled) < n and set(rescaled.unique().tolist()) == {1.0, 2.0}  # 1/(1-0.5)


def test_weights_default_to_ones_and_travel_with_the_batch():
    mb = es.MetaBatch(ids=torch.arange(3), data={"x": torch.zeros(3)}, epoch=0)
    assert torch.equal(mb.weights, torch.ones(3))
    assert torch.equal(mb.to("cpu").weights, torch.ones(3))
    empty = es.MetaBatch(ids=torch.empty(0, dtype=torch.int64), data=None, epoch=0)
    assert empty.weights.shape == (0,)


@pytest.mark.parametrize("feedback", ["sync", "async"])
def test_score_updates_survive_an_empty_meta_batch(tmp_path, feedback):
    """ES scores updated without selecting (``ESSelector.update``) on every meta-batch, B=1
    without shuffling, the one-sample shard deleted after indexing: under ``on_error="skip"``
    its meta-batch arrives empty. Updating a memory-mapped store with it used to leave an empty
    write-buffer segment (or an empty pending update in the feedback channel) that broke the
    next lookup of a buffered id with an IndexError in the second epoch."""
    paths = write_wds(tmp_path / "wds")
    corpus = es.Corpus.from_webdataset(paths)
    n = corpus.num_samples
    dataset = es.ESDataset(corpus, meta_batch_size=1, shuffle=False, on_error="skip")
    os.remove(paths[SHARD_SIZES.index(1)])  # lost while training (a dataset refuses it at start)
    store = es.ScoreStore.open(str(tmp_path / "scores.npy"), n, buffer_size=4 * n)
    selector = es.ESSelector(n, batch_size=1, store=store, feedback=feedback, beta2=0.5)
    losses_by_id: dict[int, list[float]] = {}
    with pytest.warns(RuntimeWarning, match="skipping the rest of shard"):
        for epoch in range(2):
            dataset.set_epoch(epoch)
            for mb in es.loader(dataset, num_workers=0):
                losses = mb.ids.float() / n if len(mb) else torch.empty(0)
                selector.update(mb.ids, losses)              # no select: nothing is refused
                for i, v in zip(mb.ids.tolist(), losses.tolist()):
                    losses_by_id.setdefault(i, []).append(v)
    selector.flush()
    lost = sum(SHARD_SIZES[:SHARD_SIZES.index(1)])
    assert lost not in losses_by_id and len(losses_by_id) == n - 1
    expected = np.full(n, 1.0 / n, np.float32)  # never scored: the store's initial score
    for i, values in losses_by_id.items():
        s = np.float32(1.0 / n)
        for v in values:
            s = np.float32(0.5) * s + np.float32(0.5) * np.float32(v)
        expected[i] = s
    np.testing.assert_allclose(store.gather(torch.arange(n)).numpy(), expected, rtol=1e-6)
