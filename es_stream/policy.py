"""Pruning policies (ESWP's set level): from per-sample scores, which samples the next epoch
keeps. Pure numpy, in chunks, so 1e9 scores never need more than a few chunks in memory.

A policy's :meth:`decide` returns, chunk by chunk, a ``keep`` mask and a per-sample loss
``weight`` (1 except for InfoBatch's rescaled samples).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

CHUNK = 1 << 22  # 4M scores per chunk: ~50 MB of temporaries


def _gumbel_keys(scores: np.ndarray, seed: int, epoch: int, chunk: int) -> np.ndarray:
    """log(score) + Gumbel(0,1), with a generator of its own per chunk so a chunk's keys can be
    computed again in a later pass."""
    rng = np.random.default_rng([seed, epoch, 2, chunk])
    return np.log(np.maximum(scores.astype(np.float64), 1e-300)) - np.log(rng.exponential(size=len(scores)))


def chunked_top_k_mask(read: Callable[[int, int], np.ndarray], n: int, k: int, seed: int,
                       epoch: int, chunk: int = CHUNK) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(start, keep mask)`` per chunk, where the kept samples are exactly the k largest
    Gumbel keys ``log s_i + G_i`` over all n: a draw of k without replacement with probability
    proportional to the scores (successive sampling). ``read(start, stop)`` returns scores.

    Three passes over the chunks, memory bounded by one chunk: the keys' range, a histogram
    that locates the k-th largest key's bin, then the exact cut inside that bin.
    """
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    starts = range(0, n, chunk)

    def keys(i: int, start: int) -> np.ndarray:
        return _gumbel_keys(read(start, min(start + chunk, n)), seed, epoch, i)

    if k in (0, n):
        for start in starts:
            yield start, np.full(min(chunk, n - start), k == n)
        return
    lo, hi = math.inf, -math.inf
    for i, start in enumerate(starts):
        kk = keys(i, start)
        lo, hi = min(lo, float(kk.min())), max(hi, float(kk.max()))
    edges = np.linspace(lo, hi, (1 << 16) + 1)
    hist = np.zeros(len(edges) - 1, dtype=np.int64)
    for i, start in enumerate(starts):
        hist += np.histogram(keys(i, start), bins=edges)[0]
    above = np.cumsum(hist[::-1])[::-1]  # above[j]: keys in bins j and higher
    j = int(np.nonzero(above >= k)[0][-1])  # the bin holding the k-th largest key
    need = k - (int(above[j + 1]) if j + 1 < len(hist) else 0)
    # exact cut inside bin j: collect that bin's keys (a small fraction of n)
    inside: list[np.ndarray] = []
    for i, start in enumerate(starts):
        kk = keys(i, start)
        inside.append(kk[_bin_of(kk, edges, len(hist)) == j])
    boundary = np.concatenate(inside)
    cut = np.partition(boundary, len(boundary) - need)[len(boundary) - need]
    for i, start in enumerate(starts):
        kk = keys(i, start)
        b = _bin_of(kk, edges, len(hist))
        yield start, (b > j) | ((b == j) & (kk >= cut))


def _bin_of(keys: np.ndarray, edges: np.ndarray, bins: int) -> np.ndarray:
    # same convention as np.histogram: right-closed last bin
    return np.clip(np.searchsorted(edges, keys, side="right") - 1, 0, bins - 1)


@dataclass
class Decision:
    """One chunk of a decision: samples ``start .. start+len(keep)``."""

    start: int
    keep: np.ndarray
    weight: np.ndarray


class Policy:
    """Base class: the epochs in which a policy prunes at all."""

    name = "none"

    def __init__(self, ratio: float, anneal: float, seed: int, burn_in_epochs: int = 0) -> None:
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"ratio must be in [0, 1), got {ratio}")
        if not 0.0 <= anneal <= 1.0:
            raise ValueError(f"anneal must be a fraction in [0, 1], got {anneal}")
        if burn_in_epochs < 0:
            raise ValueError(f"burn_in_epochs must be >= 0, got {burn_in_epochs}")
        self.ratio, self.anneal, self.seed, self.burn_in_epochs = ratio, anneal, seed, burn_in_epochs

    def prunes(self, epoch: int, total_epochs: int) -> bool:
        """Whether ``epoch`` is pruned: after burn-in and before the annealing tail (the last
        ``anneal`` fraction of epochs, rounded up, trains on everything)."""
        tail = math.ceil(self.anneal * total_epochs)
        return self.ratio > 0 and self.burn_in_epochs <= epoch < total_epochs - tail

    def decide(self, read: Callable[[int, int], np.ndarray], n: int, epoch: int,
               total_epochs: int) -> Iterator[Decision]:
        """The decision for ``epoch`` over scores ``read(start, stop)``, chunk by chunk."""
        raise NotImplementedError

    def describe(self) -> dict[str, str]:
        return {"policy": self.name, "ratio": repr(self.ratio), "seed": str(self.seed)}

    def _keep_all(self, n: int) -> Iterator[Decision]:
        for start in range(0, n, CHUNK):
            size = min(CHUNK, n - start)
            yield Decision(start, np.ones(size, bool), np.ones(size, np.float32))


class ESWPPolicy(Policy):
    """ES with pruning (Cheng et al. 2025): keep ``ceil((1 - ratio) n)`` samples drawn without
    replacement with probability proportional to their scores (Gumbel-top-k over all scores,
    in chunks). Epochs before ``burn_in_epochs`` and in the annealing tail keep everything.
    Pruned samples keep their scores (they were not seen, so nothing new is known about them)."""

    name = "es"

    def __init__(self, ratio: float = 0.3, anneal: float = 0.125, burn_in_epochs: int = 1,
                 seed: int = 0) -> None:
        super().__init__(ratio, anneal, seed, burn_in_epochs)

    def decide(self, read, n, epoch, total_epochs):
        if not self.prunes(epoch, total_epochs):
            yield from self._keep_all(n)
            return
        k = math.ceil((1.0 - self.ratio) * n)
        for start, keep in chunked_top_k_mask(read, n, k, self.seed, epoch):
            yield Decision(start, keep, np.ones(len(keep), np.float32))


class InfoBatchPolicy(Policy):
    """InfoBatch (Qin et al., ICLR 2024): among samples scoring below the mean score, drop a
    random fraction ``ratio``; the kept below-mean samples get loss weight ``1 / (1 - ratio)``
    so the expected gradient is unchanged. The annealing tail keeps everything."""

    name = "infobatch"

    def __init__(self, ratio: float = 0.5, anneal: float = 0.125, seed: int = 0) -> None:
        super().__init__(ratio, anneal, seed, burn_in_epochs=0)

    def decide(self, read, n, epoch, total_epochs):
        if not self.prunes(epoch, total_epochs):
            yield from self._keep_all(n)
            return
        total = 0.0
        for start in range(0, n, CHUNK):
            total += float(read(start, min(start + CHUNK, n)).astype(np.float64).sum())
        mean = total / n
        for i, start in enumerate(range(0, n, CHUNK)):
            scores = read(start, min(start + CHUNK, n))
            below = scores < mean
            drop = below & (np.random.default_rng([self.seed, epoch, 3, i]).random(len(scores)) < self.ratio)
            weight = np.where(below & ~drop, 1.0 / (1.0 - self.ratio), 1.0).astype(np.float32)
            yield Decision(start, ~drop, weight)
