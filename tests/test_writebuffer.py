"""WriteBuffer: the newest value per id wins, across segments and merges."""

from __future__ import annotations

import numpy as np
import pytest

from es_stream.writebuffer import WriteBuffer


def test_overlay_and_drain_follow_a_dict_of_latest_values():
    rng = np.random.default_rng(0)
    buf, truth = WriteBuffer(capacity=10_000), {}
    for step in range(200):
        ids = rng.choice(500, size=rng.integers(1, 40), replace=False)
        values = rng.random(len(ids)).astype(np.float32)
        buf.add(ids, values)
        truth.update(zip(ids.tolist(), values.tolist()))
        query = rng.integers(0, 600, 64)
        got = np.full(64, -1.0, np.float32)
        buf.overlay(query, got)
        want = [truth.get(i, -1.0) for i in query.tolist()]
        assert got.tolist() == pytest.approx(want)
    assert len(buf.segments) <= 12  # merged, not one segment per add
    ids, values = buf.drain()
    assert ids.tolist() == sorted(truth)
    assert values.tolist() == pytest.approx([truth[i] for i in sorted(truth)])
    assert len(buf) == 0 and not buf.full


def test_full_counts_entries_and_capacity_is_checked():
    buf = WriteBuffer(capacity=4)
    buf.add(np.array([3, 1]), np.array([1.0, 2.0]))
    assert not buf.full
    buf.add(np.array([5, 7]), np.array([1.0, 2.0]))
    assert buf.full
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        WriteBuffer(0)
