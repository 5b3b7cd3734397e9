"""The epoch plan alone: exactly-once coverage, equal ranks, determinism, edge cases."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from es_stream.plan import EpochPlan, block_shuffled_positions, rank_batch_sizes


def everything(counts, world, workers, b, **kw):
    """All (rank, worker) meta-batches of one epoch."""
    out = {}
    for r, w in itertools.product(range(world), range(workers)):
        plan = EpochPlan(counts, meta_batch_size=b, world_size=world, rank=r, **kw)
        out[r, w] = plan.worker_batches(workers, w)
    return out


CASES = list(itertools.product(
    [(7, 13, 1, 20, 9), (100,), (1, 1, 1, 1, 1, 1, 1), (64, 64)],  # shard counts
    [1, 2, 3, 4],  # world size
    [1, 2, 3],  # workers
    [1, 4, 8, 32],  # meta-batch size
))


@pytest.mark.parametrize("counts,world,workers,b", CASES)
def test_every_sample_exactly_once_and_ranks_equal(counts, world, workers, b):
    n = sum(counts)
    try:
        batches = everything(counts, world, workers, b, seed=3, epoch=1)
    except ValueError as exc:  # only the documented impossible case may refuse
        assert b == 1 and "meta_batch_size=1" in str(exc)
        return
    ids = np.concatenate([m for bs in batches.values() for m in bs])
    assert np.array_equal(np.sort(ids), np.arange(n))
    per_rank = [sum(len(batches[r, w]) for w in range(workers)) for r in range(world)]
    assert len(set(per_rank)) == 1, per_rank
    for bs in batches.values():
        assert all(1 <= len(m) <= b for m in bs)
    for r in range(world):
        short = sum(len(m) < b for w in range(workers) for m in batches[r, w])
        # at most one short tail per rank, except the documented halving (two halves)
        assert short <= 2
        if short == 2:
            assert n % (world * b) < world


def test_drop_last_gives_full_batches_and_counts_the_rest():
    counts = (7, 13, 1, 20, 9)
    plans = [EpochPlan(counts, meta_batch_size=8, world_size=2, rank=r, seed=0, epoch=0,
                       drop_last=True) for r in range(2)]
    ids = np.concatenate([p.ids(0, p.num_batches) for p in plans])
    assert all(len(m) == 8 for p in plans for m in p.worker_batches())
    assert len(ids) == 48 and len(set(ids.tolist())) == 48
    assert plans[0].dropped == 50 - 48


def test_same_arguments_same_plan_other_epoch_other_plan():
    counts = (50, 50, 50, 50)
    a = EpochPlan(counts, meta_batch_size=16, seed=1, epoch=0).ids(0, 13)
    b = EpochPlan(counts, meta_batch_size=16, seed=1, epoch=0).ids(0, 13)
    c = EpochPlan(counts, meta_batch_size=16, seed=1, epoch=1).ids(0, 13)
    d = EpochPlan(counts, meta_batch_size=16, seed=2, epoch=0).ids(0, 13)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c) and not np.array_equal(a, d)
    assert np.array_equal(np.sort(a), np.sort(c))


def test_no_shuffle_is_storage_order():
    plan = EpochPlan((3, 4), meta_batch_size=2, seed=0, epoch=5, shuffle=False)
    assert plan.ids(0, plan.num_batches).tolist() == list(range(7))


def test_unseekable_keeps_within_shard_order():
    counts = (5, 6, 7)
    plan = EpochPlan(counts, meta_batch_size=4, seed=0, epoch=2, seekable=False)
    ids = plan.ids(0, plan.num_batches)
    starts = np.concatenate([[0], np.cumsum(counts)])
    shard = np.searchsorted(starts, ids, side="right") - 1
    runs = np.split(ids, np.flatnonzero(np.diff(shard)) + 1)
    assert len(runs) == 3 and all(np.array_equal(r, np.sort(r)) for r in runs)


def test_block_shuffle_stays_inside_blocks():
    pos = block_shuffled_positions(0, 100, 100, 16, seed=0, epoch=0)
    assert np.array_equal(np.sort(pos), np.arange(100))
    assert all(set(pos[k:k + 16] // 16) == {k // 16} for k in range(0, 96, 16))
    # any sub-range is the matching slice of the whole
    assert np.array_equal(block_shuffled_positions(10, 70, 100, 16, seed=0, epoch=0), pos[10:70])


def test_rank_sizes_halving_case_is_equal():
    sizes, dropped = rank_batch_sizes(num_samples=17, world_size=4, meta_batch_size=4, drop_last=False)
    assert [len(s) for s in sizes] == [2, 2, 2, 2] and sum(int(s.sum()) for s in sizes) == 17
    assert dropped == 0


@pytest.mark.parametrize("kwargs,match", [
    (dict(meta_batch_size=0), "meta_batch_size must be >= 1"),
    (dict(meta_batch_size=4, world_size=2, rank=2), "rank 2 is outside world_size 2"),
    (dict(meta_batch_size=4, block_size=0), "block_size must be >= 1"),
    (dict(meta_batch_size=100, drop_last=True), "cannot fill one meta-batch"),
    (dict(meta_batch_size=4, world_size=20, rank=0), "cannot be spread over 20 ranks"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EpochPlan((5, 6), seed=0, epoch=0, **kwargs)


@pytest.mark.parametrize("world,per_node", [(4, 2), (3, 2), (4, 1), (2, 4)])
def test_node_ids_are_the_ranks_of_the_machine(world, per_node):
    """What a machine reads is exactly what its ranks read (torchrun numbers ranks machine by
    machine), and machines together read the epoch once."""
    counts = np.array([37, 5, 60, 18])
    plans = [EpochPlan(counts, meta_batch_size=8, seed=2, epoch=1, world_size=world, rank=r,
                       block_size=16) for r in range(world)]
    rank_ids = [np.concatenate(p.worker_batches()) for p in plans]
    machines = {}
    for r, p in enumerate(plans):
        node = p.node_ids(per_node)
        first = r - r % per_node
        want = np.concatenate(rank_ids[first:min(first + per_node, world)])
        assert sorted(node.tolist()) == sorted(want.tolist())
        machines[first] = node
    assert sorted(np.concatenate(list(machines.values())).tolist()) == list(range(counts.sum()))
    with pytest.raises(ValueError, match="ranks_per_node"):
        plans[0].node_ids(0)
