"""The epoch plan: which sample ids each rank and DataLoader worker reads, in which order.

Pure numpy functions of (seed, epoch, world size, rank, number of workers), testable alone.

The shuffle, in three steps:

1. **Shard order.** Shards are permuted by ``(seed, epoch)``; the epoch's *sequence* is every
   sample, shard after shard in that order, each shard in stored order.
2. **Block shuffle** (seekable sources only). The sequence is cut into blocks of
   ``block_size`` positions and each block is permuted with its own generator
   ``(seed, epoch, block)``, like mosaicml-streaming's block shuffles: samples mix across the
   few shards a block spans, and reads stay within those shards. Streamed sources (``pipe:``,
   URLs) cannot seek, so they keep the within-shard order (write shards pre-shuffled, as is usual
   for WebDataset).
3. **Partition.** Rank r takes a contiguous range of the shuffled sequence and cuts it into
   meta-batches; its meta-batches are split into contiguous runs, one per DataLoader worker.
   The DataLoader hands out worker results round-robin, so a rank's meta-batch order depends on
   the number of workers, but it is always the same for the same arguments.

**Equal ranks.** DDP hangs when ranks take different numbers of steps, so every rank gets the same
number M of meta-batches: ``M = ceil(n / (W * B))``; ranks get ``M - 1`` full meta-batches and a
tail of ``ceil`` or ``floor`` of ``(n - W (M-1) B) / W`` samples (shorter than B, at most one per
rank). In the rare case where fewer than W samples are left for the tails, the ranks without a
tail sample split their last meta-batch in two halves instead. Nothing is duplicated or dropped.
With ``drop_last`` every rank gets ``floor(n / (W * B))`` full meta-batches and the rest of the
sequence (a different set each epoch) is left out of this epoch and counted in ``dropped``.

**Resume.** A ``DataLoader`` (in-order, the default) hands out an ``IterableDataset``'s items
round robin over workers ``0 .. W-1``, a worker leaving the rotation once it is exhausted, and
starts every iteration at worker 0 (:func:`loader_order`). So after a rank consumed ``k``
meta-batches of an epoch, :func:`worker_skips` says how many of its own run each worker had
delivered. The rest of the epoch is the same round robin over the remaining runs, but starting at
the worker of meta-batch ``k``, which is not worker 0 in general: a resumed iteration therefore
rotates the runs, DataLoader worker ``p`` reading the run of worker ``(next + p) % W`` without its
consumed meta-batches (:func:`worker_resume`), and the loader yields exactly meta-batches
``k ..`` of the uninterrupted order.
"""

from __future__ import annotations

import numpy as np


def shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """Order in which the epoch visits shards."""
    if not shuffle:
        return np.arange(num_shards, dtype=np.int64)
    return np.random.default_rng([seed, epoch, 0]).permutation(num_shards).astype(np.int64)


def rank_batch_sizes(num_samples: int, world_size: int, meta_batch_size: int,
                     drop_last: bool) -> tuple[list[np.ndarray], int]:
    """Sizes of every rank's meta-batches (equal counts on all ranks) and the number of samples
    left out (non-zero only with ``drop_last``)."""
    n, w, b = num_samples, world_size, meta_batch_size
    if drop_last:
        m = n // (w * b)
        if m == 0:
            raise ValueError(f"drop_last=True: {n} samples cannot fill one meta-batch of "
                             f"{b} on each of {w} ranks; lower meta_batch_size or set drop_last=False")
        return [np.full(m, b, dtype=np.int64) for _ in range(w)], n - m * w * b
    if n < w:
        raise ValueError(f"{n} samples cannot be spread over {w} ranks without duplicates; "
                         "use fewer ranks or a larger corpus")
    m = -(-n // (w * b))
    left = n - w * (m - 1) * b  # 1 .. w*b samples for the ranks' tails
    sizes = []
    for r in range(w):
        tail = left // w + (r < left % w)
        if tail > 0:
            sizes.append(np.array([b] * (m - 1) + [tail], dtype=np.int64))
        elif b >= 2:  # split the last full meta-batch so this rank also takes m steps
            sizes.append(np.array([b] * (m - 2) + [b - b // 2, b // 2], dtype=np.int64))
        else:
            raise ValueError(f"meta_batch_size=1: {n} samples cannot give {w} ranks equal step "
                             "counts; set drop_last=True or use a larger meta_batch_size")
    return sizes, 0


def worker_batch_range(num_batches: int, num_workers: int, worker: int) -> tuple[int, int]:
    """Contiguous run ``[first, stop)`` of a rank's meta-batches read by one worker."""
    return num_batches * worker // num_workers, num_batches * (worker + 1) // num_workers


def loader_order(counts, start: int = 0) -> np.ndarray:
    """Worker of each item, in the order an in-order ``DataLoader`` yields them when worker ``w``
    yields ``counts[w]`` items: round robin over workers ``start, start+1, .. (mod W)``, a worker
    leaving the rotation once it is exhausted. The DataLoader itself always starts at 0."""
    counts = np.asarray(counts, dtype=np.int64)
    if counts.ndim != 1 or (counts < 0).any():
        raise ValueError(f"counts must be a 1-d array of non-negative item counts, got {counts!r}")
    if not 0 <= start < max(len(counts), 1):
        raise ValueError(f"start must be a worker in [0, {len(counts)}), got {start}")
    workers = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    rounds = np.arange(len(workers), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    return workers[np.lexsort(((workers - start) % max(len(counts), 1), rounds))]


def _check_resume_args(num_batches: int, num_workers: int, consumed: int) -> None:
    if num_batches < 0:
        raise ValueError(f"num_batches must be >= 0, got {num_batches}")
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1 (1 for main-process iteration), got {num_workers}")
    if not 0 <= consumed <= num_batches:
        raise ValueError(f"consumed={consumed} meta-batches is outside [0, num_batches={num_batches}] "
                         "of this epoch; count only meta-batches of the current epoch")


def rank_loader_order(num_batches: int, num_workers: int) -> np.ndarray:
    """Worker of each of a rank's ``num_batches`` meta-batches, in the order the DataLoader yields
    them (worker ``w`` reads :func:`worker_batch_range`)."""
    _check_resume_args(num_batches, num_workers, 0)
    counts = [stop - first for first, stop in
              (worker_batch_range(num_batches, num_workers, w) for w in range(num_workers))]
    return loader_order(counts)


def worker_skips(num_batches: int, num_workers: int, consumed: int) -> np.ndarray:
    """How many meta-batches of its own run each of ``num_workers`` workers had delivered when the
    DataLoader had yielded the first ``consumed`` of a rank's ``num_batches``."""
    _check_resume_args(num_batches, num_workers, consumed)
    return np.bincount(rank_loader_order(num_batches, num_workers)[:consumed],
                       minlength=num_workers).astype(np.int64)


def worker_resume(num_batches: int, num_workers: int, consumed: int, worker: int) -> tuple[int, int]:
    """``(run, skip)`` for DataLoader ``worker`` of an iteration resumed after ``consumed``
    meta-batches: read worker ``run``'s :func:`worker_batch_range` without its first ``skip``
    meta-batches. ``run`` rotates the workers so that the DataLoader, which starts at worker 0,
    continues the uninterrupted order (see the module docstring)."""
    _check_resume_args(num_batches, num_workers, consumed)
    if not 0 <= worker < num_workers:
        raise ValueError(f"worker {worker} is outside num_workers {num_workers}")
    order = rank_loader_order(num_batches, num_workers)
    start = int(order[consumed]) if consumed < num_batches else 0
    run = (start + worker) % num_workers
    return run, int(np.count_nonzero(order[:consumed] == run))


def block_shuffled_positions(start: int, stop: int, total: int, block_size: int, seed: int,
                             epoch: int) -> np.ndarray:
    """Positions ``[start, stop)`` of the block-shuffled sequence ``0 .. total-1``.

    Only the blocks overlapping the range are generated, so a worker never materialises the
    whole epoch.
    """
    if stop <= start:
        return np.empty(0, dtype=np.int64)
    parts = []
    for block in range(start // block_size, (stop - 1) // block_size + 1):
        lo = block * block_size
        hi = min(lo + block_size, total)
        perm = np.random.default_rng([seed, epoch, 1, block]).permutation(hi - lo) + lo
        parts.append(perm[max(start, lo) - lo:min(stop, hi) - lo])
    return np.concatenate(parts).astype(np.int64)


def sequence_ids(positions: np.ndarray, order: np.ndarray, shard_counts: np.ndarray,
                 shard_starts: np.ndarray) -> np.ndarray:
    """Map positions of the epoch sequence (shards in ``order``) to global sample ids."""
    counts = shard_counts[order]
    cum = np.concatenate([[0], np.cumsum(counts)])
    k = np.searchsorted(cum, positions, side="right") - 1
    return shard_starts[order[k]] + (positions - cum[k])


class EpochPlan:
    """One rank's meta-batches for one epoch.

    ``num_batches`` is equal on every rank; :meth:`worker_batches` yields the id arrays a given
    DataLoader worker reads, in order. With ``kept_ids`` (sorted global ids, e.g. from a pruning
    manifest) the epoch is planned over those samples only, with the same shuffle and partition
    rules; pruned samples are never part of any worker's plan.
    """

    def __init__(self, shard_counts: np.ndarray, *, meta_batch_size: int, seed: int, epoch: int,
                 world_size: int = 1, rank: int = 0, shuffle: bool = True, seekable: bool = True,
                 block_size: int = 1 << 18, drop_last: bool = False,
                 kept_ids: np.ndarray | None = None) -> None:
        if meta_batch_size < 1:
            raise ValueError(f"meta_batch_size must be >= 1, got {meta_batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        counts = np.asarray(shard_counts, dtype=np.int64)
        self.kept_ids = None
        if kept_ids is not None:
            corpus_starts = np.concatenate([[0], np.cumsum(counts)])
            self.kept_ids = np.asarray(kept_ids, dtype=np.int64)
            shard_of = np.searchsorted(corpus_starts, self.kept_ids, side="right") - 1
            counts = np.bincount(shard_of, minlength=len(counts)).astype(np.int64)
        self.shard_counts = counts
        self.shard_starts = np.concatenate([[0], np.cumsum(self.shard_counts)]).astype(np.int64)
        self.num_samples = int(self.shard_starts[-1])
        self.seed, self.epoch, self.shuffle = seed, epoch, shuffle
        self.block_size = block_size if (shuffle and seekable) else 0
        self.order = shard_order(len(self.shard_counts), seed, epoch, shuffle)
        all_sizes, self.dropped = rank_batch_sizes(self.num_samples, world_size, meta_batch_size,
                                                   drop_last)
        self.batch_sizes = all_sizes[rank]
        self.rank, self.world_size = rank, world_size
        self.rank_totals = np.array([int(s.sum()) for s in all_sizes], dtype=np.int64)
        self.rank_start = int(self.rank_totals[:rank].sum())
        self.bounds = np.concatenate([[0], np.cumsum(self.batch_sizes)]).astype(np.int64)

    @property
    def num_batches(self) -> int:
        return len(self.batch_sizes)

    def ids(self, first_batch: int, stop_batch: int) -> np.ndarray:
        """Sample ids of meta-batches ``[first_batch, stop_batch)`` of this rank, concatenated."""
        start = self.rank_start + int(self.bounds[first_batch])
        stop = self.rank_start + int(self.bounds[stop_batch])
        return self._ids_at(start, stop)

    def node_ids(self, ranks_per_node: int) -> np.ndarray:
        """Sample ids read this epoch by the ranks of this rank's machine, when ranks fill
        machines in order, ``ranks_per_node`` each (as ``torchrun`` numbers them): what a
        machine-wide cache decides from."""
        if ranks_per_node < 1:
            raise ValueError(f"ranks_per_node must be >= 1, got {ranks_per_node}")
        first = self.rank - self.rank % ranks_per_node
        stop = min(first + ranks_per_node, self.world_size)
        start = int(self.rank_totals[:first].sum())
        return self._ids_at(start, start + int(self.rank_totals[first:stop].sum()))

    def _ids_at(self, start: int, stop: int) -> np.ndarray:
        """Sample ids at positions ``[start, stop)`` of the epoch's shuffled sequence."""
        if self.block_size:
            positions = block_shuffled_positions(start, stop, self.num_samples, self.block_size,
                                                 self.seed, self.epoch)
        else:
            positions = np.arange(start, stop, dtype=np.int64)
        ids = sequence_ids(positions, self.order, self.shard_counts, self.shard_starts)
        return ids if self.kept_ids is None else self.kept_ids[ids]

    def worker_batches(self, num_workers: int = 1, worker: int = 0, skip: int = 0) -> list[np.ndarray]:
        """The meta-batches (id arrays) one DataLoader worker reads, in order, without the first
        ``skip`` of its run (their ids are not even computed)."""
        first, stop = worker_batch_range(self.num_batches, num_workers, worker)
        if not 0 <= skip <= stop - first:
            raise ValueError(f"skip={skip} is outside [0, {stop - first}] meta-batches of worker {worker}")
        first += skip
        ids = self.ids(first, stop)
        cuts = self.bounds[first:stop + 1] - self.bounds[first]
        return [ids[cuts[i]:cuts[i + 1]] for i in range(stop - first)]
