"""Pruning policies (ESWP's set level): from per-sample scores, which samples the next epoch
keeps. Pure numpy, in chunks, so 1e9 scores never need more than a few chunks in memory.

A policy's :meth:`~Policy.decide` returns, chunk by chunk, a ``keep`` mask and a per-sample
loss ``weight`` (1 except for InfoBatch's rescaled samples).

Never-scored samples (``scored`` False: still at the initial ``1/n``, e.g. a ``drop_last``
leftover, see :class:`es_stream.ScoreStore`) are kept in every epoch by every policy: they were
never seen, so nothing says they are easy. Every score a policy reads is checked: NaN or
infinite scores (and negative ones for ESWP, whose scores are sampling weights) raise
:class:`es_stream.ScoreError` naming the first bad sample id, instead of a meaningless decision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from ._check import non_negative
from .errors import ScoreError

CHUNK = 1 << 22  # 4M scores per chunk: ~50 MB of temporaries

Read = Callable[[int, int], np.ndarray]


def _gumbel_keys(scores: np.ndarray, seed: int, epoch: int, chunk: int) -> np.ndarray:
    """log(score) + Gumbel(0,1), with a generator of its own per chunk so a chunk's keys can be
    computed again in a later pass."""
    rng = np.random.default_rng([seed, epoch, 2, chunk])
    return np.log(np.maximum(scores.astype(np.float64), 1e-300)) - np.log(rng.exponential(size=len(scores)))


def checked_reader(read: Read, n: int, source: str = "scores", *,
                   non_negative: bool = False) -> Read:
    """``read`` with every chunk checked (one vectorised pass): finite, and ``>= 0`` when
    ``non_negative``. A bad chunk raises :class:`ScoreError` naming ``source``, the first bad
    sample id and how many there are in all (counted by reading the rest: the error path only)."""

    def checked(start: int, stop: int) -> np.ndarray:
        values = read(start, stop)
        # min(initial=0) is 0 unless something is negative (and copes with an empty range)
        if not (np.isfinite(values).all() and (not non_negative or values.min(initial=0) >= 0)):
            raise _bad_scores(read, n, source, non_negative)
        return values

    return checked


def _bad_scores(read: Read, n: int, source: str, non_negative: bool) -> ScoreError:
    nonfinite, negative, first_nonfinite, first_negative = 0, 0, None, None
    for start in range(0, n, CHUNK):
        values = read(start, min(start + CHUNK, n))
        bad = np.flatnonzero(~np.isfinite(values))
        if len(bad) and first_nonfinite is None:
            first_nonfinite = (start + int(bad[0]), float(values[bad[0]]))
        nonfinite += len(bad)
        if non_negative:
            neg = np.flatnonzero(values < 0)
            if len(neg) and first_negative is None:
                first_negative = (start + int(neg[0]), float(values[neg[0]]))
            negative += len(neg)
    if nonfinite:
        sid, value = first_nonfinite
        return ScoreError(
            f"{source}: {nonfinite} of {n} scores are NaN or infinite (the first: sample id {sid}, "
            f"{value}), so no pruning decision can be made; a loss that overflowed or diverged "
            "reached the store: check the training loss, then restore the scores from a "
            "checkpoint (Checkpointer.load(store=...)) and prune again")
    sid, value = first_negative
    return ScoreError(
        f"{source}: {negative} of {n} scores are negative (the first: sample id {sid}, {value}); "
        "ESWP keeps samples with probability proportional to their score, so scores must be >= 0: "
        "train ES with a non-negative per-sample loss, or prune with InfoBatchPolicy")


def chunked_top_k_mask(read: Read, n: int, k: int, seed: int, epoch: int, chunk: int = CHUNK,
                       scored: Read | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(start, keep mask)`` per chunk, where the kept samples are exactly the k largest
    Gumbel keys ``log s_i + G_i`` over all n: a draw of k without replacement with probability
    proportional to the scores (successive sampling). ``read(start, stop)`` returns scores.

    With ``scored`` (``scored(start, stop)``: True where a sample was ever scored), the samples
    never scored are all kept and count toward k; the rest of k, ``max(0, k - never scored)``,
    is the k largest keys among scored samples. (Keys are still drawn for every sample, so
    each scored sample's key is the one it would have with every sample scored.)

    Three passes over the chunks, memory bounded by one chunk: the keys' range, a histogram
    that locates the k-th largest key's bin, then the exact cut inside that bin.
    """
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    starts = range(0, n, chunk)

    def keys(i: int, start: int) -> np.ndarray:
        return _gumbel_keys(read(start, min(start + chunk, n)), seed, epoch, i)

    def eligible(start: int) -> np.ndarray | None:
        return None if scored is None else scored(start, min(start + chunk, n))

    def among(values: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
        return values if mask is None else values[mask]

    if scored is None and k in (0, n):
        for start in starts:
            yield start, np.full(min(chunk, n - start), k == n)
        return
    lo, hi, m = math.inf, -math.inf, 0
    for i, start in enumerate(starts):
        kk = among(keys(i, start), eligible(start))
        m += len(kk)
        if len(kk):
            lo, hi = min(lo, float(kk.min())), max(hi, float(kk.max()))
    k = max(0, k - (n - m))  # what is left for scored samples once never-scored are kept
    if k in (0, m):
        for start in starts:
            e = eligible(start)
            keep = np.full(min(chunk, n - start), k == m)
            yield start, keep if e is None else keep | ~e
        return
    edges = np.linspace(lo, hi, (1 << 16) + 1)
    hist = np.zeros(len(edges) - 1, dtype=np.int64)
    for i, start in enumerate(starts):
        hist += np.histogram(among(keys(i, start), eligible(start)), bins=edges)[0]
    above = np.cumsum(hist[::-1])[::-1]  # above[j]: keys in bins j and higher
    j = int(np.nonzero(above >= k)[0][-1])  # the bin holding the k-th largest key
    need = k - (int(above[j + 1]) if j + 1 < len(hist) else 0)
    # exact cut inside bin j: collect that bin's keys (a small fraction of n)
    inside: list[np.ndarray] = []
    for i, start in enumerate(starts):
        kk = among(keys(i, start), eligible(start))
        inside.append(kk[_bin_of(kk, edges, len(hist)) == j])
    boundary = np.concatenate(inside)
    cut = np.partition(boundary, len(boundary) - need)[len(boundary) - need]
    for i, start in enumerate(starts):
        kk = keys(i, start)
        b = _bin_of(kk, edges, len(hist))
        keep = (b > j) | ((b == j) & (kk >= cut))
        e = eligible(start)
        yield start, keep if e is None else np.where(e, keep, True)


def _bin_of(keys: np.ndarray, edges: np.ndarray, bins: int) -> np.ndarray:
    # same convention as np.histogram: right-closed last bin
    return np.clip(np.searchsorted(edges, keys, side="right") - 1, 0, bins - 1)


@dataclass
class Decision:
    """One chunk of a decision: samples ``start .. start+len(keep)``, of which
    ``never_scored`` were never scored (and are kept)."""

    start: int
    keep: np.ndarray
    weight: np.ndarray
    never_scored: int = 0


class Policy:
    """Base class: the epochs in which a policy prunes at all."""

    name = "none"

    def __init__(self, ratio: float, anneal: float, seed: int, burn_in_epochs: int = 0) -> None:
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"ratio must be in [0, 1), got {ratio}")
        if not 0.0 <= anneal <= 1.0:
            raise ValueError(f"anneal must be a fraction in [0, 1], got {anneal}")
        burn_in_epochs = non_negative(burn_in_epochs, "burn_in_epochs")
        seed = non_negative(seed, "seed")
        self.ratio, self.anneal, self.seed, self.burn_in_epochs = ratio, anneal, seed, burn_in_epochs

    def prunes(self, epoch: int, total_epochs: int) -> bool:
        """Whether ``epoch`` is pruned: after burn-in and before the annealing tail (the last
        ``anneal`` fraction of epochs, rounded up, trains on everything)."""
        tail = math.ceil(self.anneal * total_epochs)
        return self.ratio > 0 and self.burn_in_epochs <= epoch < total_epochs - tail

    def decide(self, read: Read, n: int, epoch: int, total_epochs: int, *,
               scored: Read | None = None, source: str = "scores") -> Iterator[Decision]:
        """The decision for ``epoch`` over scores ``read(start, stop)``, chunk by chunk.

        ``scored(start, stop)`` (optional) tells which samples were ever scored; without it
        every sample counts as scored. ``source`` names the scores in error messages (e.g. the
        store's file). Arguments are checked here, before any chunk is decided.
        """
        n = non_negative(n, "n")
        epoch = non_negative(epoch, "epoch")
        total_epochs = non_negative(total_epochs, "total_epochs")
        return self._decide(read, n, epoch, total_epochs, scored, source)

    def _decide(self, read: Read, n: int, epoch: int, total_epochs: int, scored: Read | None,
                source: str) -> Iterator[Decision]:
        raise NotImplementedError

    def describe(self) -> dict[str, str]:
        return {"policy": self.name, "ratio": repr(self.ratio), "seed": str(self.seed)}

    def _keep_all(self, n: int, scored: Read | None) -> Iterator[Decision]:
        for start in range(0, n, CHUNK):
            size = min(CHUNK, n - start)
            never = 0 if scored is None else size - int(scored(start, start + size).sum())
            yield Decision(start, np.ones(size, bool), np.ones(size, np.float32), never)


def _never(scored: Read | None, start: int, stop: int) -> np.ndarray | None:
    """The never-scored mask of a range; None when every sample counts as scored."""
    if scored is None:
        return None
    never = ~scored(start, stop)
    return never if never.any() else None


class ESWPPolicy(Policy):
    """ES with pruning (Cheng et al. 2025): keep ``ceil((1 - ratio) n)`` samples drawn without
    replacement with probability proportional to their scores (Gumbel-top-k over all scores,
    in chunks). Epochs before ``burn_in_epochs`` and in the annealing tail keep everything.
    Pruned samples keep their scores (they were not seen, so nothing new is known about them).

    Never-scored samples are all kept and count toward the ``ceil((1 - ratio) n)``: the draw
    takes the rest of that quota from the scored samples. If they alone exceed the quota they
    are still all kept (and every scored sample is pruned), so the epoch keeps more than the
    quota. With every sample scored, the decision is the same as without that rule.
    Scores must be finite and ``>= 0`` (they are sampling weights).

    **Unbiased variant** (``rescale=True``; ours, ESWP with InfoBatch's unbiasedness). The plain
    draw prunes low scorers more often but trains the kept ones at weight 1, so the expected
    gradient of an epoch leans toward high scorers. With ``rescale`` only the *candidates* can be
    pruned: scored samples whose score is below the mean of the scored samples (InfoBatch's
    rule; samples at or above the mean and never-scored ones are kept at weight 1). Candidate i
    is kept independently (Bernoulli/Poisson sampling, so its inclusion probability is known
    exactly, unlike the Gumbel-top-k draw's) with probability

        pi_i = clip(c * s_i, min_keep, 1)

    increasing in its score, and carries the loss weight ``1 / pi_i`` (delivered through the
    manifests to ``MetaBatch.weights``, as InfoBatch's), so ``E[sum of weighted kept losses]``
    equals the sum of all losses, for any ``c``. ``c`` is chosen (from a histogram of the
    candidates' scores, so up to its bin width) so the **expected number pruned is
    ``ratio * n``**, the same quota as plain ESWP, so a ratio prunes as much compute either way;
    when the candidates cannot supply it (``(1 - min_keep) * candidates < ratio * n``) every
    candidate is kept with probability ``min_keep`` and fewer are pruned (see the Pruner's
    summary). ``min_keep`` bounds the weights by ``1 / min_keep`` (default 0.1: weight <= 10),
    which bounds the variance the rescaling adds. The number kept is random (about
    ``(1 - ratio) n``), deterministic for a seed and epoch; pure numpy, three passes over the
    chunks (mean, histogram, decision) with memory bounded by one chunk.
    """

    name = "es"

    def __init__(self, ratio: float = 0.3, anneal: float = 0.125, burn_in_epochs: int = 1,
                 seed: int = 0, rescale: bool = False, min_keep: float = 0.1) -> None:
        super().__init__(ratio, anneal, seed, burn_in_epochs)
        if not isinstance(rescale, bool):
            raise TypeError(f"rescale must be True or False, got {rescale!r}")
        if not 0.0 < min_keep <= 1.0:
            raise ValueError(f"min_keep must be in (0, 1] (the smallest keep probability of a "
                             f"rescaled sample; its weight is at most 1/min_keep), got {min_keep}")
        self.rescale, self.min_keep = rescale, float(min_keep)

    def describe(self) -> dict[str, str]:
        out = super().describe()
        if self.rescale:  # only then: manifests and checkpoints of plain ESWP stay as they were
            out.update(rescale="True", min_keep=repr(self.min_keep))
        return out

    def _decide(self, read, n, epoch, total_epochs, scored, source):
        if not self.prunes(epoch, total_epochs):
            yield from self._keep_all(n, scored)
            return
        read = checked_reader(read, n, source, non_negative=True)
        if self.rescale:
            yield from self._decide_rescaled(read, n, epoch, scored)
            return
        k = math.ceil((1.0 - self.ratio) * n)
        for start, keep in chunked_top_k_mask(read, n, k, self.seed, epoch, scored=scored):
            never = _never(scored, start, start + len(keep))
            yield Decision(start, keep, np.ones(len(keep), np.float32),
                           0 if never is None else int(never.sum()))

    def keep_probabilities(self, read: Read, n: int,
                           scored: Read | None = None) -> tuple[float, float]:
        """``(mean, c)`` of the rescaled draw over scores ``read``: candidates are scored
        samples with a score below ``mean``; candidate i is kept with probability
        ``clip(c * s_i, min_keep, 1)``. ``mean`` is NaN when no sample is scored (nothing is
        pruned then)."""
        mean = _scored_mean(read, n, scored)
        if math.isnan(mean):
            return mean, 0.0
        bins = 1 << 16
        counts, sums = np.zeros(bins, np.float64), np.zeros(bins, np.float64)
        for start in range(0, n, CHUNK):
            s = _candidate_scores(read, scored, start, min(start + CHUNK, n), mean)
            idx = np.minimum((s / mean * bins).astype(np.int64), bins - 1) if mean > 0 else \
                np.zeros(len(s), np.int64)
            counts += np.bincount(idx, minlength=bins)
            sums += np.bincount(idx, weights=s, minlength=bins)
        return mean, _solve_c(counts, sums, self.ratio * n, self.min_keep)

    def _decide_rescaled(self, read: Read, n: int, epoch: int,
                         scored: Read | None) -> Iterator[Decision]:
        mean, c = self.keep_probabilities(read, n, scored)
        for i, start in enumerate(range(0, n, CHUNK)):
            stop = min(start + CHUNK, n)
            scores, never = read(start, stop).astype(np.float64), _never(scored, start, stop)
            candidate = scores < mean  # False everywhere when mean is NaN (nothing scored)
            if never is not None:
                candidate &= ~never
            pi = np.clip(c * scores, self.min_keep, 1.0)
            u = np.random.default_rng([self.seed, epoch, 5, i]).random(len(scores))
            keep = ~candidate | (u < pi)
            weight = np.where(candidate & keep, 1.0 / pi, 1.0).astype(np.float32)
            yield Decision(start, keep, weight, 0 if never is None else int(never.sum()))


def _scored_mean(read: Read, n: int, scored: Read | None) -> float:
    """Mean score of the scored samples (NaN when there are none)."""
    total, counted = 0.0, 0
    for start in range(0, n, CHUNK):
        stop = min(start + CHUNK, n)
        scores, never = read(start, stop), _never(scored, start, stop)
        if never is not None:
            scores = scores[~never]
        total += float(scores.astype(np.float64).sum())
        counted += len(scores)
    return total / counted if counted else math.nan


def _candidate_scores(read: Read, scored: Read | None, start: int, stop: int,
                      mean: float) -> np.ndarray:
    scores, never = read(start, stop).astype(np.float64), _never(scored, start, stop)
    candidate = scores < mean
    if never is not None:
        candidate &= ~never
    return scores[candidate]


def _solve_c(counts: np.ndarray, sums: np.ndarray, prune: float, min_keep: float) -> float:
    """The ``c`` whose expected number kept, ``sum clip(c s, min_keep, 1)`` over the candidates
    (a histogram: each bin's samples at their bin's mean score), is ``candidates - prune``. The
    expectation grows with ``c``: bisection. 0 when even ``min_keep`` everywhere
    prunes too few (``c = 0`` keeps every candidate at ``min_keep``)."""
    total = float(counts.sum())
    want = total - prune
    if want <= min_keep * total:
        return 0.0
    occupied = counts > 0
    level = sums[occupied] / counts[occupied]  # each bin's mean score
    weight = counts[occupied]

    def kept(c: float) -> float:
        return float((weight * np.clip(c * level, min_keep, 1.0)).sum())

    positive = level[level > 0]
    if len(positive) == 0:  # all candidates score 0: clip gives min_keep for any c
        return 0.0
    lo, hi = 0.0, 1.0 / float(positive.min())  # at hi every positive candidate is kept
    if kept(hi) <= want:
        return hi
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if kept(mid) < want else (lo, mid)
    return hi


class InfoBatchPolicy(Policy):
    """InfoBatch (Qin et al., ICLR 2024): among samples scoring below the mean score, drop a
    random fraction ``ratio``; the kept below-mean samples get loss weight ``1 / (1 - ratio)``
    so the expected gradient is unchanged. The annealing tail keeps everything.

    Never-scored samples are kept with weight 1 and left out of the mean (their ``1/n`` is not
    a loss); with none scored, everything is kept. Scores must be finite.
    """

    name = "infobatch"

    def __init__(self, ratio: float = 0.5, anneal: float = 0.125, seed: int = 0) -> None:
        super().__init__(ratio, anneal, seed, burn_in_epochs=0)

    def _decide(self, read, n, epoch, total_epochs, scored, source):
        if not self.prunes(epoch, total_epochs):
            yield from self._keep_all(n, scored)
            return
        read = checked_reader(read, n, source)
        mean = _scored_mean(read, n, scored)
        if math.isnan(mean):  # nothing scored yet: nothing to compare with
            yield from self._keep_all(n, scored)
            return
        for i, start in enumerate(range(0, n, CHUNK)):
            stop = min(start + CHUNK, n)
            scores, never = read(start, stop), _never(scored, start, stop)
            below = scores < mean
            if never is not None:
                below &= ~never
            drop = below & (np.random.default_rng([self.seed, epoch, 3, i]).random(len(scores)) < self.ratio)
            weight = np.where(below & ~drop, 1.0 / (1.0 - self.ratio), 1.0).astype(np.float32)
            yield Decision(start, ~drop, weight, 0 if never is None else int(never.sum()))
