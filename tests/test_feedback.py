"""FeedbackChannel: the asynchronous path gives exactly the synchronous path's scores and picks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from es_stream import ESSelector, FeedbackChannel, ScoreStore


def meta_batches(n: int, big_b: int, steps: int, seed: int = 0):
    """Random meta-batches of a small corpus, so ids recur within a few steps (while their
    previous update is still in flight)."""
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        ids = torch.from_numpy(rng.choice(n, big_b, replace=False))
        yield ids, torch.from_numpy(rng.gamma(2.0, 1.0, big_b).astype(np.float32))


def make_store(kind: str, n: int, tmp_path, name: str) -> ScoreStore:
    if kind == "memory":
        return ScoreStore(n)
    return ScoreStore.open(tmp_path / f"{name}.npy", n, buffer_size=37)


@pytest.mark.parametrize("kind", ["memory", "memmap"])
@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("max_pending", [1, 3])
def test_async_channel_matches_the_synchronous_path(tmp_path, kind, prefetch, max_pending):
    n, big_b, b = 40, 16, 4
    sync = ESSelector(n, b, seed=3, store=make_store(kind, n, tmp_path, "sync"), feedback="sync")
    asyn = ESSelector(n, b, seed=3, store=make_store(kind, n, tmp_path, "async"), feedback="async",
                      max_pending=max_pending)
    batches = list(meta_batches(n, big_b, 60))
    channel = asyn.channel("cpu")
    in_flight = 0
    for t, (ids, losses) in enumerate(batches):
        if prefetch:
            asyn.prefetch(ids, "cpu")
        assert torch.equal(sync.select(ids, losses), asyn.select(ids, losses)), f"step {t}"
        if prefetch and t + 1 < len(batches):  # stage the next batch before anything commits
            asyn.prefetch(batches[t + 1][0], "cpu")
        in_flight = max(in_flight, channel.pending)
    assert in_flight == max_pending  # updates really were in flight, not committed at once
    # whole-store reads commit what is in flight: no explicit flush needed
    assert asyn.store.to_numpy().tolist() == sync.store.to_numpy().tolist()
    assert channel.pending == 0


def test_flush_and_state_dict_commit_pending_updates():
    n = 30
    sel = ESSelector(n, 2, feedback="async", max_pending=8)
    ids = torch.arange(10)
    sel.select(ids, torch.full((10,), 5.0))
    assert sel.channel("cpu").pending == 1
    state = sel.state_dict()
    assert sel.channel("cpu").pending == 0 and "store" not in state
    expected = 0.8 / n + 0.2 * 5.0
    assert sel.store.read_range(0, 10).tolist() == pytest.approx([expected] * 10)
    with pytest.warns(DeprecationWarning, match="with_store=.... is deprecated"):
        old = sel.state_dict(with_store=True)  # the deprecated route still copies the scores
    assert old["store"]["scores"][:10].tolist() == pytest.approx([expected] * 10)


def test_channel_arguments_are_checked():
    with pytest.raises(ValueError, match="max_pending must be >= 1"):
        FeedbackChannel(ScoreStore(10), "cpu", max_pending=0)
    with pytest.raises(ValueError, match="feedback must be 'auto', 'sync' or 'async'"):
        ESSelector(10, 2, feedback="later")
    # auto on CPU: the store is where the losses are, so no channel
    assert ESSelector(10, 2).channel("cpu") is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_host_store_channel_makes_no_host_sync(tmp_path):
    n, big_b, b = 1_000_000, 4096, 1024
    host = ScoreStore.open(tmp_path / "scores.npy", n)
    sel = ESSelector(n, b, store=host)  # auto: a channel between the host store and the GPU
    ref = ESSelector(n, b, feedback="sync")  # reference: CPU store, blocking copies
    batches = list(meta_batches(n, big_b, 12, seed=5))
    picks = []
    for ids, losses in batches[:2]:  # warm-up: CUDA initialisation and pinned buffers may sync
        picks.append(sel.select(ids, losses.cuda()))
    torch.cuda.set_sync_debug_mode("error")
    try:
        for t, (ids, losses) in enumerate(batches[2:], start=2):
            sel.prefetch(ids, "cuda")
            picks.append(sel.select(ids, losses.cuda()))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for (ids, losses), pick in zip(batches, picks):
        assert torch.equal(torch.sort(ref.select(ids, losses.cuda()))[0],
                           torch.sort(pick)[0])
    assert np.allclose(host.to_numpy(), ref.store.to_numpy())


def test_selector_checks_max_pending_up_front():
    with pytest.raises(ValueError, match="max_pending must be an integer >= 1, got 0"):
        ESSelector(10, 2, max_pending=0)


def test_the_old_module_path_still_works_with_a_warning():
    import importlib
    import sys

    sys.modules.pop("es_stream.feedback", None)
    with pytest.warns(DeprecationWarning, match="es_stream.feedback is deprecated"):
        old = importlib.import_module("es_stream.feedback")
    assert old.FeedbackChannel is FeedbackChannel
