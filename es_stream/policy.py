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
from .chunks import CHUNK
from .errors import ScoreError

# The sample that places the top-k threshold before the one pass over the keys:
# SAMPLE_WINDOWS random runs of SAMPLE_WIDTH consecutive samples (runs, not single ids, so a
# memory-mapped store reads a few thousand pages, not a million).
SAMPLE_WINDOWS, SAMPLE_WIDTH = 4096, 256

Read = Callable[[int, int], np.ndarray]

_TINY32 = np.float32(np.finfo(np.float32).tiny)
_BELOW_ONE = np.float32(1.0 - 2.0 ** -24)  # [1, 2) minus this is (0, 1): never 0, never 1
# domains of the generators' seeds: 8 the keys (2: ESWP's float64 keys before), 10 InfoBatch's
# drops (3: its float64 draws before)
_KEYS, _DROPS = 8, 10


def uniform32(seed_words: list[int], size: int) -> np.ndarray:
    """``size`` float32 uniforms in (0, 1), from a PCG64 stream of its own seeded by
    ``seed_words``: 23 random bits each, at the midpoints ``(j + 1/2) 2^-23``, so neither 0 nor
    1 can occur. Raw generator bits shifted into a float's mantissa: about 3x faster than
    ``Generator.random(dtype=np.float32)`` (the decision's hot loop at 1e9 samples)."""
    raw = np.random.PCG64(np.random.SeedSequence(seed_words)).random_raw((size + 1) // 2)
    bits = raw.view(np.uint32)[:size]
    bits >>= 9
    bits |= 0x3F800000  # exponent of [1, 2)
    u = bits.view(np.float32)
    u -= _BELOW_ONE
    return u


def _gumbel_keys(scores: np.ndarray, seed: int, epoch: int, chunk: int) -> np.ndarray:
    """float32 ``log(score) + G``, ``G = -log(-log U)`` a Gumbel(0,1) draw, with a generator of
    its own per chunk so a chunk's keys can be computed again in a later pass. Scores below the
    smallest normal float32 (0 included) count as that value, so they still get distinct keys."""
    g = uniform32([seed, epoch, _KEYS, chunk], len(scores))
    np.log(g, out=g)
    np.negative(g, out=g)
    np.log(g, out=g)  # log E, E = -log U ~ Exponential(1): the key is log s - log E
    keys = np.maximum(np.asarray(scores, dtype=np.float32), _TINY32)
    np.log(keys, out=keys)
    keys -= g
    return keys


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
    float32 Gumbel keys ``log s_i + G_i`` over all n (ties, which float32 makes possible at
    1e9 samples, go to the lower id): a draw of k without replacement with probability
    proportional to the scores (successive sampling). ``read(start, stop)`` returns scores.

    With ``scored`` (``scored(start, stop)``: True where a sample was ever scored), the samples
    never scored are all kept and count toward k; the rest of k, ``max(0, k - never scored)``,
    is the k largest keys among scored samples. (Keys are still drawn for every sample, so
    each scored sample's key is the one it would have with every sample scored.)

    One pass over the keys: a sample of ``SAMPLE_WINDOWS x SAMPLE_WIDTH`` scores (with keys of
    their own) places a bracket ``[lo, hi]`` around the k-th largest key; the pass counts the
    keys above ``hi``, keeps one bit per sample (kept for sure) and collects the keys inside the
    bracket (about 1% of n), among which the cut is exact. Should the bracket miss (the count
    says so), a histogram pass finds the bin of the k-th key and the pass is made again: the
    result is the same either way, only slower. Memory: ``n / 8`` bytes of bits (125 MB at 1e9)
    plus the bracket's keys.

    **Change of definition** (version 0.1, see BENCHMARKS.md): the keys were float64 (``numpy``'s exponential draws,
    seed domain 2) and found in four passes (329 s at 1e9). They are now float32, from raw PCG64
    bits (seed domain 8): the same distribution (successive sampling), other draws for a given
    seed, so a seed's kept set differs from before. Tested: the kept set is the one-shot
    top-k of the same float32 keys, with or without the sampled bracket and its fix-up.
    """
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    if scored is None and k in (0, n):
        for start in range(0, n, chunk):
            yield start, np.full(min(chunk, n - start), k == n)
        return
    lo, hi = _sampled_bracket(read, n, k, seed, epoch, scored)
    found = _Bracketed.collect(read, n, chunk, seed, epoch, scored, lo, hi)
    k = max(0, k - (n - found.scored))  # what is left for scored samples once never-scored are kept
    if k in (0, found.scored):
        yield from _all_or_none(n, chunk, scored, k == found.scored)
        return
    if not found.holds(k):  # the sample misled the bracket: place it exactly, pass again
        lo, hi = _histogram_bracket(read, n, chunk, seed, epoch, scored, k)
        found = _Bracketed.collect(read, n, chunk, seed, epoch, scored, lo, hi)
        assert found.holds(k), "the histogram's bin must hold the k-th key"
    yield from found.masks(k)


def _all_or_none(n: int, chunk: int, scored: Read | None,
                 every: bool) -> Iterator[tuple[int, np.ndarray]]:
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        keep = np.full(stop - start, every)
        yield start, keep if scored is None else keep | ~scored(start, stop)


def _sampled_bracket(read: Read, n: int, k: int, seed: int, epoch: int,
                     scored: Read | None) -> tuple[float, float]:
    """``(lo, hi)`` keys that, with high probability, have the k-th largest key between them
    (k counting the never-scored samples, as :func:`chunked_top_k_mask` takes it): quantiles of
    the keys of a sample of scores, with fresh noise, ``4 sqrt(m)`` sample ranks either side
    (about 9 standard deviations). A small n gets ``(-inf, inf)``: every key is collected."""
    m = SAMPLE_WINDOWS * SAMPLE_WIDTH
    if n <= 4 * m:
        return -math.inf, math.inf
    rng = np.random.default_rng([seed, epoch, 9])
    sample: list[np.ndarray] = []
    for a in np.sort(rng.integers(0, n - SAMPLE_WIDTH + 1, SAMPLE_WINDOWS)).tolist():
        s = np.asarray(read(a, a + SAMPLE_WIDTH), np.float64)
        keys = np.log(np.maximum(s, float(_TINY32))) + rng.gumbel(size=len(s))
        sample.append(keys if scored is None else keys[scored(a, a + SAMPLE_WIDTH)])
    keys = -np.sort(-np.concatenate(sample))  # descending
    if len(keys) == 0:  # no scored sample: bracket nothing; the count decides (or the fallback)
        return math.inf, math.inf
    # scored samples above the cut, in the sample's terms: k - never scored, over n, times m
    rank = len(keys) - m * (n - k) / n
    delta = 4.0 * math.sqrt(m)
    top, bottom = math.floor(rank - delta), math.ceil(rank + delta)
    hi = math.inf if top < 0 else float(keys[min(top, len(keys) - 1)])
    lo = -math.inf if bottom >= len(keys) else float(keys[max(bottom, 0)])
    return lo, hi


def _ordered(keys: np.ndarray) -> np.ndarray:
    """float32 keys as uint32 in the same order (the sign flips the rest of the bits)."""
    bits = keys.view(np.uint32)
    return np.where(bits >> 31 == 1, ~bits, bits | np.uint32(0x80000000))


def _from_ordered(value: int) -> float:
    bits = value & 0x7FFFFFFF if value >> 31 else ~value & 0xFFFFFFFF
    return float(np.array([bits], np.uint32).view(np.float32)[0])


def _histogram_bracket(read: Read, n: int, chunk: int, seed: int, epoch: int,
                       scored: Read | None, k: int) -> tuple[float, float]:
    """The exact bracket: the bin of the 65536 (the keys' top 16 bits, in order) holding the
    k-th largest scored key, widened by one float either side."""
    hist = np.zeros(1 << 16, np.int64)
    for i, start in enumerate(range(0, n, chunk)):
        stop = min(start + chunk, n)
        keys = _gumbel_keys(read(start, stop), seed, epoch, i)
        if scored is not None:
            keys = keys[scored(start, stop)]
        hist += np.bincount(_ordered(keys) >> 16, minlength=1 << 16)
    above = np.cumsum(hist[::-1])[::-1]  # above[j]: keys in bins j and higher
    j = int(np.nonzero(above >= k)[0][-1])
    lo, hi = _from_ordered(j << 16), _from_ordered((j << 16) | 0xFFFF)
    return float(np.nextafter(np.float32(lo), np.float32(-np.inf))), \
        float(np.nextafter(np.float32(hi), np.float32(np.inf)))


@dataclass
class _Bracketed:
    """One pass over the keys against a bracket ``[lo, hi]``: per chunk, the bits of the samples
    kept for sure (never scored, or a key above ``hi``), and the ids and keys inside."""

    chunk: int
    n: int
    bits: list[np.ndarray]
    ids: np.ndarray
    keys: np.ndarray
    above: int  # scored keys above hi
    scored: int  # scored samples in all

    @classmethod
    def collect(cls, read: Read, n: int, chunk: int, seed: int, epoch: int,
                scored: Read | None, lo: float, hi: float) -> "_Bracketed":
        bits, ids, keys, above, counted = [], [], [], 0, 0
        lo32, hi32 = np.float32(lo), np.float32(hi)
        for i, start in enumerate(range(0, n, chunk)):
            stop = min(start + chunk, n)
            key = _gumbel_keys(read(start, stop), seed, epoch, i)
            sure, inside = key > hi32, key >= lo32
            inside &= ~sure
            if scored is None:
                counted += stop - start
            else:
                e = scored(start, stop)
                counted += int(np.count_nonzero(e))
                sure &= e
                inside &= e
            above += int(np.count_nonzero(sure))
            if scored is not None:
                sure |= ~e
            at = np.flatnonzero(inside)
            ids.append(at + start)
            keys.append(key[at])
            bits.append(np.packbits(sure))
        return cls(chunk, n, bits, np.concatenate(ids), np.concatenate(keys), above, counted)

    def holds(self, k: int) -> bool:
        """Whether the k-th largest scored key lies in the bracket."""
        return self.above <= k <= self.above + len(self.ids)

    def masks(self, k: int) -> Iterator[tuple[int, np.ndarray]]:
        """The keep masks: the sure bits, and the largest ``k - above`` keys inside the bracket
        (ties to the lower id)."""
        best = np.lexsort((self.ids, -self.keys))[:k - self.above]
        winners = np.sort(self.ids[best])
        for i, start in enumerate(range(0, self.n, self.chunk)):
            stop = min(start + self.chunk, self.n)
            keep = np.unpackbits(self.bits[i], count=stop - start).view(bool)
            a, b = np.searchsorted(winners, [start, stop])
            keep[winners[a:b] - start] = True
            self.bits[i] = np.empty(0, np.uint8)  # yielded: free it
            yield start, keep


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
        total += float(scores.sum(dtype=np.float64))
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

    The drops are float32 uniforms from raw PCG64 bits (:func:`uniform32`; float64 draws of
    another stream in earlier versions): the same rule, other draws for a given seed. Two passes
    over the scores (the mean, the decision), memory bounded by one chunk.
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
            # in place and in float32: this loop is most of the decision's time at 1e9
            keep = uniform32([self.seed, epoch, _DROPS, i], len(scores)) >= self.ratio
            keep |= ~below  # only below-mean samples are ever dropped
            below &= keep  # now: the kept below-mean samples, rescaled
            weight = np.ones(len(keep), np.float32)  # (np.where with scalars: 10x slower)
            weight[below] = np.float32(1.0 / (1.0 - self.ratio))
            yield Decision(start, keep, weight, 0 if never is None else int(never.sum()))
