"""Selection stats and pruning summaries, checked against a direct computation:
real webdataset shards read through real DataLoader workers, a shadow copy of the ES rule kept
in numpy beside the selector, and the stats compared with numpy's quantiles of what it saw."""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import es_stream as es
from es_stream import pruner as pruner_module
from es_stream.metrics import SelectionStats
from es_stream.reducible import ReducibleLossSelector

from conftest import write_wds

B, b, EPOCHS = 8, 3, 3


def corpus_of(tmp_path: Path) -> es.Corpus:
    return es.Corpus.from_webdataset(write_wds(tmp_path / "wds"))


def losses_of(mb, epoch: int) -> torch.Tensor:
    """A per-sample loss read from each sample's bytes (different every epoch)."""
    means = [np.frombuffer(x, np.uint8).mean() / 255 for x in mb.data["bin"]]
    return torch.tensor(means, dtype=torch.float32) * (1 + 0.5 * epoch) + 0.01


def quantiles(values, qs) -> list[float]:
    return np.quantile(np.asarray(values, np.float64), qs).tolist()


def test_es_stats_equal_a_direct_computation_per_epoch(tmp_path: Path, caplog) -> None:
    corpus = corpus_of(tmp_path)
    n = corpus.num_samples
    ds = es.ESDataset(corpus, meta_batch_size=B, seed=1, drop_last=True)
    steps_per_epoch = n // B
    got: list[tuple[dict, int]] = []
    sel = es.ESSelector(n, b, beta1=0.3, beta2=0.6, burn_in=0.2, anneal=0.1,
                        total_steps=EPOCHS * steps_per_epoch, reweight="unbiased", seed=4,
                        log_fn=lambda m, step: got.append((m, step)))
    scores = np.full(n, np.float32(1 / n))  # the shadow store: the ES rule, by hand
    scored = np.zeros(n, bool)
    dl = es.loader(ds, num_workers=2)
    for epoch in range(EPOCHS):
        ds.set_epoch(epoch)
        seen_w, weights, never, uniform, samples = [], [], 0, 0, 0
        for mb in dl:
            ids, l = mb.ids.numpy(), losses_of(mb, epoch).numpy()
            s = scores[ids]
            seen_w.append((0.3 * s + 0.7 * l).astype(np.float32))
            never += int((~scored[ids]).sum())
            uniform += sel.is_uniform_step()
            samples += len(ids)
            sel.select(mb.ids, torch.from_numpy(l))
            weights.append(sel.last_weights.numpy())
            scores[ids] = np.float32(0.6) * s + np.float32(0.4) * l
            scored[ids] = True
        with caplog.at_level(logging.INFO, logger="es_stream"):
            stats = sel.log_stats()
        w, wt = np.concatenate(seen_w), np.concatenate(weights)
        assert stats["steps"] == steps_per_epoch and stats["samples_seen"] == samples
        assert stats["uniform_steps"] == uniform
        assert stats["samples_selected"] == steps_per_epoch * b
        assert stats["selected_fraction"] == b / B
        assert stats["never_scored_fraction"] == never / samples
        assert stats["weight_min"] == pytest.approx(wt.min(), rel=1e-6)
        assert stats["weight_max"] == pytest.approx(wt.max(), rel=1e-6)
        assert stats["weight_p50"] == pytest.approx(np.median(wt), rel=1e-6)
        p10, p50, p90 = quantiles(w, [0.1, 0.5, 0.9])
        assert [stats["score_p10"], stats["score_p50"], stats["score_p90"]] == pytest.approx(
            [p10, p50, p90], rel=1e-5)
        assert got[-1] == ({f"es/{k}": v for k, v in stats.items()}, sel.step)
        assert f"ESSelector step {sel.step}: steps={steps_per_epoch}" in caplog.text
    # what the test itself relies on: a first epoch with never-scored samples and uniform steps,
    # a later one with neither (the stats were reset in between, not carried over)
    assert got[0][0]["es/never_scored_fraction"] == 1.0 and got[0][0]["es/uniform_steps"] > 0
    assert got[1][0]["es/never_scored_fraction"] < 1.0 and got[1][0]["es/uniform_steps"] == 0
    assert got[0][0]["es/weight_max"] > got[0][0]["es/weight_min"]  # unbiased weights vary


def test_record_counts_a_whole_meta_batch_as_uniform(tmp_path: Path) -> None:
    sel = es.ESSelector(20, 2, seed=0)
    ids = torch.tensor([1, 5, 7])
    sel.record(ids, torch.tensor([0.5, 1.5, 2.5]))
    sel.select(ids, torch.tensor([1.0, 1.0, 1.0]))
    stats = sel.stats()
    assert stats["steps"] == 2 and stats["uniform_steps"] == 1
    assert stats["samples_selected"] == 3 + 2 and stats["samples_seen"] == 6
    assert stats["never_scored_fraction"] == 0.5  # the second meta-batch was scored by record
    assert stats["weight_min"] == stats["weight_max"] == 1.0  # no reweight: weights are 1


def test_stats_resume_bit_identical_beyond_the_reservoir(tmp_path: Path) -> None:
    """Stop after 6 steps, save, restore into a new selector: both report the same stats after
    4 more steps, with a reservoir small enough to have dropped values (the random part)."""

    def make() -> es.ESSelector:
        sel = es.ESSelector(100, 4, seed=2, reweight="approx")
        sel.metrics = SelectionStats(capacity=16, seed=2)
        return sel

    rng = np.random.default_rng(0)
    batches = [(torch.from_numpy(rng.permutation(100)[:12]), torch.rand(12)) for _ in range(10)]
    a = make()
    for ids, l in batches[:6]:
        a.select(ids, l)
    path = tmp_path / "state.pt"
    torch.save({"selector": a.state_dict(), "store": a.store.state_dict()}, path)
    resumed = make()
    saved = torch.load(path, weights_only=True)
    resumed.load_state_dict(saved["selector"])
    resumed.store.load_state_dict(saved["store"])  # the scores: the store's own state
    for ids, l in batches[6:]:
        a.select(ids, l)
        resumed.select(ids, l)
    assert a.stats() == resumed.stats()
    # 120 scores seen, 16 kept: a sample of them, not the first or last 16
    kept = a.metrics._scores.sample()
    assert kept.numel() == 16 and a.stats()["samples_seen"] == 120
    fresh = make()
    for ids, l in batches:
        fresh.select(ids, l)
    assert fresh.stats() == a.stats()  # and the uninterrupted run reports the same


def test_reservoir_keeps_a_uniform_sample_and_exact_extremes() -> None:
    stats = SelectionStats(capacity=64, seed=0)
    values = torch.arange(1000, dtype=torch.float32)
    for chunk in values.split(10):
        stats.observe(samples=10, selected=2, uniform=False, scores=chunk, weights=chunk[:2])
    kept = stats._scores.sample()
    assert kept.numel() == 64 and len(set(kept.tolist())) == 64
    assert set(kept.tolist()) <= set(values.tolist())
    # a uniform sample of 0..999: its median is near 500 (sd of a 64-sample median ~36)
    assert abs(stats.compute()["score_p50"] - 500) < 150
    out = stats.compute()
    assert out["weight_min"] == 0.0 and out["weight_max"] == 991.0  # exact, not from the sample


def test_reducible_topk_stats_are_the_reducible_losses(tmp_path: Path) -> None:
    n = 30
    ref = es.ScoreStore(n)
    reference = torch.linspace(0.1, 1.0, n)
    ref.scatter(torch.arange(n), reference)
    sel = ReducibleLossSelector(ref, 4, rule="topk")
    rng = np.random.default_rng(3)
    seen = []
    for _ in range(5):
        ids = torch.from_numpy(rng.permutation(n)[:10])
        l = torch.rand(10, generator=torch.Generator().manual_seed(len(seen)))
        seen.append((l - reference[ids]).numpy())
        sel.select(ids, l)
    stats = sel.stats()
    assert stats["steps"] == 5 and stats["selected_fraction"] == 0.4
    assert stats["never_scored_fraction"] == 0.0
    assert [stats["score_p10"], stats["score_p50"], stats["score_p90"]] == pytest.approx(
        quantiles(np.concatenate(seen), [0.1, 0.5, 0.9]), rel=1e-5)
    # rule "es": its ESSelector keeps the stats, and the outer selector reports them
    es_sel = ReducibleLossSelector(ref, 4, rule="es", seed=1)
    es_sel.select(torch.arange(10), torch.rand(10))
    assert es_sel.stats() == es_sel.es.stats() and es_sel.stats()["steps"] == 1


@pytest.mark.parametrize("sample_cap", [None, 7])
def test_pruning_summary_quantiles_equal_the_scored_scores(tmp_path: Path, monkeypatch,
                                                           caplog, sample_cap) -> None:
    corpus = corpus_of(tmp_path)
    n = corpus.num_samples
    if sample_cap is not None:  # the large-corpus path: every ceil(n / cap)-th id
        monkeypatch.setattr(pruner_module, "SCORE_SAMPLE", sample_cap)
    store = es.ScoreStore(n)
    rng = np.random.default_rng(7)
    seen = np.sort(rng.permutation(n)[:40])  # 10 never scored
    values = rng.random(40).astype(np.float32) + 0.1
    store.scatter(torch.from_numpy(seen), torch.from_numpy(values))
    got = []
    pruner = es.Pruner(corpus, store, es.ESWPPolicy(ratio=0.5, anneal=0.0, burn_in_epochs=0),
                       tmp_path / "m", log_fn=lambda m, step: got.append((m, step)))
    with caplog.at_level(logging.INFO, logger="es_stream"):
        pruner.on_epoch_end(0, 3)
    summary = pruner.last_summary
    stride = 1 if sample_cap is None else math.ceil(n / sample_cap)
    sampled = values[seen % stride == 0]
    assert [summary["score_p10"], summary["score_p50"], summary["score_p90"]] == pytest.approx(
        quantiles(sampled, [0.1, 0.5, 0.9]), rel=1e-6)
    assert summary["never_scored"] == 10 and summary["kept"] + summary["pruned"] == n
    assert got == [({f"es/prune/{k}": float(v) for k, v in summary.items()}, 1)]
    assert "epoch 1: kept 25 of 50 samples" in caplog.text and "p10/p50/p90" in caplog.text


def test_log_fn_that_is_not_callable_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="log_fn must be a callable"):
        es.ESSelector(10, 2, log_fn="wandb")
    with pytest.raises(TypeError, match="log_fn must be a callable"):
        es.Pruner(corpus_of(tmp_path), es.ScoreStore(50), es.ESWPPolicy(ratio=0.5),
                  tmp_path / "m", log_fn=3)


def test_loop_records_each_epochs_stats(tmp_path: Path) -> None:
    pytest.importorskip("mnist1d")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from pipelines import loop
    from pipelines.mnist1d import data as m1d_data
    from pipelines.mnist1d import train as m1d

    m = m1d_data.build(tmp_path / "mnist1d", 100, 50, 0.0, 42, "wds")
    w = m1d.workload(m.corpus, m.test_x, m.test_y)
    config = loop.RunConfig(2, b=8, B=24, seed=3, progress=False)
    result = loop.train(w, "es", config)
    n = m.corpus.num_samples
    full, tail = divmod(n, 24)  # a tail of <= b is trained whole without the selector
    steps = full + (tail > 8)
    assert len(result["stats"]) == 2
    for stats in result["stats"]:  # per epoch: the stats were reset at each epoch end
        assert stats["steps"] == steps and stats["samples_selected"] == 8 * steps
        assert stats["samples_seen"] == 24 * full + (tail if tail > 8 else 0)
    assert result["stats"][0]["never_scored_fraction"] == 1.0
    assert result["stats"][1]["never_scored_fraction"] < 1.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_stats_make_no_host_sync_per_step() -> None:
    n, big_b, k = 100_000, 4096, 1024
    sel = es.ESSelector(n, k, device="cuda", reweight="unbiased", burn_in=0.1, total_steps=50)
    ids = [torch.randperm(n)[:big_b] for _ in range(12)]  # on the CPU, as the loader yields them
    losses = torch.rand(big_b, device="cuda")
    sel.select(ids[0], losses)  # warm-up: lazy CUDA initialisation may sync
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in ids[1:]:  # beyond the reservoir's 4096: its top-k path runs too
            sel.select(i, losses)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    stats = sel.stats()  # the one sync
    assert stats["steps"] == 12 and stats["samples_seen"] == 12 * big_b
    assert 0 < stats["never_scored_fraction"] <= 1 and stats["weight_min"] > 0


@pytest.mark.parametrize("make,uniform", [(lambda: es.UniformSelector(2), 1),
                                          (lambda: es.LossSelector(2), 0),
                                          (lambda: es.TopKSelector(2), 0),
                                          (lambda: es.SelectiveBackpropSelector(2), 0)],
                         ids=["uniform", "loss", "topk", "selective-backprop"])
def test_loss_ranking_selectors_report_their_losses(make, uniform) -> None:
    sel = make()
    seen = [torch.rand(6, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    for l in seen:
        sel.select(None, l)
    stats = sel.stats()
    assert stats["steps"] == 4 and stats["uniform_steps"] == 4 * uniform
    assert stats["selected_fraction"] == 2 / 6 and stats["never_scored_fraction"] == 0.0
    assert stats["score_p50"] == pytest.approx(np.median(torch.cat(seen).numpy()), rel=1e-6)


def test_weight_median_mixes_unweighted_steps_as_ones() -> None:
    """A reweighting selector's record() hands out no weights (1 each): the median counts them."""
    sel = es.ESSelector(50, 2, reweight="approx", seed=3)
    handed = []
    for i in range(4):
        ids = torch.arange(5 * i, 5 * i + 5)
        sel.select(ids, torch.rand(5, generator=torch.Generator().manual_seed(i)) + 0.1)
        handed.append(sel.last_weights.numpy())
    sel.record(torch.arange(40, 47), torch.rand(7))  # 7 samples trained with weight 1
    all_weights = np.sort(np.concatenate(handed + [np.ones(7, np.float32)]))
    stats = sel.stats()
    assert stats["weight_p50"] == pytest.approx(all_weights[math.ceil(len(all_weights) / 2) - 1])
    assert stats["weight_min"] == pytest.approx(all_weights[0])
    assert stats["weight_max"] == pytest.approx(all_weights[-1])


def test_large_meta_batches_are_thinned_to_a_stratified_sample_with_exact_extremes():
    """Beyond PER_STEP values a step offers an evenly strided subset to the quantile sample
    (its cost stays O(PER_STEP)); the quantiles stay close to the direct ones, min/max exact."""
    from es_stream.metrics import PER_STEP, SelectionStats

    gen = torch.Generator().manual_seed(0)
    stats, scores_seen, weights_seen = SelectionStats(), [], []
    for _ in range(40):
        scores = torch.rand(4 * PER_STEP, generator=gen) ** 2       # skewed, shuffled order
        weights = 1 + torch.rand(2 * PER_STEP, generator=gen)
        stats.observe(samples=scores.numel(), selected=weights.numel(), uniform=False,
                      scores=scores, weights=weights)
        scores_seen.append(scores)
        weights_seen.append(weights)
    out, s, w = stats.compute(), torch.cat(scores_seen), torch.cat(weights_seen)
    for q in (10, 50, 90):
        assert out[f"score_p{q}"] == pytest.approx(torch.quantile(s, q / 100).item(), abs=0.03)
    assert out["weight_p50"] == pytest.approx(torch.quantile(w, 0.5).item(), abs=0.03)
    assert (out["weight_min"], out["weight_max"]) == (w.min().item(), w.max().item())
    assert out["samples_seen"] == s.numel() and out["samples_selected"] == w.numel()


def test_first_visit_fraction_counts_visits_in_the_period_not_the_corpus() -> None:
    """Two "epochs" over the same 4 ids: per epoch 1 then 0; over both without a reset 0.5,
    though every sample is scored. never_scored_fraction is the same value (the earlier name)."""
    sel = es.ESSelector(4, 2, seed=0)
    ids = torch.arange(4)
    sel.select(ids, torch.tensor([1.0, 2.0, 3.0, 4.0]))
    first = sel.stats()
    sel.select(ids, torch.tensor([1.0, 2.0, 3.0, 4.0]))
    both = sel.stats()
    sel.reset_stats()
    sel.select(ids, torch.tensor([1.0, 2.0, 3.0, 4.0]))
    third = sel.stats()
    assert (first["first_visit_fraction"], both["first_visit_fraction"],
            third["first_visit_fraction"]) == (1.0, 0.5, 0.0)
    for stats in (first, both, third):
        assert stats["never_scored_fraction"] == stats["first_visit_fraction"]
    assert (sel.store.to_numpy() != sel.store.initial).all()  # every sample is scored
