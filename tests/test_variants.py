"""The method variants of "Selection that pays": unbiased (rescaled) ESWP, ES's importance
weights, the b schedule, the fresh-score skip of the scoring forward, and InfoBatch on ES scores —
each against its definition, and in the shared training loop on real shards."""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from es_stream import BatchSchedule, ESSelector, ESWPPolicy, ManifestError, Pruner, ScoreStore
from test_selector import exact_inclusion


def decide(policy, scores, epoch=1, total=4, scored=None):
    chunks = list(policy.decide(lambda a, b: scores[a:b], len(scores), epoch, total,
                                scored=scored))
    return np.concatenate([d.keep for d in chunks]), np.concatenate([d.weight for d in chunks])


def linear_batch(n: int = 300, d: int = 4):
    """Per-sample gradients of a linear least-squares model at a fixed point, and their losses
    as scores (right-skewed, like real losses: a few large)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, d))
    theta = rng.normal(size=d)
    y = x @ theta + 0.5 * rng.normal(size=n) + 3.0 * (rng.random(n) < 0.1)
    r = x @ theta - y
    return r[:, None] * x, (0.5 * r ** 2).astype(np.float32)


# ----------------------------------------------------------------------------- rescaled ESWP
def test_rescaled_eswp_keeps_the_expected_gradient_of_a_fixed_batch_and_plain_eswp_does_not():
    grads, scores = linear_batch()
    n, full, seeds = len(scores), grads.sum(0), 300

    def estimates(rescale: bool) -> np.ndarray:
        out = []
        for seed in range(seeds):
            keep, w = decide(ESWPPolicy(0.3, anneal=0.0, burn_in_epochs=0, seed=seed,
                                        rescale=rescale), scores)
            # plain ESWP trains the mean of what it keeps: the sum scaled by n / kept
            out.append((keep * w) @ grads if rescale else n / keep.sum() * (keep @ grads))
        return np.array(out)

    def z(est: np.ndarray) -> np.ndarray:  # deviation from the full sum in standard errors
        return (est.mean(0) - full) / (est.std(0, ddof=1) / math.sqrt(len(est)))

    assert np.abs(z(estimates(True))).max() < 4.0
    # the same check catches the biased draw: plain ESWP keeps high-loss samples more often
    assert np.abs(z(estimates(False))).max() > 10.0


def test_rescaled_eswp_prunes_below_the_mean_with_the_stated_probabilities():
    _, scores = linear_batch()
    n = len(scores)
    policy = ESWPPolicy(0.3, anneal=0.0, burn_in_epochs=0, seed=4, rescale=True, min_keep=0.2)
    mean, c = policy.keep_probabilities(lambda a, b: scores[a:b], n)
    assert mean == pytest.approx(scores.astype(np.float64).mean())
    candidate = scores < mean
    pi = np.clip(c * scores.astype(np.float64), 0.2, 1.0)
    # expected number pruned: ratio * n (c solved on a histogram: up to its bin width)
    assert (1 - pi[candidate]).sum() == pytest.approx(0.3 * n, rel=1e-3)
    keep, weight = decide(policy, scores)
    assert keep[~candidate].all() and (weight[~candidate] == 1).all()
    np.testing.assert_allclose(weight[candidate & keep], 1 / pi[candidate & keep], rtol=1e-6)
    assert weight.max() <= 1 / 0.2 + 1e-4
    # realised: about ratio * n pruned, the same decision for the same seed, another for another
    pruned = [n - decide(ESWPPolicy(0.3, anneal=0.0, burn_in_epochs=0, seed=s, rescale=True,
                                    min_keep=0.2), scores)[0].sum() for s in range(200)]
    assert abs(np.mean(pruned) - 0.3 * n) < 4 * np.std(pruned) / math.sqrt(200)
    again = decide(policy, scores)
    assert (again[0] == keep).all() and (again[1] == weight).all()
    assert not (decide(ESWPPolicy(0.3, anneal=0.0, burn_in_epochs=0, seed=5, rescale=True,
                                  min_keep=0.2), scores)[0] == keep).all()


def test_rescaled_eswp_prunes_what_it_can_when_few_are_below_the_mean():
    scores = np.array([1.0] * 90 + [100.0] * 10, dtype=np.float32)  # mean 10.9: 90 candidates
    policy = ESWPPolicy(0.9, anneal=0.0, burn_in_epochs=0, rescale=True, min_keep=0.25)
    _, c = policy.keep_probabilities(lambda a, b: scores[a:b], len(scores))
    assert c == 0.0  # 0.9 * 100 > 0.75 * 90: every candidate at min_keep
    keep, weight = decide(policy, scores)
    assert keep[90:].all() and set(weight[:90][keep[:90]]) == {4.0}


def test_rescaled_eswp_keeps_never_scored_at_weight_one_and_names_itself(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_policy import corpus_of, kept_ids

    corpus = corpus_of(tmp_path)
    n = corpus.num_samples
    store = ScoreStore(n)
    rng = np.random.default_rng(1)
    store.scatter(torch.arange(40), torch.from_numpy(rng.exponential(size=40).astype(np.float32)))
    pruner = Pruner(corpus, store, ESWPPolicy(0.3, anneal=0.0, burn_in_epochs=0, rescale=True),
                    tmp_path / "m")
    summary = pruner.write(1, 4)
    assert set(range(40, 50)) <= set(kept_ids(tmp_path / "m", corpus, 1).tolist())
    assert summary["never_scored"] == 10 and summary["pruned"] > 0 and summary["rescaled"] > 0
    # a resumed run must prune the same way: plain ESWP's pruner refuses this one's state
    # (another run in the same directory: refused at construction unless overwrite=True)
    with pytest.raises(ManifestError, match="rescale='True' there, None here"):
        Pruner(corpus, store, ESWPPolicy(0.3, anneal=0.0, burn_in_epochs=0), tmp_path / "m")
    plain = Pruner(corpus, store, ESWPPolicy(0.3, anneal=0.0, burn_in_epochs=0), tmp_path / "m",
                   overwrite=True)
    with pytest.raises(ValueError, match="cannot resume: the checkpoint.s pruner has (min_keep|rescale)"):
        plain.load_state_dict(pruner.state_dict())
    assert "rescale" not in plain.state_dict()  # plain ESWP's write ids are as they were


@pytest.mark.parametrize("kwargs,error,match", [
    ({"rescale": "yes"}, TypeError, "rescale must be True or False"),
    ({"rescale": True, "min_keep": 0.0}, ValueError, "min_keep must be in \\(0, 1\\]"),
])
def test_rescaled_eswp_bad_arguments_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        ESWPPolicy(0.3, **kwargs)


# ----------------------------------------------------------------------------- ES importance weights


LOSSES = torch.tensor([0.2, 0.5, 1.0, 3.0, 8.0])


def test_unbiased_weights_are_b_over_B_q_given_the_next_key():
    n, b, seed = 5, 3, 11
    sel = ESSelector(n, b, beta1=0.0, beta2=0.0, reweight="unbiased", seed=seed)
    chosen = sel.select(torch.arange(n), LOSSES)
    # the selector's draw, recomputed from its seed: log p + Gumbel keys
    gen = torch.Generator().manual_seed(seed)
    log_p = (LOSSES / LOSSES.sum()).log()
    keys = log_p - torch.empty(n).exponential_(generator=gen).log()
    order = keys.argsort(descending=True)
    assert set(chosen.tolist()) == set(order[:b].tolist())
    kappa = keys[order[b]]
    q = 1 - torch.exp(-torch.exp(log_p[chosen] - kappa))
    torch.testing.assert_close(sel.last_weights, b / (n * q), rtol=1e-5, atol=0)


def inclusion_weighted(mode: str, b: int, trials: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard error over draws of ``1{i drawn} * w_i * B / b`` for each i (1 for an
    unbiased estimate of the meta-batch mean)."""
    n = LOSSES.numel()
    sel = ESSelector(n, b, beta1=0.0, beta2=0.0, reweight=mode, seed=0)
    acc = np.zeros((trials, n))
    for t in range(trials):
        chosen = sel.select(torch.arange(n), LOSSES)
        acc[t, chosen.numpy()] = sel.last_weights.numpy() * n / b
    return acc.mean(0), acc.std(0, ddof=1) / math.sqrt(trials)


def test_unbiased_weights_make_every_sample_count_once_in_expectation_and_approx_does_not():
    b, trials = 3, 6000
    mean, se = inclusion_weighted("unbiased", b, trials)
    assert np.abs((mean - 1) / se).max() < 4.5
    # the 1/(B p) approximation, by its definition: E = pi_i / (b p_i), pi the exact inclusion
    # probabilities of the without-replacement draw (enumerated): biased at b/B = 3/5
    p = (LOSSES / LOSSES.sum()).numpy().astype(np.float64)
    mean, se = inclusion_weighted("approx", b, trials)
    expected = exact_inclusion(p, b) / (b * p)
    assert np.abs((mean - expected) / se).max() < 4.5
    assert np.abs((mean - 1) / se).max() > 10


def test_reweight_modes_and_uniform_steps():
    sel = ESSelector(10, 3, reweight="unbiased", burn_in=0.5, total_steps=4)
    sel.select(torch.arange(5), torch.rand(5))  # a burn-in step: uniform, weights exactly 1
    assert torch.equal(sel.last_weights, torch.ones(3))
    assert ESSelector(10, 3, reweight=True).reweight == "approx"
    with pytest.raises(ValueError, match="reweight must be False, 'unbiased' or 'approx'"):
        ESSelector(10, 3, reweight="exact")
    all_of = ESSelector(10, 5, reweight="unbiased")
    assert sorted(all_of.select(torch.arange(5), torch.rand(5)).tolist()) == list(range(5))
    assert torch.equal(all_of.last_weights, torch.ones(5))


# ----------------------------------------------------------------------------- b schedule
def test_batch_schedule_moves_b_between_b_and_B():
    down = BatchSchedule("to_uniform", 16, 48, ramp=0.5)
    up = BatchSchedule("from_uniform", 16, 48, ramp=0.5)
    assert [down(p) for p in (0, 0.25, 0.5, 0.9, 1)] == [16, 32, 48, 48, 48]
    assert [up(p) for p in (0, 0.25, 0.5, 0.75, 1)] == [48, 48, 48, 32, 16]
    assert all(down(p) == up(1 - p) for p in np.linspace(0, 1, 101))
    for kwargs, match in [({"kind": "cosine"}, "kind must be one of"),
                          ({"b": 64}, "need 1 <= b <= B"), ({"ramp": 0.0}, "ramp must be")]:
        with pytest.raises(ValueError, match=match):
            BatchSchedule(**{"kind": "to_uniform", "b": 16, "B": 48, **kwargs})


def test_select_draws_b_given_per_call_and_record_scores_from_training_losses():
    sel = ESSelector(10, 2, beta1=0.2, beta2=0.8)
    assert sel.select(torch.arange(6), torch.rand(6), b=5).numel() == 5
    with pytest.raises(ValueError, match="batch_size b=7 exceeds the meta-batch size B=6"):
        sel.select(torch.arange(6), torch.rand(6), b=7)
    before = sel.store.gather(torch.tensor([7, 8]))
    sel.record(torch.tensor([7, 8]), torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(sel.store.gather(torch.tensor([7, 8])),
                               0.8 * before + 0.2 * torch.tensor([1.0, 2.0]))
    assert sel.step == 2 and sel.last_weights is None


# ----------------------------------------------------------------------------- fresh scores
def test_fresh_scores_stand_in_for_losses_and_turn_stale_after_fresh_steps():
    sel = ESSelector(20, 2, beta1=0.2, beta2=0.8, fresh_steps=2)
    ids = torch.arange(6)
    assert sel.stale(ids).all()  # never updated
    sel.select(ids, torch.arange(1.0, 7.0))
    assert not sel.stale(ids).any() and sel.stale(torch.tensor([6, 7])).all()
    scores = sel.store.gather(ids)
    # rows 0..2 forwarded, 3..5 fresh: their losses are ignored, their scores stay, and their
    # sampling weight is their stored score
    forwarded = torch.tensor([True, True, True, False, False, False])
    w = sel.update(ids, torch.tensor([9.0, 9.0, 9.0, 0.0, 0.0, 0.0]), forwarded)
    torch.testing.assert_close(w[3:], scores[3:])
    assert torch.equal(sel.store.gather(ids)[3:], scores[3:])
    torch.testing.assert_close(sel.store.gather(ids)[:3], 0.8 * scores[:3] + 0.2 * 9.0)
    sel.step += 1
    sel.step += 1  # two more steps: rows 3..5 were last updated 3 steps ago, 0..2 only 2
    assert sel.stale(ids).tolist() == [False, False, False, True, True, True]
    # the update steps survive a checkpoint
    other = ESSelector(20, 2, fresh_steps=2)
    other.load_state_dict(sel.state_dict())
    assert torch.equal(other.stale(ids), sel.stale(ids))
    with pytest.raises(ValueError, match="fresh_steps must be >= 0"):
        ESSelector(20, 2, fresh_steps=-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_variants_make_no_host_sync():
    n, big_b, b = 100_000, 4096, 1024
    sel = ESSelector(n, b, device="cuda", reweight="unbiased", fresh_steps=3)
    ids = torch.randperm(n)[:big_b]  # on the CPU, as the loader yields them
    losses = torch.rand(big_b, device="cuda")
    sel.select(ids, losses)  # warm-up: lazy CUDA initialisation may sync
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(5):
            stale = sel.stale(ids)  # host ids, host mask
            chosen = sel.select(ids, losses, b=b - step, forwarded=stale)
            sel.record(ids[:b], losses[:b])
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert chosen.device.type == sel.last_weights.device.type == "cuda"
    assert chosen.numel() == b - 4


# ----------------------------------------------------------------------------- in the loop
pytest.importorskip("mnist1d")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines import loop  # noqa: E402
from pipelines.mnist1d import data as m1d_data  # noqa: E402
from pipelines.mnist1d import train as m1d  # noqa: E402

b, B, EPOCHS = 16, 48, 3


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def workload(tmp_path_factory: pytest.TempPathFactory) -> loop.Workload:
    d = m1d_data.build(tmp_path_factory.mktemp("data") / "mnist1d", 200, 100, 0.0, 42, "wds")
    return m1d.workload(d.corpus, d.test_x, d.test_y)


def traced(workload: loop.Workload, calls: list) -> loop.Workload:
    """``workload`` whose model records each training-mode forward: (gradients on?, its input
    rows as bytes). Evaluation forwards (eval mode) are left out."""

    def make_model():
        model = workload.make_model()

        def hook(module, inputs):
            if module.training:
                x = inputs[0].detach().reshape(len(inputs[0]), -1).numpy()
                calls.append((torch.is_grad_enabled(), [row.tobytes() for row in x]))

        model.register_forward_pre_hook(hook)
        return model

    return dataclasses.replace(workload, make_model=make_model)


def steps_of(calls: list) -> list[tuple[list | None, list]]:
    """(scored rows or None, trained rows) per step: a no-grad forward, if any, scores the step
    whose training forward follows it."""
    steps, scored = [], None
    for grad, rows in calls:
        if grad:
            steps.append((scored, rows))
            scored = None
        else:
            scored = rows
    return steps


@pytest.mark.parametrize("method", ["es_to_uniform", "es_from_uniform"])
def test_the_loop_follows_the_b_schedule_and_spends_no_scoring_forward_at_b_equal_B(
        workload, method: str) -> None:
    calls: list = []
    config = loop.RunConfig(EPOCHS, b=b, B=B, seed=1, progress=False, b_ramp=0.5)
    r = loop.train(traced(workload, calls), method, config)
    steps = steps_of(calls)
    per_epoch = math.ceil(workload.corpus.num_samples / B)
    assert len(steps) == r["steps"] == EPOCHS * per_epoch
    schedule = BatchSchedule(loop.SCHEDULES[method], b, B, ramp=0.5)
    at_B = 0
    for t, (scored, trained) in enumerate(steps):
        want = schedule((t // per_epoch + (t % per_epoch) / per_epoch) / EPOCHS)
        if scored is None:  # trained whole: a meta-batch no larger than this step's b
            assert len(trained) <= want, t
            at_B += want == B
        else:  # scored the whole meta-batch, trained b of it
            assert len(trained) == want < len(scored) and set(trained) <= set(scored), t
    assert at_B >= per_epoch  # at least an epoch's steps at b == B, none of them scored
    assert r["samples_scored"] == sum(len(s) for s, _ in steps if s is not None)
    assert r["samples_backpropagated"] == sum(len(tr) for _, tr in steps)


def test_fresh_scores_skip_the_scoring_forward_and_forwarded_counts_what_was_forwarded(
        workload) -> None:
    calls: list = []
    config = loop.RunConfig(EPOCHS, b=b, B=B, seed=2, progress=False)
    r = loop.train(traced(workload, calls), "es_fresh", config)
    es = loop.train(workload, "es", config)
    n = workload.corpus.num_samples
    steps = steps_of(calls)
    scored = sum(len(s) for s, _ in steps if s is not None)
    # every sample forwarded at least once, counted once per step: scored rows, plus trained
    # rows that were not scored (fresh ones selected, and meta-batches trained whole)
    forwarded = sum(len(set(tr) | set(s or ())) for s, tr in steps)
    assert r["samples_scored"] == scored and r["samples_forwarded"] == forwarded
    assert es["samples_scored"] == EPOCHS * (n - n % B) and es["samples_forwarded"] == EPOCHS * n
    per_epoch = math.ceil(n / B)
    first = sum(len(s) for s, _ in steps[:per_epoch] if s is not None)
    assert first == n - n % B  # epoch 0: nothing is fresh yet (the tail of 8 <= b is not scored)
    assert scored < es["samples_scored"] - n // 4 and forwarded < es["samples_forwarded"]
    assert r["samples_backpropagated"] == es["samples_backpropagated"]


def test_the_other_variants_train_and_use_what_they_are_given(workload, tmp_path: Path) -> None:
    n = workload.corpus.num_samples
    config = loop.RunConfig(EPOCHS, b=b, B=B, seed=3, progress=False, prune_burn_in_epochs=1)
    es = loop.train(workload, "es", config)
    runs = {m: loop.train(workload, m, dataclasses.replace(config, run_dir=str(tmp_path / m)))
            for m in ("eswp_rescale", "infobatch_es", "es_reweight")}
    for m, r in runs.items():
        assert 0.0 < r["final_acc"] <= 1.0 and r["steps"] > 0, m
    # eswp_rescale: epoch 1 pruned (about 30% expected), the rest whole
    assert 2 * n < runs["eswp_rescale"]["samples_forwarded"] < 3 * n
    # infobatch_es: no scoring forward at all, batches of b, pruned in epoch 1 on ES's scores
    info = runs["infobatch_es"]
    assert info["samples_scored"] == 0
    assert info["samples_forwarded"] == info["samples_backpropagated"] < EPOCHS * n
    saved = ScoreStore.load(str(tmp_path / "infobatch_es" / "scores.npy"))
    assert saved.scored_range(0, n).all()  # every sample scored from its training losses
    # es_reweight: the same draws as es (same keys), trained with weights: another run
    assert runs["es_reweight"]["samples_backpropagated"] == es["samples_backpropagated"]
    assert runs["es_reweight"]["final_acc"] != es["final_acc"] or \
        runs["es_reweight"]["curve"] != es["curve"]


def test_variant_options_are_checked(workload) -> None:
    for options, match in [({"rescale_min_keep": 0.0}, "rescale_min_keep"),
                           ({"b_ramp": 1.5}, "b_ramp"), ({"fresh_epochs": 0.0}, "fresh_epochs")]:
        with pytest.raises(ValueError, match=match):
            loop.train(workload, "es", loop.RunConfig(1, progress=False, **options))
