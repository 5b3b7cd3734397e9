"""Pruning policies over reference scores, decided once before training (Ankner et al. 2024,
"Perplexed by Perplexity"; ``docs/REFERENCE.md``).

:class:`BandPolicy` keeps a fraction of the corpus from the low, middle or high part of the
score distribution; :class:`ThresholdPolicy` keeps the samples whose score lies between two
bounds. Both give :class:`~es_stream.policy.Decision` chunks, so :class:`es_stream.Pruner` writes
them unchanged, and both mark their manifests ``applies_to: all``: the decision written to
``epoch=00000`` then holds for every epoch (see :func:`es_stream.manifest.read_epoch`).

Exact at any n with bounded memory: the k-th score (ties broken by sample id) is found by a
histogram over chunks, refined until the bin holding it is small, then cut exactly.

Never-scored samples are refused (a :class:`~es_stream.ScoreError` naming the first id): a
reference pass scores every sample, so one that was not is a sign of an unfinished pass, and no
band can place it.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np

from .errors import ScoreError
from .policy import CHUNK, Decision, Policy, Read, checked_reader

__all__ = ["ALL_EPOCHS", "BandPolicy", "ThresholdPolicy", "rank_cut"]

ALL_EPOCHS = "all"  # the manifests' ``applies_to`` metadata: one decision for every epoch
_BINS = 1 << 16
_COLLECT = 1 << 22  # a bin this small is cut exactly in memory (~50 MB at most)


def refuse_never_scored(scored: Read | None, n: int, source: str,
                        advice: str = "a reference band needs every sample's score — finish the "
                        "scoring pass (`es-stream score` again) before pruning",
                        chunk: int = CHUNK) -> None:
    """Raise :class:`ScoreError` naming ``source``, how many of the ``n`` samples were never
    scored and the first of them, unless ``scored(start, stop)`` is True everywhere (a
    reference store must hold every sample's score; None: nothing to check)."""
    if scored is None:
        return
    missing, first = 0, None
    for start in range(0, n, chunk):
        never = np.flatnonzero(~scored(start, min(start + chunk, n)))
        if len(never) and first is None:
            first = start + int(never[0])
        missing += len(never)
    if missing:
        raise ScoreError(f"{source}: {missing} of {n} samples were never scored (the first: sample "
                         f"id {first}); {advice}")


def rank_cut(read: Read, n: int, r: int, chunk: int = CHUNK) -> tuple[float, int]:
    """``(score, id)`` of the sample of rank ``r`` (0-based) when all n samples are ordered by
    score, then by id: the exact cut, in passes over chunks, memory bounded by one chunk plus
    ``_COLLECT`` candidates."""
    if not 0 <= r < n:
        raise ValueError(f"rank must be in [0, {n}), got {r}")
    starts = range(0, n, chunk)

    def values(start: int) -> np.ndarray:
        return read(start, min(start + chunk, n)).astype(np.float64)

    lo, hi = math.inf, -math.inf
    for start in starts:
        v = values(start)
        lo, hi = min(lo, float(v.min())), max(hi, float(v.max()))
    below = 0  # samples scoring under lo
    for _ in range(64):
        if lo == hi:  # every candidate has this score: ties go by id, which chunks give in order
            need = r - below
            for start in starts:
                idx = np.flatnonzero(values(start) == lo)
                if need < len(idx):
                    return lo, start + int(idx[need])
                need -= len(idx)
            raise AssertionError("rank_cut: scores changed between passes")
        edges = np.linspace(lo, hi, _BINS + 1)
        hist = np.zeros(_BINS, np.int64)
        for start in starts:
            v = values(start)
            v = v[(v >= lo) & (v <= hi)]
            hist += np.bincount(_bin_of(v, edges), minlength=_BINS)
        cum = np.cumsum(hist)
        j = int(np.searchsorted(cum, r - below, side="right"))  # the bin holding rank r
        below += int(cum[j - 1]) if j else 0
        if hist[j] <= _COLLECT:
            vals, ids = [], []
            for start in starts:
                v = values(start)
                inside = np.flatnonzero((v >= lo) & (v <= hi))
                inside = inside[_bin_of(v[inside], edges) == j]
                vals.append(v[inside])
                ids.append(inside.astype(np.int64) + start)
            vals_a, ids_a = np.concatenate(vals), np.concatenate(ids)
            pick = np.lexsort((ids_a, vals_a))[r - below]
            return float(vals_a[pick]), int(ids_a[pick])
        # too many in that bin (heavy ties or a spike): narrow to its own range and go again
        new_lo, new_hi = math.inf, -math.inf
        for start in starts:
            v = values(start)
            v = v[(v >= lo) & (v <= hi)]
            v = v[_bin_of(v, edges) == j]
            if len(v):
                new_lo, new_hi = min(new_lo, float(v.min())), max(new_hi, float(v.max()))
        lo, hi = new_lo, new_hi
    raise AssertionError("rank_cut did not converge")


def _bin_of(v: np.ndarray, edges: np.ndarray) -> np.ndarray:
    return np.clip(np.searchsorted(edges, v, side="right") - 1, 0, len(edges) - 2)


def _at_or_after(v: np.ndarray, ids: np.ndarray, cut: tuple[float, int]) -> np.ndarray:
    """Whether each ``(v, id)`` comes at or after ``cut`` in (score, id) order."""
    return (v > cut[0]) | ((v == cut[0]) & (ids >= cut[1]))


class _OncePolicy(Policy):
    """A decision made once, before training: it applies to every epoch (no burn-in, no
    annealing tail), and its manifests say so (``applies_to: all``)."""

    def prunes(self, epoch: int, total_epochs: int) -> bool:
        return True

    def check(self, store) -> None:
        """Refuse, before any manifest is written, a store this decision cannot use (never-scored
        or non-finite scores; for a threshold, one that keeps nothing): the errors
        :meth:`decide` would raise, raised before the Pruner creates the epoch directory."""
        n, reader = store.num_samples, store.range_reader()
        for decision in self.decide(reader.scores, n, 0, 1, scored=reader.scored,
                                    source=store.describe()):
            del decision
            break

    def describe(self) -> dict[str, str]:
        return {**super().describe(), "applies_to": ALL_EPOCHS}


class BandPolicy(_OncePolicy):
    """Keep exactly ``ceil(keep * n)`` samples from one band of the reference-score
    distribution (Ankner et al. 2024): ``"low"`` (the lowest scores: most predictable),
    ``"middle"`` (centred on the median) or ``"high"`` (the least predictable).

    Samples are ordered by score, then by sample id (ties broken deterministically, by id);
    ``low`` keeps ranks ``[0, k)``, ``high`` ranks ``[n - k, n)``, ``middle`` ranks
    ``[(n - k) // 2, (n - k) // 2 + k)`` (when ``n - k`` is odd, the extra sample left out is on
    the high side). Scores are the loss itself: a perplexity band is the same set, as
    ``exp`` keeps the order. Every sample must be scored and finite (else
    :class:`~es_stream.ScoreError`).
    """

    name = "band"

    def __init__(self, keep: float = 0.5, band: str = "middle") -> None:
        if not isinstance(keep, (int, float)) or not 0.0 < keep <= 1.0:
            raise ValueError(f"keep must be a fraction in (0, 1], got {keep!r}")
        if band not in ("low", "middle", "high"):
            raise ValueError(f"band must be 'low', 'middle' or 'high', got {band!r}")
        super().__init__(ratio=1.0 - float(keep), anneal=0.0, seed=0)
        self.keep, self.band = float(keep), band

    def describe(self) -> dict[str, str]:
        return {**super().describe(), "keep": repr(self.keep), "band": self.band}

    def bounds(self, n: int) -> tuple[int, int]:
        """The kept ranks ``[first, stop)`` for n samples."""
        k = min(n, math.ceil(self.keep * n))
        first = {"low": 0, "high": n - k, "middle": (n - k) // 2}[self.band]
        return first, first + k

    def _decide(self, read, n, epoch, total_epochs, scored, source) -> Iterator[Decision]:
        refuse_never_scored(scored, n, source)
        read = checked_reader(read, n, source)
        first, stop = self.bounds(n)
        lo_cut = rank_cut(read, n, first) if first > 0 else None
        hi_cut = rank_cut(read, n, stop) if stop < n else None
        for start in range(0, n, CHUNK):
            v = read(start, min(start + CHUNK, n)).astype(np.float64)
            ids = np.arange(start, start + len(v), dtype=np.int64)
            keep = np.ones(len(v), bool)
            if lo_cut is not None:
                keep &= _at_or_after(v, ids, lo_cut)
            if hi_cut is not None:
                keep &= ~_at_or_after(v, ids, hi_cut)
            yield Decision(start, keep, np.ones(len(v), np.float32), 0)


class ThresholdPolicy(_OncePolicy):
    """Keep the samples whose reference score ``s`` has ``low <= s <= high`` (either bound may
    be None: unbounded). Every sample must be scored and finite; a decision that keeps no sample
    is refused (``ValueError`` naming the bounds) before anything is written."""

    name = "threshold"

    def __init__(self, low: float | None = None, high: float | None = None) -> None:
        for arg, value in (("low", low), ("high", high)):
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise ValueError(f"{arg} must be a finite number or None, got {value!r}")
        if low is None and high is None:
            raise ValueError("ThresholdPolicy needs low, high or both (a score range to keep)")
        if low is not None and high is not None and low > high:
            raise ValueError(f"low={low} is above high={high}: the range keeps nothing")
        super().__init__(ratio=0.5, anneal=0.0, seed=0)  # ratio is unused: the bounds decide
        self.low, self.high = low, high

    def describe(self) -> dict[str, str]:
        return {**super().describe(), "low": repr(self.low), "high": repr(self.high)}

    def _mask(self, v: np.ndarray) -> np.ndarray:
        keep = np.ones(len(v), bool)
        if self.low is not None:
            keep &= v >= self.low
        if self.high is not None:
            keep &= v <= self.high
        return keep

    def _decide(self, read, n, epoch, total_epochs, scored, source) -> Iterator[Decision]:
        refuse_never_scored(scored, n, source)
        read = checked_reader(read, n, source)
        if not any(self._mask(read(a, min(a + CHUNK, n))).any() for a in range(0, n, CHUNK)):
            raise ValueError(f"{source}: no score lies in [{self.low}, {self.high}]: the "
                             "threshold keeps no sample; widen --low/--high")
        for start in range(0, n, CHUNK):
            v = read(start, min(start + CHUNK, n))
            yield Decision(start, self._mask(v), np.ones(len(v), np.float32), 0)
