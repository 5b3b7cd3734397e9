"""Pruning policies alone: exact chunked top-k, inclusion frequencies, InfoBatch's rule, epochs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from es_stream import ESWPPolicy, InfoBatchPolicy
from es_stream.policy import _gumbel_keys, chunked_top_k_mask


def decide(policy, scores, epoch, total):
    keep = np.concatenate([d.keep for d in policy.decide(lambda a, b: scores[a:b], len(scores), epoch, total)])
    weight = np.concatenate([d.weight for d in policy.decide(lambda a, b: scores[a:b], len(scores), epoch, total)])
    return keep, weight


@pytest.mark.parametrize("chunk", [1000, 97, 13])
def test_chunked_top_k_is_exact(chunk):
    n, k = 1000, 700
    scores = np.random.default_rng(0).random(n).astype(np.float32)
    mask = np.concatenate([m for _, m in chunked_top_k_mask(lambda a, b: scores[a:b], n, k, 1, 2, chunk=chunk)])
    assert mask.sum() == k
    keys = np.concatenate([_gumbel_keys(scores[a:a + chunk], 1, 2, i) for i, a in enumerate(range(0, n, chunk))])
    assert set(np.flatnonzero(mask)) == set(np.argsort(-keys)[:k])


def test_eswp_keeps_ceil_and_favours_high_scores():
    n = 1001
    scores = np.where(np.arange(n) < 100, 10.0, 0.01).astype(np.float32)
    policy = ESWPPolicy(ratio=0.5, anneal=0.0, burn_in_epochs=0)
    keep, weight = decide(policy, scores, epoch=1, total=4)
    assert keep.sum() == math.ceil(0.5 * n)
    assert keep[:100].all()  # 10.0 vs 0.01: the high scorers are essentially always drawn
    assert (weight == 1).all()


def test_eswp_inclusion_frequency_tracks_scores():
    scores = np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32)
    hits = np.zeros(4)
    for seed in range(4000):
        keep, _ = decide(ESWPPolicy(ratio=0.75, anneal=0.0, burn_in_epochs=0, seed=seed), scores, 1, 4)
        hits += keep
    # keep 1 of 4: a single draw with p = s / sum(s); 4000 draws, standard error <= 0.008
    np.testing.assert_allclose(hits / 4000, scores / scores.sum(), atol=0.03)


def test_burn_in_and_anneal_keep_everything():
    scores = np.random.default_rng(1).random(200).astype(np.float32)
    policy = ESWPPolicy(ratio=0.3, anneal=0.25, burn_in_epochs=2)
    pruned = [e for e in range(8) if policy.prunes(e, 8)]
    assert pruned == [2, 3, 4, 5]
    assert decide(policy, scores, 0, 8)[0].all() and decide(policy, scores, 7, 8)[0].all()
    assert decide(policy, scores, 3, 8)[0].sum() == 140


def test_infobatch_rule():
    rng = np.random.default_rng(2)
    scores = rng.random(10_000).astype(np.float32)
    keep, weight = decide(InfoBatchPolicy(ratio=0.5, anneal=0.0), scores, 1, 4)
    below = scores < scores.astype(np.float64).mean()
    assert keep[~below].all()  # above the mean: always kept, weight 1
    assert (weight[~below] == 1).all()
    dropped = (~keep[below]).mean()
    assert abs(dropped - 0.5) < 0.03
    assert np.allclose(weight[below & keep], 2.0)


@pytest.mark.parametrize("cls,kwargs,match", [
    (ESWPPolicy, dict(ratio=1.0), "ratio must be in \\[0, 1\\)"),
    (ESWPPolicy, dict(ratio=-0.1), "ratio must be in"),
    (ESWPPolicy, dict(anneal=2.0), "anneal must be a fraction"),
    (ESWPPolicy, dict(burn_in_epochs=-1), "burn_in_epochs must be >= 0"),
    (InfoBatchPolicy, dict(ratio=1.5), "ratio must be in"),
])
def test_bad_arguments(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


# --- scores that break policies ------------------------------------------------------------

import logging  # noqa: E402

import torch  # noqa: E402

from es_stream import Corpus, ESStreamError, Pruner, ScoreError, ScoreStore  # noqa: E402
from es_stream.manifest import read_epoch  # noqa: E402


@pytest.mark.parametrize("policy", [ESWPPolicy(ratio=0.5, anneal=0.0, burn_in_epochs=0),
                                    InfoBatchPolicy(ratio=0.5, anneal=0.0)], ids=["es", "infobatch"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_scores_are_refused_naming_the_first_sample(policy, bad):
    scores = np.random.default_rng(3).random(1000).astype(np.float32) + 0.1
    scores[[17, 600]] = bad
    with pytest.raises(ScoreError, match=r"2 of 1000 scores are NaN or infinite \(the first: "
                                         r"sample id 17.*check the training loss"):
        decide(policy, scores, 1, 4)


def test_eswp_refuses_negative_scores():
    scores = np.random.default_rng(3).random(100).astype(np.float32)
    scores[[40, 41, 90]] = -0.5
    with pytest.raises(ValueError, match=r"3 of 100 scores are negative \(the first: sample id 40"
                                         r".*InfoBatchPolicy"):
        decide(ESWPPolicy(ratio=0.5, anneal=0.0, burn_in_epochs=0), scores, 1, 4)
    # InfoBatch only compares scores with their mean: negative losses are fine there
    keep, _ = decide(InfoBatchPolicy(ratio=0.5, anneal=0.0), scores, 1, 4)
    assert keep[scores >= scores.mean()].all()


def corpus_of(tmp_path, sizes=(7, 13, 1, 20, 9)) -> Corpus:
    from conftest import write_wds

    write_wds(tmp_path / "wds", sizes)
    return Corpus.from_webdataset(str(tmp_path / "wds"))


def kept_ids(out, corpus, epoch):
    return read_epoch(out, epoch, corpus.fingerprint, corpus.shard_counts).kept_ids


def test_a_store_with_nan_names_its_file(tmp_path):
    corpus = corpus_of(tmp_path)
    scores = np.random.default_rng(0).random(corpus.num_samples).astype(np.float32) + 0.1
    scores[33] = np.nan  # e.g. a live file written by a run whose loss overflowed
    np.save(tmp_path / "live.npy", scores)
    with pytest.warns(UserWarning, match="no live.meta.json"):
        store = ScoreStore.open(tmp_path / "live.npy", corpus.num_samples)
        pruner = Pruner(corpus, store, ESWPPolicy(ratio=0.3, anneal=0.0, burn_in_epochs=0),
                        tmp_path / "m")
    with pytest.raises(ESStreamError, match=rf"score store {tmp_path / 'live.npy'}: 1 of 50 "
                                            r"scores are NaN.*sample id 33"):
        pruner.write(1, 4)
    assert not (tmp_path / "m" / "epoch=00001" / "_SUCCESS").exists()


def test_never_scored_samples_are_kept_and_counted(tmp_path, caplog):
    """Samples never scored (a drop_last leftover) read as 1/n, the lowest score: ESWP used to
    prune them first, every epoch, so they were never trained again."""
    corpus = corpus_of(tmp_path)
    n = corpus.num_samples
    store = ScoreStore(n)
    rng = np.random.default_rng(5)
    seen = np.sort(rng.permutation(n)[:44])  # 6 samples never reached the selector
    store.scatter(torch.from_numpy(seen), torch.from_numpy(rng.random(44).astype(np.float32) + 0.5))
    never = np.setdiff1d(np.arange(n), seen)
    pruner = Pruner(corpus, store, ESWPPolicy(ratio=0.5, anneal=0.0, burn_in_epochs=0), tmp_path / "m")
    with caplog.at_level(logging.INFO, logger="es_stream.pruner"):
        for epoch in range(3):
            pruner.on_epoch_end(epoch, 4)
            kept = kept_ids(tmp_path / "m", corpus, epoch + 1)
            assert np.isin(never, kept).all()  # in every pruned epoch
            assert len(kept) == math.ceil(0.5 * n)  # they count toward the quota
            counts = {k: pruner.last_summary[k] for k in
                      ("epoch", "samples", "kept", "pruned", "rescaled", "never_scored")}
            assert counts == {"epoch": epoch + 1, "samples": n, "kept": len(kept),
                              "pruned": n - len(kept), "rescaled": 0, "never_scored": len(never)}
    assert "epoch 3: kept 25 of 50 samples (25 pruned, 0 rescaled, 6 never scored" in caplog.text


def test_never_scored_beyond_the_quota_are_all_kept(tmp_path):
    corpus = corpus_of(tmp_path)
    store = ScoreStore(corpus.num_samples)
    store.scatter(torch.arange(10), torch.full((10,), 5.0))  # 40 of 50 never scored
    summary = Pruner(corpus, store, ESWPPolicy(ratio=0.5, anneal=0.0, burn_in_epochs=0),
                     tmp_path / "m").write(1, 4)
    np.testing.assert_array_equal(kept_ids(tmp_path / "m", corpus, 1), np.arange(10, 50))
    assert summary["kept"] == 40 and summary["never_scored"] == 40


def test_infobatch_keeps_never_scored_at_weight_one_and_leaves_them_out_of_the_mean(tmp_path):
    corpus = corpus_of(tmp_path)
    n = corpus.num_samples
    store = ScoreStore(n)
    scores = np.random.default_rng(2).random(n).astype(np.float32) * 0.01
    scores[:5] = 1.0
    store.scatter(torch.arange(40), torch.from_numpy(scores[:40]))  # ids 40..49 never scored
    summary = Pruner(corpus, store, InfoBatchPolicy(ratio=0.5, anneal=0.0), tmp_path / "m").write(1, 4)
    keep = read_epoch(tmp_path / "m", 1, corpus.fingerprint, corpus.shard_counts)
    kept = set(keep.kept_ids.tolist())
    assert set(range(40, 50)) <= kept and set(range(5)) <= kept
    weight = dict(zip(keep.kept_ids.tolist(), keep.weights.tolist()))
    assert all(weight[i] == 1.0 for i in range(40, 50))
    # the mean of the 40 scored (about 0.13) puts ids 5..39 below it: those are dropped at 0.5
    assert all(weight[i] == 2.0 for i in kept if 5 <= i < 40)
    assert 5 < 35 - len([i for i in kept if 5 <= i < 40]) < 30
    assert summary["never_scored"] == 10 and summary["rescaled"] == summary["kept"] - 15


@pytest.mark.parametrize("chunk", [1000, 97])
def test_every_sample_scored_gives_the_same_decision_and_a_mask_is_exact(chunk):
    n, k = 1000, 700
    scores = np.random.default_rng(0).random(n).astype(np.float32)
    plain = np.concatenate([m for _, m in chunked_top_k_mask(lambda a, b: scores[a:b], n, k, 1, 2, chunk=chunk)])
    all_scored = np.concatenate([m for _, m in chunked_top_k_mask(
        lambda a, b: scores[a:b], n, k, 1, 2, chunk=chunk, scored=lambda a, b: np.ones(b - a, bool))])
    np.testing.assert_array_equal(plain, all_scored)
    scored = np.random.default_rng(1).random(n) < 0.9
    mask = np.concatenate([m for _, m in chunked_top_k_mask(
        lambda a, b: scores[a:b], n, k, 1, 2, chunk=chunk, scored=lambda a, b: scored[a:b])])
    keys = np.concatenate([_gumbel_keys(scores[a:a + chunk], 1, 2, i) for i, a in enumerate(range(0, n, chunk))])
    assert mask[~scored].all() and mask.sum() == k
    drawn = k - (~scored).sum()  # the rest of the quota: the largest keys among scored samples
    assert set(np.flatnonzero(mask & scored)) == set(np.flatnonzero(scored)[np.argsort(-keys[scored])[:drawn]])


def test_integer_arguments_accept_numpy_and_refuse_the_rest():
    policy = ESWPPolicy(ratio=0.5, anneal=0.0, burn_in_epochs=np.int64(1), seed=np.int64(7))
    scores = np.random.default_rng(1).random(200).astype(np.float32)
    keep, _ = decide(policy, scores, np.int64(1), np.int64(4))
    assert keep.sum() == 100
    with pytest.raises(ValueError, match="seed must be >= 0, got -1"):
        ESWPPolicy(seed=-1)
    with pytest.raises(TypeError, match="burn_in_epochs must be an integer, got 1.5"):
        ESWPPolicy(burn_in_epochs=1.5)
    with pytest.raises(ValueError, match="epoch must be >= 0, got -1"):
        policy.decide(lambda a, b: scores[a:b], 200, -1, 4)


# ---- the one-pass decision: float32 keys, a sampled bracket, an exact fix-up ----

def one_shot_top_k(scores, k, chunk, scored=None):
    """The definition, computed at once: the k largest float32 keys (ties to the lower id)."""
    n = len(scores)
    keys = np.concatenate([_gumbel_keys(scores[a:a + chunk], 1, 2, i)
                           for i, a in enumerate(range(0, n, chunk))])
    eligible = np.ones(n, bool) if scored is None else scored
    k = max(0, k - int((~eligible).sum()))
    ids = np.flatnonzero(eligible)
    best = ids[np.lexsort((ids, -keys[ids]))[:k]]
    mask = ~eligible
    mask[best] = True
    return mask


def masks(scores, k, chunk, scored=None):
    kwargs = {} if scored is None else {"scored": lambda a, b: scored[a:b]}
    return np.concatenate([m for _, m in chunked_top_k_mask(
        lambda a, b: scores[a:b], len(scores), k, 1, 2, chunk=chunk, **kwargs)])


@pytest.fixture
def small_sample(monkeypatch):
    """A sample of 8 x 16 scores, so that n = 20000 takes the sampled bracket (n > 4 x 128)."""
    monkeypatch.setattr("es_stream.policy.SAMPLE_WINDOWS", 8)
    monkeypatch.setattr("es_stream.policy.SAMPLE_WIDTH", 16)


@pytest.mark.parametrize("k", [1, 6000, 14000, 19999])
@pytest.mark.parametrize("with_never", [False, True])
def test_sampled_bracket_decides_the_exact_top_k_of_the_float32_keys(small_sample, k, with_never):
    n, chunk = 20000, 3001
    rng = np.random.default_rng(k)
    scores = (rng.random(n) ** 3).astype(np.float32)
    scored = rng.random(n) < 0.95 if with_never else None
    mask = masks(scores, k, chunk, scored)
    np.testing.assert_array_equal(mask, one_shot_top_k(scores, k, chunk, scored))
    assert mask.sum() == max(k, 0 if scored is None else int((~scored).sum()))


def test_a_missed_bracket_is_fixed_by_the_histogram_pass(small_sample, monkeypatch):
    """A bracket that holds nothing near the cut (here forced; in life: a sample that misread
    the scores) costs a histogram pass and a second pass, and the decision is the same."""
    from es_stream import policy

    n, k, chunk = 20000, 14000, 3001
    scores = np.random.default_rng(0).random(n).astype(np.float32)
    expected = masks(scores, k, chunk)
    calls = []
    real = policy._histogram_bracket
    monkeypatch.setattr(policy, "_sampled_bracket", lambda *a: (50.0, 60.0))
    monkeypatch.setattr(policy, "_histogram_bracket", lambda *a: calls.append(1) or real(*a))
    np.testing.assert_array_equal(masks(scores, k, chunk), expected)
    assert calls == [1]


def test_tied_keys_go_to_the_lower_id(monkeypatch):
    """float32 keys tie at 1e9 samples; a tie at the cut keeps exactly k, the lower ids first."""
    from es_stream import policy

    real = policy._gumbel_keys
    monkeypatch.setattr(policy, "_gumbel_keys",
                        lambda *a: np.round(real(*a), 0).astype(np.float32))  # a few levels
    n, k, chunk = 3000, 1234, 700
    scores = np.random.default_rng(3).random(n).astype(np.float32)
    mask = masks(scores, k, chunk)
    keys = np.concatenate([policy._gumbel_keys(scores[a:a + chunk], 1, 2, i)
                           for i, a in enumerate(range(0, n, chunk))])
    cut = keys[mask].min()
    assert mask.sum() == k and (keys[~mask] <= cut).all()
    tied = np.flatnonzero(keys == cut)
    assert mask[tied].all() or not mask[tied[np.argmax(~mask[tied]):]].any()  # a prefix of ids


def test_float32_keys_are_gumbel_distributed():
    """The keys are log s + Gumbel(0, 1): mean log s + Euler's gamma, variance pi^2 / 6; the
    uniforms behind them lie strictly inside (0, 1)."""
    from es_stream.policy import uniform32

    u = uniform32([4, 5], 1 << 20)
    assert u.dtype == np.float32 and 0 < u.min() and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.002
    keys = _gumbel_keys(np.full(1 << 20, 0.25, np.float32), 7, 1, 0).astype(np.float64)
    assert abs(keys.mean() - (math.log(0.25) + 0.5772156649)) < 0.01
    assert abs(keys.var() - math.pi ** 2 / 6) < 0.02
    zeros = _gumbel_keys(np.zeros(1000, np.float32), 7, 1, 0)
    assert np.isfinite(zeros).all() and len(np.unique(zeros)) > 990  # 0 scores still ranked
