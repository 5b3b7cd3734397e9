"""Selectors: the ES rule against a hand-computed reference, Gumbel-top-k against exact
inclusion probabilities, burn-in/anneal, state round trip, errors, and each baseline's rule."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from es_stream import (ESSelector, LossSelector, ScoreStore, SelectiveBackpropSelector,
                       TopKSelector, UniformSelector)


def exact_inclusion(weights: np.ndarray, b: int) -> np.ndarray:
    """P(i among the first b draws) of successive sampling without replacement, p ∝ weights."""
    n = len(weights)
    incl = np.zeros(n)
    for order in itertools.permutations(range(n), b):
        p, left = 1.0, weights.sum()
        for i in order:
            p *= weights[i] / left
            left -= weights[i]
        incl[list(order)] += p
    return incl


def frequencies(selector, losses: torch.Tensor, trials: int, ids=None) -> np.ndarray:
    counts = np.zeros(losses.numel())
    for _ in range(trials):
        counts[selector.select(ids, losses).numpy()] += 1
    return counts / trials


def test_es_rule_matches_hand_computation_over_steps_and_repeated_ids():
    n, beta1, beta2 = 10, 0.2, 0.8
    sel = ESSelector(n, batch_size=1, beta1=beta1, beta2=beta2)
    s = {i: 1.0 / n for i in range(n)}
    steps = [([0, 1, 2], [1.0, 2.0, 0.5]), ([2, 3, 0], [0.25, 3.0, 4.0]), ([0, 2, 9], [0.0, 1.5, 7.0])]
    for ids, losses in steps:  # ids 0 and 2 recur across steps
        w = sel.update(torch.tensor(ids), torch.tensor(losses))
        expected_w = [beta1 * s[i] + (1 - beta1) * l for i, l in zip(ids, losses)]
        for i, l in zip(ids, losses):
            s[i] = beta2 * s[i] + (1 - beta2) * l
        assert torch.allclose(w, torch.tensor(expected_w), rtol=1e-6, atol=0)
        assert torch.allclose(sel.store.gather(torch.arange(n)), torch.tensor([s[i] for i in range(n)]),
                              rtol=1e-6, atol=0)


def test_gumbel_top_k_matches_exact_inclusion_probabilities():
    weights = np.array([1.0, 2.0, 3.0, 4.0, 10.0])
    for b in (1, 2, 3):
        sel = LossSelector(b, seed=1)
        got = frequencies(sel, torch.tensor(weights, dtype=torch.float32), 20000)
        # 20000 trials: the standard error is <= 0.0036; allow 4.5 of them
        np.testing.assert_allclose(got, exact_inclusion(weights, b), atol=0.016)


def test_es_selection_probabilities_follow_w():
    n = 5
    sel = ESSelector(n, batch_size=2, beta1=0.5, beta2=0.5, seed=3)
    losses = torch.tensor([0.1, 0.2, 0.3, 0.4, 2.0])
    ids = torch.arange(n)
    # w is computed before the score update, so fix the scores each trial to test the draw alone
    counts = np.zeros(n)
    trials = 20000
    for _ in range(trials):
        sel.store.scatter(ids, torch.full((n,), 1.0 / n))
        counts[sel.select(ids, losses).numpy()] += 1
    w = 0.5 * (1.0 / n) + 0.5 * losses.numpy()
    np.testing.assert_allclose(counts / trials, exact_inclusion(w, 2), atol=0.016)


def test_burn_in_and_anneal_select_uniformly_but_update_scores():
    n, b = 8, 3
    losses = torch.tensor([100.0] + [1e-6] * 7)
    ids = torch.arange(n)
    es = ESSelector(n, b, burn_in=0.2, anneal=0.2, total_steps=10, seed=4)
    uni = UniformSelector(b, seed=4)
    uniform_steps = [s for s in range(10) if es.is_uniform_step(s)]
    assert uniform_steps == [0, 1, 8, 9]
    for step in range(10):
        before = es.store.gather(ids).clone()
        chosen, reference = es.select(ids, losses), uni.select(ids, losses)
        if step in uniform_steps:  # same generator stream, constant weights: the uniform draw
            assert sorted(chosen.tolist()) == sorted(reference.tolist())
        else:
            assert 0 in chosen.tolist()
        assert not torch.equal(es.store.gather(ids), before)  # scores update every step


def test_state_round_trip_gives_identical_later_selections():
    n, b = 50, 4
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randperm(n, generator=gen)[:12], torch.rand(12, generator=gen)) for _ in range(12)]
    a = ESSelector(n, b, seed=9)
    for ids, losses in batches[:5]:
        a.select(ids, losses)
    state = a.state_dict()
    assert "store" not in state  # the scores are the store's own state, saved once
    scores = a.store.state_dict()
    rest_a = [a.select(ids, losses).tolist() for ids, losses in batches[5:]]
    b_sel = ESSelector(n, b, seed=123)  # different seed: the state must override it
    b_sel.load_state_dict(state)
    b_sel.store.load_state_dict(scores)
    rest_b = [b_sel.select(ids, losses).tolist() for ids, losses in batches[5:]]
    assert rest_a == rest_b
    assert torch.equal(a.store.gather(torch.arange(n)), b_sel.store.gather(torch.arange(n)))


def test_reweight_exposes_inverse_probabilities():
    n = 4
    sel = ESSelector(n, 2, beta1=0.0, reweight=True)
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0])
    chosen = sel.select(torch.arange(n), losses)
    p = losses / losses.sum()
    assert torch.allclose(sel.last_weights, 1.0 / (n * p[chosen]), rtol=1e-5)


@pytest.mark.parametrize("call,match", [
    (lambda s: s.select(torch.arange(4), torch.ones(3)), "ids has shape \\(4,\\) but losses has 3"),
    (lambda s: s.select(torch.arange(4), torch.tensor([1.0, float("nan"), 1.0, 1.0])),
     "non-finite value nan at position 1 \\(sample id 1\\)"),
    (lambda s: s.select(torch.tensor([0, 1, 2, 10]), torch.ones(4)), "sample id 10 is outside \\[0, 10\\)"),
    (lambda s: s.select(torch.tensor([0, -1, 2, 3]), torch.ones(4)), "sample id -1 is outside"),
    (lambda s: s.select(torch.arange(2), torch.ones(2)), "batch_size b=3 exceeds the meta-batch size B=2"),
    (lambda s: s.select(torch.arange(4), torch.ones(4, 2)), "losses must be a 1-D tensor"),
    (lambda s: s.select(torch.tensor([1, 1, 2, 3]), torch.ones(4)), "repeats a sample id"),
])
def test_bad_inputs_are_named(call, match):
    sel = ESSelector(10, 3)
    with pytest.raises((ValueError, IndexError), match=match):
        call(sel)
    assert sel.step == 0  # nothing was consumed by a refused call


@pytest.mark.parametrize("kwargs,match", [
    (dict(beta1=-0.1), "beta1 must be in \\[0, 1\\]"),
    (dict(beta2=1.5), "beta2 must be in \\[0, 1\\]"),
    (dict(burn_in=0.1), "total_steps"),
    (dict(burn_in=0.6, anneal=0.6, total_steps=10), "burn_in \\+ anneal"),
    (dict(floor=0.0), "floor must be > 0"),
    (dict(store=ScoreStore(5)), "store holds 5 scores"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ESSelector(10, 3, **kwargs)
    with pytest.raises(ValueError, match="batch_size \\(b\\) must be an integer >= 1"):
        ESSelector(10, 0)


def test_topk_picks_the_largest_losses():
    losses = torch.tensor([0.3, 5.0, 0.1, 2.0, 4.0])
    assert sorted(TopKSelector(2).select(None, losses).tolist()) == [1, 4]


def test_loss_selector_single_draw_is_proportional_to_loss():
    losses = torch.tensor([1.0, 3.0, 6.0])
    np.testing.assert_allclose(frequencies(LossSelector(1, seed=2), losses, 20000),
                               losses.numpy() / 10.0, atol=0.015)


def test_uniform_selector_is_uniform():
    got = frequencies(UniformSelector(2, seed=5), torch.tensor([9.0, 0.1, 5.0, 1.0]), 20000)
    np.testing.assert_allclose(got, [0.5] * 4, atol=0.016)


def test_selective_backprop_follows_percentile_power_rule():
    losses = torch.tensor([0.9, 0.1, 0.5, 0.7])  # ascending ranks: 3, 0, 1, 2
    keep = 1 / 4  # b = 1 of B = 4: exponent 1/keep - 1 = 3
    perc = (np.array([3, 0, 1, 2]) + 0.5) / 4
    p = perc ** 3 / (perc ** 3).sum()
    np.testing.assert_allclose(frequencies(SelectiveBackpropSelector(1, seed=6), losses, 20000),
                               p, atol=0.015)
    # and b = 2 matches successive sampling with the same weights (keep = 1/2: exponent 1)
    w = (np.array([3, 0, 1, 2]) + 0.5) / 4
    np.testing.assert_allclose(frequencies(SelectiveBackpropSelector(2, seed=7), losses, 20000),
                               exact_inclusion(w, 2), atol=0.016)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_select_makes_no_host_sync():
    n, big_b, b = 100_000, 4096, 1024
    sel = ESSelector(n, b, device="cuda")
    ids = torch.randperm(n)[:big_b]  # on the CPU, as the loader yields them
    losses = torch.rand(big_b, device="cuda")
    sel.select(ids, losses)  # warm-up: lazy CUDA initialisation may sync
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            chosen = sel.select(ids, losses)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert chosen.device.type == "cuda" and chosen.numel() == b
    sel.check_finite()


# --- numpy ids and integers, corpus binding -------------------------------------------------

from es_stream import ScoreError  # noqa: E402


@pytest.mark.parametrize("make", [lambda: ESSelector(np.int64(20), np.int64(2), max_pending=np.int64(4),
                                                     total_steps=np.int64(10), burn_in=0.1, seed=np.int64(1)),
                                  lambda: LossSelector(np.int64(2)), lambda: TopKSelector(2),
                                  lambda: SelectiveBackpropSelector(2), lambda: UniformSelector(2)],
                         ids=["es", "loss", "topk", "selective-backprop", "uniform"])
def test_numpy_ids_and_integers_work_where_tensors_and_ints_do(make):
    losses = torch.tensor([0.5, 2.0, 1.0, 0.25])
    for ids in (np.array([3, 7, 1, 12]), np.array([3, 7, 1, 12], np.uint32), [3, 7, 1, 12]):
        a, b = make(), make()
        assert a.select(ids, losses).tolist() == b.select(torch.tensor([3, 7, 1, 12]), losses).tolist()
        if isinstance(a, ESSelector):
            assert torch.equal(a.store.gather(torch.arange(20)), b.store.gather(torch.arange(20)))
            a.update(np.array([0, 19]), torch.tensor([1.0, 1.0]))
    with pytest.raises(TypeError, match="ids must be integer sample ids, got float64"):
        make().select(np.array([3.0, 7.0, 1.0, 12.0]), losses)


def test_selector_binds_its_store_to_the_corpus():
    sel = ESSelector(10, 2, fingerprint="corpus-a")
    assert sel.store.fingerprint == "corpus-a"
    with pytest.raises(ScoreError, match="holds scores of corpus corpus-a, not of corpus corpus-b"):
        ESSelector(10, 2, store=sel.store, fingerprint="corpus-b")
    with pytest.raises(TypeError, match="store must be an es_stream.ScoreStore, got Tensor"):
        ESSelector(10, 2, store=torch.zeros(10))


def test_an_empty_meta_batch_is_refused_with_its_own_message_not_drop_last():
    """An all-lost meta-batch (on_error='skip') is empty: the message says how to skip it, not
    to set drop_last (which would not help)."""
    selector = ESSelector(100, batch_size=4)
    with pytest.raises(ValueError, match="empty.*lost_ids") as info:
        selector.select(torch.empty(0, dtype=torch.long), torch.empty(0))
    assert "drop_last" not in str(info.value)
