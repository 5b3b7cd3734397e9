"""ReducibleLossSelector (RHO-LOSS and the ES rule on the reducible loss), against a direct
computation, with a reference store scored from real shards by real workers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import payload, write_wds
from es_stream import (Corpus, ESDataset, ESSelector, ReducibleLossSelector, ScoreError, ScoreStore,
                       loader, score_corpus)


def reference_losses(n: int) -> np.ndarray:
    return np.array([payload(i)[2] / 255 for i in range(n)], np.float32)


@pytest.fixture
def ref(wds_dir, tmp_path):
    corpus = Corpus.from_webdataset(str(wds_dir))
    values = reference_losses(corpus.num_samples)
    score_corpus(corpus, lambda b: torch.tensor([values[int(k[6:])] for k in b["__key__"]]),
                 tmp_path / "ref.npy", meta_batch_size=8, num_workers=2, scorer="ref",
                 progress=False)
    store = ScoreStore.open(tmp_path / "ref.npy", corpus.num_samples, fingerprint=corpus.fingerprint)
    return corpus, store, values


def training_loss(ids: torch.Tensor, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.rand(len(ids), generator=g) * 2


def test_topk_picks_the_largest_reducible_losses_over_real_meta_batches(ref):
    corpus, store, values = ref
    sel = ReducibleLossSelector(store, batch_size=3, rule="topk", fingerprint=corpus.fingerprint)
    ds = ESDataset(corpus, 8, drop_last=True, seed=3)
    for step, mb in enumerate(loader(ds, num_workers=2)):
        losses = training_loss(mb.ids, step)
        chosen = sel.select(mb.ids, losses)
        direct = losses.numpy() - values[mb.ids.numpy()]
        assert sorted(chosen.tolist()) == sorted(np.argsort(-direct, kind="stable")[:3].tolist())
    assert sel.step == len(ds)


def test_es_rule_equals_an_esselector_fed_the_reducible_loss(ref):
    corpus, store, values = ref
    kwargs = dict(beta1=0.3, beta2=0.7, floor=1e-4, reweight=True)
    sel = ReducibleLossSelector(store, 4, rule="es", seed=5, **kwargs)
    plain = ESSelector(corpus.num_samples, 4, seed=5, **kwargs)
    ds = ESDataset(corpus, 10, drop_last=True, seed=1)
    for epoch in range(2):
        ds.set_epoch(epoch)
        for step, mb in enumerate(loader(ds, num_workers=2)):
            losses = training_loss(mb.ids, 10 * epoch + step)
            got = sel.select(mb.ids, losses)
            want = plain.select(mb.ids, losses - torch.from_numpy(values[mb.ids.numpy()]))
            assert got.tolist() == want.tolist()
            torch.testing.assert_close(sel.last_weights, plain.last_weights)
    np.testing.assert_array_equal(sel.store.to_numpy(), plain.store.to_numpy())


def test_state_dict_resumes_the_same_selections(ref):
    corpus, store, _ = ref
    ids = torch.arange(10)
    a = ReducibleLossSelector(store, 3, rule="es", seed=2)
    for step in range(3):
        a.select(ids, training_loss(ids, step))
    state = a.state_dict()
    assert "store" not in state["es"]  # the ES scores are the store's own state
    b = ReducibleLossSelector(store, 3, rule="es", seed=99)
    b.load_state_dict(state)
    b.store.load_state_dict(a.store.state_dict())
    for step in range(3, 6):
        assert a.select(ids, training_loss(ids, step)).tolist() == \
            b.select(ids, training_loss(ids, step)).tolist()
    with pytest.raises(ValueError, match="rule='es', this selector rule='topk'"):
        ReducibleLossSelector(store, 3).load_state_dict(state)


def test_refuses_a_reference_of_another_corpus_or_unfinished(ref, tmp_path):
    corpus, store, _ = ref
    write_wds(tmp_path / "other", sizes=(25, 25))
    other = Corpus.from_webdataset(str(tmp_path / "other"))
    with pytest.raises(ScoreError, match=f"scores of corpus {corpus.fingerprint}"):
        ReducibleLossSelector(store, 2, fingerprint=other.fingerprint)
    partial = ScoreStore(corpus.num_samples)
    partial.scatter(torch.arange(30), torch.rand(30))
    with pytest.raises(ScoreError, match="20 of 50 samples were never scored.*sample id 30.*no reference loss"):
        ReducibleLossSelector(partial, 2)
    unfinished = ScoreStore(corpus.num_samples)
    unfinished.scatter(torch.arange(50), torch.rand(50))
    unfinished.set_reference({"scorer": "x", "complete": False})
    with pytest.raises(ScoreError, match="unfinished reference scoring pass"):
        ReducibleLossSelector(unfinished, 2)
    with pytest.raises(ValueError, match="rule must be"):
        ReducibleLossSelector(store, 2, rule="gumbel")
    with pytest.raises(TypeError, match="takes no ES arguments"):
        ReducibleLossSelector(store, 2, beta1=0.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_losses_with_a_host_reference_match_the_cpu(ref):
    corpus, store, values = ref
    ids = torch.arange(20)
    losses = training_loss(ids, 0)
    for rule in ("topk", "es"):
        cpu = ReducibleLossSelector(store, 5, rule=rule, seed=1)
        gpu = ReducibleLossSelector(store, 5, rule=rule, seed=1, device="cuda") if rule == "es" \
            else ReducibleLossSelector(store, 5, rule=rule, seed=1)
        gpu.prefetch(ids, "cuda")
        r_gpu = gpu.reducible(ids, losses.cuda())
        assert r_gpu.device.type == "cuda"
        torch.testing.assert_close(r_gpu.cpu(), cpu.reducible(ids, losses))
        if rule == "topk":
            assert sorted(gpu.select(ids, losses.cuda()).cpu().tolist()) == \
                sorted(cpu.select(ids, losses).tolist())
