"""RS2: a fresh random subset of the corpus each epoch, drawn without replacement across epochs
(Okanovic et al., "Repeated Random Sampling for Minimizing the Time-to-Accuracy of Learning",
ICLR 2024).

:class:`RS2Policy` keeps ``k = ceil(keep * n)`` samples per epoch. The corpus is walked in the
order of a seeded random permutation: epoch ``e`` keeps the positions ``e*k .. (e+1)*k - 1`` of
that walk, so no sample is read twice before every sample has been read once; when the walk
reaches the end of the corpus it continues on a new permutation (a new cycle). An epoch that
straddles two cycles keeps the end of one and the start of the next; a sample drawn in both is
kept once, so that epoch keeps up to ``k`` (never more).

It reads no score: the decision is a pure function of the seed, ``keep``, ``n`` and the epoch,
so a resumed run rewrites exactly the manifests an uninterrupted one wrote, and the policy holds
no state to checkpoint (a :class:`~es_stream.Pruner` over any store writes it; its
``state_dict`` records the policy's settings). Every epoch is pruned, the first one included
when the caller writes it (:meth:`es_stream.Pruner.write` ``(0, epochs)`` before training): there
is no burn-in and no annealing tail, as in the paper.

Memory: one decision holds a permutation of the corpus (``int64``: 8 bytes per sample) and a
keep mask (1 byte per sample), 9 bytes per sample while it runs.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np

from .policy import CHUNK, Decision, Policy, Read

__all__ = ["RS2Policy"]

_PERMUTATION = 0x5253  # keeps this policy's draws apart from other policies' under one seed


class RS2Policy(Policy):
    """Keep a fresh random ``keep`` share of the corpus each epoch, without replacement across
    epochs until the corpus is exhausted (see the module docstring).

    Args:
        keep: the share of the corpus kept per epoch, in (0, 1].
        seed: the permutations' seed.
    """

    name = "rs2"
    reads_scores = False  # so its first decision can be epoch 0 (es_stream.schedule)

    def __init__(self, keep: float = 0.5, seed: int = 0) -> None:
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"RS2Policy: keep must be a share in (0, 1], got {keep!r}")
        super().__init__(1.0 - keep, anneal=0.0, seed=seed, burn_in_epochs=0)
        self.keep = keep

    def describe(self) -> dict[str, str]:
        return {"policy": self.name, "keep": repr(self.keep), "seed": str(self.seed)}

    def per_epoch(self, n: int) -> int:
        """Samples kept per epoch of a corpus of ``n``: ``ceil(keep * n)``."""
        return min(n, math.ceil(self.keep * n))

    def kept_ids(self, n: int, epoch: int) -> np.ndarray:
        """The ids kept in ``epoch`` (sorted)."""
        k = self.per_epoch(n)
        if n == 0:
            return np.empty(0, np.int64)
        first, last = epoch * k, (epoch + 1) * k  # positions in the endless walk
        parts = []
        for cycle in range(first // n, (last - 1) // n + 1):
            lo, hi = max(first - cycle * n, 0), min(last - cycle * n, n)
            parts.append(self._permutation(n, cycle)[lo:hi])
        return np.unique(np.concatenate(parts))

    def _permutation(self, n: int, cycle: int) -> np.ndarray:
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(
            [self.seed, _PERMUTATION, cycle])))
        return rng.permutation(n)

    def _decide(self, read: Read, n: int, epoch: int, total_epochs: int,
                scored: Read | None, source: str) -> Iterator[Decision]:
        mask = np.zeros(n, bool)
        mask[self.kept_ids(n, epoch)] = True
        for start in range(0, n, CHUNK):
            keep = mask[start:start + CHUNK]
            yield Decision(start, keep.copy(), np.ones(len(keep), np.float32))
