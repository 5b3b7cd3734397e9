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
