"""`MixedDataset`: meta-batches from several corpora in chosen proportions.

**Per-epoch shares** (pure numpy, :func:`mix_counts` and :func:`mix_share_ids`). Each corpus c
has candidates this epoch: its samples, or the ids its pruning manifest keeps. The epoch holds
``epoch_size`` samples (default: all candidates together) split by the proportions with the
largest-remainder rule: corpus c gets ``floor(p_c * epoch_size)`` and the samples left over go,
one each, to the corpora with the largest fractional parts (the lower index first on a tie), so
the counts sum to ``epoch_size`` exactly and differ from ``p_c * epoch_size`` by less than one.
The share of corpus c of ``k_c`` samples out of ``n_c`` candidates is, as mosaicml-streaming's
``Stream(proportion=)`` draws it (``repeat = k_c / n_c``, ``choose`` the rest): every candidate
``k_c // n_c`` times, plus ``k_c % n_c`` candidates drawn without replacement by
``(seed, epoch, corpus)``. So with ``k_c <= n_c`` every sample of the share is read exactly once
and no other sample of that corpus is; with ``k_c > n_c`` every candidate is read
``floor`` or ``ceil(k_c / n_c)`` times.

**Order.** Each corpus's share is planned by :class:`es_stream.EpochPlan` with that corpus's
:class:`~es_stream.ESDataset` settings (its shuffle, blocks, ranks, ``drop_last``), so every
rank gets the same number of that corpus's meta-batches. A meta-batch holds one corpus (its
decode and collate apply, its fields need not match the others'); the epoch interleaves the
corpora's meta-batches in an order drawn by ``(seed, epoch)`` (:func:`mix_order`), the same on
every rank, so ranks take equal steps. Workers and exact resume work as in ``ESDataset``: a
rank's mixed sequence is split into contiguous runs per DataLoader worker and
``state_dict()`` / ``load_state_dict(state)`` resume mid-epoch bit-identically.

**Ids.** A sample's id in the mix is its id in its corpus plus the corpus's offset, the sizes of
the corpora before it (:attr:`MixedDataset.offsets`): stable whatever the proportions, so one
:class:`~es_stream.ScoreStore` of ``num_samples`` ids serves the mix. Pruning manifests stay per
corpus, in corpus ids (each ``ESDataset``'s ``manifests=``).

**Changing proportions.** :meth:`MixedDataset.set_proportions` changes them for the epochs
that start after it (a domain-weighting method calls it between epochs); they live in shared
memory, so persistent workers see them, and they are part of the state, so a resumed run
plans the epoch it resumes with the proportions it had.
"""

from __future__ import annotations

import operator
from dataclasses import replace
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .dataset import BatchCount, ESDataset, begin_iteration, restore_position, worker_run
from .metabatch import MetaBatch
from .plan import EpochPlan, worker_batch_range
from .sources import open_reader


# ------------------------------------------------------------------------------ pure planning
def mix_counts(sizes: Sequence[int], proportions: Sequence[float], epoch_size: int) -> np.ndarray:
    """Samples each corpus gives an epoch of ``epoch_size``: the largest-remainder split of
    ``epoch_size`` by ``proportions`` (normalised; see the module doc). A corpus with no
    candidates (``sizes[c] == 0``) must have proportion 0."""
    p = np.asarray(proportions, dtype=np.float64)
    sizes = np.asarray(sizes, dtype=np.int64)
    if p.ndim != 1 or len(p) != len(sizes) or len(p) == 0:
        raise ValueError(f"proportions must give one number per corpus ({len(sizes)}), got "
                         f"{list(np.atleast_1d(p))}")
    if not np.isfinite(p).all() or (p < 0).any() or p.sum() <= 0:
        raise ValueError(f"proportions must be finite, >= 0 and not all 0, got {p.tolist()}")
    if epoch_size < 0:
        raise ValueError(f"epoch_size must be >= 0, got {epoch_size}")
    empty = (sizes == 0) & (p > 0)
    if empty.any():
        raise ValueError(f"corpus {int(np.flatnonzero(empty)[0])} has no samples this epoch (all "
                         "pruned?) but proportion > 0; give it proportion 0")
    exact = p / p.sum() * epoch_size
    counts = np.floor(exact).astype(np.int64)
    left = epoch_size - int(counts.sum())
    if left:  # largest fractional parts first, the lower index on a tie
        order = np.lexsort((np.arange(len(p)), -(exact - counts)))
        counts[order[:left]] += 1
    return counts


def mix_share_ids(size: int, count: int, seed: int, epoch: int, corpus: int) -> np.ndarray:
    """Sorted positions (among a corpus's ``size`` candidates) of its share of ``count``
    samples: every position ``count // size`` times plus ``count % size`` drawn without
    replacement by ``(seed, epoch, corpus)``. Repeated positions appear repeatedly."""
    if count == 0:
        return np.empty(0, dtype=np.int64)
    if size <= 0:
        raise ValueError(f"corpus {corpus}: {count} samples asked of a corpus with none")
    full, rest = divmod(count, size)
    chosen = np.random.default_rng([seed, epoch, 7, corpus]).choice(size, rest, replace=False)
    ids = np.concatenate([np.repeat(np.arange(size, dtype=np.int64), full), chosen])
    return np.sort(ids, kind="stable")


def mix_order(batches: Sequence[int], seed: int, epoch: int) -> np.ndarray:
    """The corpus of each meta-batch of the mixed epoch: corpus c ``batches[c]`` times, in an
    order drawn by ``(seed, epoch)`` (the same on every rank, which all have the same counts)."""
    counts = np.asarray(batches, dtype=np.int64)
    corpora = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    return corpora[np.random.default_rng([seed, epoch, 8]).permutation(len(corpora))]


class MixPlan:
    """One rank's mixed epoch: ``order[k]`` is the corpus of meta-batch k, ``index[k]`` which
    of that corpus's meta-batches it is, ``plans[c]`` the corpus's :class:`EpochPlan` (None for
    a corpus without share), ``counts`` each corpus's samples this epoch (all ranks)."""

    def __init__(self, counts: np.ndarray, plans: list[EpochPlan | None], seed: int,
                 epoch: int) -> None:
        self.counts = counts
        self.plans = plans
        self.order = mix_order([0 if p is None else p.num_batches for p in plans], seed, epoch)
        self.index = np.zeros(len(self.order), dtype=np.int64)
        for c in range(len(plans)):  # j-th meta-batch of corpus c at its j-th place
            at = np.flatnonzero(self.order == c)
            self.index[at] = np.arange(len(at))

    @property
    def num_batches(self) -> int:
        return len(self.order)

    def batches(self, first: int, stop: int) -> list[tuple[int, np.ndarray]]:
        """``(corpus, corpus-local ids)`` of meta-batches ``[first, stop)``; each corpus's ids
        are computed once for the span (its meta-batches in a contiguous span are contiguous)."""
        order, index = self.order[first:stop], self.index[first:stop]
        spans: dict[int, tuple[int, np.ndarray]] = {}
        for c in np.unique(order).tolist():
            js = index[order == c]
            lo, hi = int(js.min()), int(js.max()) + 1
            spans[c] = (lo, self.plans[c].ids(lo, hi))
        out = []
        for c, j in zip(order.tolist(), index.tolist()):
            lo, ids = spans[c]
            bounds = self.plans[c].bounds
            start, end = bounds[j] - bounds[lo], bounds[j + 1] - bounds[lo]
            out.append((c, ids[start:end]))
        return out


# ------------------------------------------------------------------------------ the dataset
class MixedDataset(IterableDataset):
    """Meta-batches from several corpora in ``proportions`` (see the module doc for the rules).

    Args:
        datasets: one :class:`ESDataset` per corpus; each says how its corpus is decoded,
            collated, shuffled, pruned (``manifests=``) and treated on errors. They must agree
            on ``meta_batch_size``, ``rank`` and ``world_size``.
        proportions: one weight per corpus (normalised); default: the corpora's sizes (each
            sample once, as concatenating them would).
        epoch_size: samples per epoch over all ranks; default: every candidate of every corpus.
        seed: draws the shares and the interleaving.

    Iterate it through :func:`es_stream.loader` (which counts what it yields, so
    :meth:`state_dict` needs no argument), calling :meth:`set_epoch` before each epoch.
    ``MetaBatch.ids`` are mix ids (:attr:`offsets`); :meth:`corpus_of` maps them back.
    """

    loader_counts = True  # es_stream.loader counts what it yields (see track)

    def __init__(self, datasets: Sequence[ESDataset], proportions: Sequence[float] | None = None,
                 *, epoch_size: int | None = None, seed: int = 0) -> None:
        super().__init__()
        self.datasets = list(datasets)
        if not self.datasets or not all(isinstance(d, ESDataset) for d in self.datasets):
            raise TypeError("datasets must be a non-empty list of es_stream.ESDataset, one per corpus")
        for name in ("meta_batch_size", "rank", "world_size"):
            values = {getattr(d, name) for d in self.datasets}
            if len(values) > 1:
                raise ValueError(f"the datasets of a mix must share {name}; got {sorted(values)}")
        first = self.datasets[0]
        self.meta_batch_size, self.rank, self.world_size = (first.meta_batch_size, first.rank,
                                                           first.world_size)
        self.seed = operator.index(seed)
        sizes = np.array([d.corpus.num_samples for d in self.datasets], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.num_samples = int(self.offsets[-1])
        self._proportions = torch.tensor(sizes if proportions is None else list(proportions),
                                         dtype=torch.float64).share_memory_()
        mix_counts(sizes, self._proportions.numpy(), 0)  # validate now, not in a worker
        self._epoch_size = torch.tensor(-1 if epoch_size is None else operator.index(epoch_size),
                                        dtype=torch.int64).share_memory_()
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        # [epoch (-1: none), meta-batches consumed, workers], as ESDataset keeps it
        self._resume = torch.tensor([-1, 0, 0], dtype=torch.int64).share_memory_()
        self._loader_workers = torch.zeros((), dtype=torch.int64).share_memory_()
        self._started_epoch = torch.full((), -1, dtype=torch.int64).share_memory_()
        self._progress: BatchCount | None = None
        self._plan_cache: tuple[tuple, MixPlan] | None = None
        self.plan(0)

    # ---------------------------------------------------------------- epoch, proportions
    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next iteration yields (clears a resume point of another epoch)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if epoch != int(self._resume[0]):
            self._resume.copy_(torch.tensor([-1, 0, 0]))
        self._epoch.fill_(epoch)

    @property
    def proportions(self) -> np.ndarray:
        """The current proportions, normalised."""
        p = self._proportions.numpy().copy()
        return p / p.sum()

    def set_proportions(self, proportions: Sequence[float]) -> None:
        """New proportions for the epochs whose iteration starts after this call (workers see
        them: they live in shared memory). Call it between epochs, not during one."""
        p = torch.tensor(list(proportions), dtype=torch.float64)
        mix_counts([max(int(d.corpus.num_samples), 1) for d in self.datasets], p.numpy(), 0)
        self._proportions.copy_(p)

    def corpus_of(self, ids: Any) -> tuple[np.ndarray, np.ndarray]:
        """Mix ids -> (corpus index, id in that corpus)."""
        arr = np.asarray(ids.cpu() if hasattr(ids, "cpu") else ids, dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= self.num_samples):
            raise IndexError(f"mix ids must lie in [0, {self.num_samples})")
        c = np.searchsorted(self.offsets, arr, side="right") - 1
        return c, arr - self.offsets[c]

    # ---------------------------------------------------------------- planning
    def _candidates(self, epoch: int) -> list[np.ndarray | None]:
        """Each corpus's candidate ids this epoch: its manifest's kept ids, None for all."""
        return [None if (keep := d.epoch_keep(epoch)) is None else keep.kept_ids
                for d in self.datasets]

    def plan(self, epoch: int | None = None) -> MixPlan:
        """This rank's :class:`MixPlan` for ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else epoch
        candidates = self._candidates(epoch)
        sizes = [d.corpus.num_samples if k is None else len(k)
                 for d, k in zip(self.datasets, candidates)]
        size = int(self._epoch_size)
        size = sum(sizes) if size < 0 else size
        key = (epoch, size, tuple(self._proportions.tolist()),
               tuple(None if k is None else (len(k), hash(k.tobytes())) for k in candidates))
        if self._plan_cache is not None and self._plan_cache[0] == key:
            return self._plan_cache[1]
        counts = mix_counts(sizes, self._proportions.numpy(), size)
        plans: list[EpochPlan | None] = []
        for c, (d, k, count) in enumerate(zip(self.datasets, candidates, counts.tolist())):
            if count == 0:
                plans.append(None)
                continue
            share = mix_share_ids(sizes[c], count, self.seed, epoch, c)
            try:
                plans.append(EpochPlan(
                    d.corpus.shard_counts, meta_batch_size=d.meta_batch_size, seed=d.seed,
                    epoch=epoch, world_size=d.world_size, rank=d.rank, shuffle=d.shuffle,
                    seekable=d.seekable, block_size=d.block_size, drop_last=d.drop_last,
                    kept_ids=share if k is None else k[share]))
            except ValueError as exc:
                raise ValueError(f"corpus {c} ({d.corpus!r}): its share of {count} samples in "
                                 f"epoch {epoch}: {exc}") from exc
        plan = MixPlan(counts, plans, self.seed, epoch)
        self._plan_cache = (key, plan)
        return plan

    def __len__(self) -> int:
        """Meta-batches this rank yields this epoch (equal on every rank)."""
        return self.plan().num_batches

    # ---------------------------------------------------------------- resume
    def track(self, count: BatchCount) -> None:
        """Report ``count`` as this dataset's place from now on (what hands the meta-batches to
        the loop owns the count: :func:`es_stream.loader`'s loader, or this process)."""
        self._progress = count

    def resume_batches(self, epoch: int) -> int:
        """Meta-batches of ``epoch`` a new iteration starts after (0 when no resume applies)."""
        resume_epoch, batches, _ = self._resume.tolist()
        return batches if resume_epoch == epoch else 0

    def consumed(self) -> int:
        """Meta-batches of the current epoch consumed so far (as :func:`es_stream.loader`
        counted them, those before a resume included)."""
        epoch = self.epoch
        if self._progress is not None and self._progress.epoch == epoch:
            return self._progress.batches
        if int(self._started_epoch) == epoch:
            raise ValueError(f"epoch {epoch} is being iterated by a DataLoader that does not count "
                             "what it yields: iterate through es_stream.loader(mixed_dataset)")
        return self.resume_batches(epoch)

    def _fields(self) -> dict[str, Any]:
        """What an exact resume needs unchanged: every corpus and its dataset settings."""
        return {"seed": self.seed, "epoch_size": int(self._epoch_size),
                "datasets": [{k: v for k, (v, _) in d.resume_fields().items()}
                             for d in self.datasets]}

    def state_dict(self) -> dict[str, Any]:
        """Where this rank stands in the current epoch (see ``ESDataset.state_dict``), with the
        proportions in force."""
        total = len(self)
        batches = self.consumed()
        workers = int(self._loader_workers)
        return {"epoch": self.epoch, "batches": batches, "epoch_batches": total,
                "num_workers": workers, "proportions": self._proportions.tolist(),
                **self._fields()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`: its proportions, epoch and place in it. Raises
        ``ValueError`` naming the field when the state is of another mix."""
        missing = sorted({"epoch", "batches", "epoch_batches", "num_workers", "proportions",
                          *self._fields()} - set(state))
        if missing:
            raise ValueError(f"not a MixedDataset state: missing {missing}; pass what "
                             "MixedDataset.state_dict returned")
        for name, mine in self._fields().items():
            if state[name] != mine:
                raise ValueError(f"cannot resume: the state has {name}={state[name]!r}, this mix "
                                 f"{name}={mine!r}; build the MixedDataset (and its datasets) as "
                                 "when the state was taken")
        self.set_proportions(state["proportions"])
        restore_position(self, state)

    def _worker_run(self, epoch: int, num_batches: int, worker: int, num_workers: int
                    ) -> tuple[int, int]:
        return worker_run(self._resume, epoch, num_batches, worker, num_workers)

    # ---------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator[MetaBatch]:
        epoch, plan, num_workers, run, skip = begin_iteration(self)
        first, stop = worker_batch_range(plan.num_batches, num_workers, run)
        batches = plan.batches(first + skip, stop)
        keeps = [d.epoch_keep(epoch) for d in self.datasets]
        readers: dict[int, Any] = {}
        failed: dict[int, set[int]] = {}
        here = get_worker_info() is None
        count = BatchCount(epoch, self.resume_batches(epoch))
        if here:
            self.track(count)
        try:
            for c, ids in batches:
                if c not in readers:
                    readers[c] = open_reader(self.datasets[c].corpus)
                    mine = [i for cc, i in batches if cc == c]
                    readers[c].will_read(mine, lambda c=c: _rank_ids(plan, c))
                mb = self.datasets[c].read_meta_batch(readers[c], ids, epoch, keeps[c],
                                                  failed.setdefault(c, set()))
                offset = int(self.offsets[c])
                mb = replace(mb, ids=mb.ids + offset, lost_ids=mb.lost_ids + offset)
                if here:
                    count.batches += 1
                yield mb
        finally:
            for reader in readers.values():
                reader.close()


def _rank_ids(plan: Any, corpus: int) -> np.ndarray:
    """The ids of ``corpus`` this rank reads this epoch (all its workers): what a remote reader
    in a mix decides staging from (its own rank's share, not the whole machine's)."""
    parts = [ids for c, ids in plan.batches(0, plan.num_batches) if c == corpus]
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
