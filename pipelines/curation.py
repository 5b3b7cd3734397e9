"""Offline curation as a prune-once method of the loop: deduplication (:mod:`es_stream.dedup`),
optionally ANDed with a reference filter, decided before the first step, its cost on the
method's clock.

:class:`DedupPruner` stands where the loop expects a :class:`~es_stream.Pruner` of a
``prune="once"`` method (``policy.check(store)``, then ``write(0, epochs)``): ``write`` reads
every sample of the corpus once, hashes it (and MinHashes it for near duplicates), and writes
the decision as ``epoch=00000`` (``applies_to: all``) with the reason per sample, exactly what
``es-stream dedup`` writes. With a ``filter`` (a prune-once :class:`~es_stream.Pruner` on the
reference scores, writing to a directory of its own: :func:`filter_dir`) the filter's decision
is written first and dedup keeps only what it kept (``es-stream dedup --filter``).
"""

from __future__ import annotations

import os
from typing import Any

from es_stream import Corpus
from es_stream.dedup import DedupConfig, corpus_dedup, write_manifests


def filter_dir(manifests: str) -> str:
    """Where a combined method's filter writes its own decision: beside the manifests."""
    return os.path.normpath(manifests) + "-filter"


class _NoCheck:
    """The policy check of a dedup without a filter: nothing to check before writing."""

    def check(self, store: Any) -> None:
        return None


class DedupPruner:
    """Exact (``config.near`` False) or exact + near deduplication of ``corpus`` into
    ``manifests``, optionally restricted to what ``filter`` keeps. ``num_workers``: DataLoader
    workers reading the corpus (0: this process, the loop's one-core accounting)."""

    def __init__(self, corpus: Corpus, manifests: str, config: DedupConfig | None = None,
                 filter: Any = None, num_workers: int = 0) -> None:
        self.corpus, self.manifests = corpus, manifests
        self.config = config or DedupConfig()
        self.filter, self.num_workers = filter, num_workers
        self.policy = filter.policy if filter is not None else _NoCheck()
        self.store = filter.store if filter is not None else None
        self.result = None

    def write(self, epoch: int, total_epochs: int) -> None:
        """Decide and write ``epoch=00000`` for every epoch (``epoch`` must be 0)."""
        if epoch != 0:
            raise ValueError(f"deduplication is decided once, at epoch 0, not {epoch}")
        filter_dir = None
        if self.filter is not None:
            self.filter.write(0, total_epochs)
            filter_dir = self.filter.out_dir
        self.result = corpus_dedup(self.corpus, self.config, filter_dir=filter_dir,
                                   num_workers=self.num_workers)
        write_manifests(self.corpus, self.result, self.manifests, self.config, filter_dir)
