"""`ESStreamingDataset`: mosaicml-streaming's ``StreamingDataset`` over one MDS corpus, with
es-stream's sample ids and pruning manifests.

Import it as ``from es_stream.integrations.streaming_dataset import ESStreamingDataset``; it
needs mosaicml-streaming (``pip install 'es-stream[mds]'``), which the es-stream core does not.

Why a subclass and not a wrapper: streaming's deterministic, elastic mid-epoch resume
(``state_dict(num_samples, from_beginning)`` / ``load_state_dict``), its node/rank/worker
partitions and its shard prefetching all work on the epoch's plan of sample ids, which
``StreamingDataset`` builds from :meth:`StreamingDataset.resample_streams`. Pruning there, before
the plan is partitioned and shuffled, keeps all of that exact for the pruned epoch, and a pruned
sample is never fetched, decoded or yielded.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import numpy as np
from numpy.typing import NDArray
from streaming import StreamingDataset
from streaming.base.world import World

from ..agreement import check_ranks_agree, corpus_fields, in_multi_rank_run, manifest_run
from ..corpus import Corpus
from ..errors import ShardError
from ..manifest import EpochKeep, read_epoch
from ..mds_index import read_mds_index_file
from ..sources.mds import writable_arrays

log = logging.getLogger(__name__)

__all__ = ["ESStreamingDataset"]

# Arguments of StreamingDataset that would make streaming's sample index differ from es-stream's
# id, or make an epoch repeat an id (ES meta-batches hold each id at most once).
_REFUSED = {
    "streams": "several streams (one ESStreamingDataset reads one MDS corpus: es-stream ids are "
               "shard offset + position within that corpus)",
    "epoch_size": "epoch_size (up/down-sampling repeats or drops ids within an epoch; prune with "
                  "manifests instead)",
    "replication": "replication (ranks sharing samples would update the same scores twice)",
}


class ESStreamingDataset(StreamingDataset):
    """A ``StreamingDataset`` whose samples carry their es-stream id and that skips pruned ids.

    Each sample is the dict of columns ``MDSWriter`` was given plus ``id_key`` (default
    ``"es_id"``): the global sample id, equal to ``es_stream.Corpus.from_mds(local)``'s id of the
    same sample (shard offset + position, shards in ``index.json`` order), so scores and
    manifests line up with the rest of es-stream. The default collate turns it into an int64
    tensor ``batch["es_id"]``.

    With ``manifests`` (a directory written by :class:`es_stream.Pruner`, e.g. by
    :class:`es_stream.integrations.composer.EvolvedSampling` with a policy), epoch ``e`` reads
    ``manifests/epoch=<e>`` when it exists and plans only the kept ids: pruned samples are
    never fetched, decoded or yielded, and ``len(dataset)`` is the kept count (per rank) of the
    epoch the next iteration runs. An epoch without a manifest directory keeps everything. The
    epoch is streaming's own epoch counter: one full iteration per epoch, as Composer does.

    Deterministic mid-epoch resume is streaming's (``state_dict(num_samples, from_beginning)``,
    ``load_state_dict``), applied to the pruned epoch's plan; resume needs the same manifests.

    Loss weights in the manifests (InfoBatch) are not part of the samples: the Composer
    algorithm :class:`es_stream.integrations.composer.InfoBatch` applies them to the loss (and
    sets :attr:`weights_delivered`); without it, an epoch with weights logs a warning.

    Args:
        local: local MDS directory (cache, when ``remote`` is given).
        remote: optional remote MDS location.
        split: optional split subdirectory.
        manifests: optional manifest directory (read at the start of each epoch).
        id_key: name of the id field added to every sample.
        batch_size: per-rank batch size, as for ``StreamingDataset`` (required there for
            deterministic resume): the meta-batch size B when training with ES.
        **kwargs: other ``StreamingDataset`` arguments (``shuffle``, ``shuffle_seed``,
            ``num_canonical_nodes``, ``predownload``, ``cache_limit``...). ``streams``,
            ``epoch_size``, ``replication`` and batching methods other than ``"random"`` are
            refused: with them a sample's index would not be its es-stream id, or an epoch would
            repeat ids.
    """

    def __init__(self, *, local: str | os.PathLike, remote: str | None = None,
                 split: str | None = None, manifests: str | os.PathLike | None = None,
                 id_key: str = "es_id", batch_size: int | None = None, **kwargs: Any) -> None:
        for name, why in _REFUSED.items():
            if kwargs.get(name) is not None:
                raise ValueError(f"ESStreamingDataset: {name}= is not supported: {why}")
        if kwargs.get("batching_method", "random") != "random":
            raise ValueError(f"ESStreamingDataset: batching_method={kwargs['batching_method']!r} "
                             "is not supported; use the default 'random' (the pruned plan is "
                             "built for it)")
        if not isinstance(id_key, str) or not id_key:
            raise ValueError(f"id_key must be a non-empty column name, got {id_key!r}")
        local = os.fspath(local)
        try:
            super().__init__(local=local, remote=remote, split=split, batch_size=batch_size,
                             **kwargs)
        except Exception as exc:
            # streaming parses index.json with bare indexing (KeyError, TypeError): when that
            # file is what is wrong, say so, naming it, the shard entry and the key
            index_json = os.path.join(local, split or "", "index.json")
            if os.path.isfile(index_json):
                try:
                    read_mds_index_file(index_json)
                except ShardError as bad:
                    raise bad from exc
            raise
        self.id_key = id_key
        self.manifests = None if manifests is None else os.fspath(manifests)
        self.corpus = Corpus.from_mds(local, remote=remote, split=split)
        counts = self.corpus.shard_counts
        if len(counts) != self.num_shards or not np.array_equal(counts, self.samples_per_shard):
            raise ValueError(f"{local}: streaming sees {self.num_shards} shards "
                             f"({int(self.samples_per_shard.sum())} samples) but the MDS index "
                             f"lists {len(counts)} ({int(counts.sum())}); the index.json changed "
                             "while the dataset was created?")
        self._full_epoch_size = int(self.epoch_size)
        self._resume_epoch: int | None = None
        self._kept_counts: dict[int, int] = {}  # epoch -> kept samples (small: for __len__)
        # set by the InfoBatch algorithm, which applies the manifests' loss weights itself
        self.weights_delivered = False

    # ------------------------------------------------------------------ ids
    def get_item(self, sample_id: int, retry: int = 7) -> Any:
        """The sample's columns plus ``id_key``: its global es-stream id. ``ndarray`` columns
        come back writable (see :func:`es_stream.sources.mds.writable_arrays`)."""
        sample = writable_arrays(super().get_item(sample_id, retry))
        if self.id_key in sample:
            raise ValueError(f"{self.corpus.local_path(0)}: the MDS corpus already has a column "
                             f"{self.id_key!r}; pass another id_key= to ESStreamingDataset")
        sample[self.id_key] = int(sample_id)
        return sample

    # -------------------------------------------------------------- ranks
    def agreement_fields(self, epoch: int) -> dict[str, Any]:
        """What every rank must agree on for ``epoch``: the corpus (fingerprint, sample count,
        shard identities), the shuffle (``shuffle``, ``shuffle_seed``, ``shuffle_algo``), the
        per-rank ``batch_size``, ``sampling_method``, the number of ranks streaming partitions
        for, that streaming's rank is the process group's, the epoch and the manifests' run."""
        import torch.distributed as dist

        world = World.detect()
        own_rank = not (dist.is_available() and dist.is_initialized()) or world.rank == dist.get_rank()
        return {"dataset_rank_is_process_rank": bool(own_rank), **corpus_fields(self.corpus),
                "shuffle": bool(self.shuffle), "shuffle_seed": int(self.shuffle_seed),
                "shuffle_algo": str(self.shuffle_algo), "batch_size": self.batch_size,
                "sampling_method": str(self.sampling_method), "world_size": int(world.num_ranks),
                "epoch": int(epoch), "manifest_run_id": manifest_run(self.manifests)}

    def check_ranks(self, epoch: int) -> None:
        """Under an initialised ``torch.distributed`` group of several ranks, compare
        :meth:`agreement_fields` across ranks (a collective: every rank calls it for the same
        epoch) and raise :class:`es_stream.RankMismatchError` on every rank, naming the field
        and each rank's value, when they differ. A no-op in a single process. Streaming keeps
        its epoch inside the iteration (in the DataLoader workers), so the loop calls this at
        the epoch's start: Composer's ``InfoBatch`` and ``EvolvedSampling`` do at
        ``EPOCH_START``."""
        if in_multi_rank_run():
            check_ranks_agree(self.agreement_fields(epoch), where=f"at the start of epoch {epoch}")

    # -------------------------------------------------------------- pruning
    def epoch_keep(self, epoch: int) -> EpochKeep | None:
        """What ``manifests`` keeps in ``epoch`` (None: everything, no manifest for it)."""
        if self.manifests is None or epoch < 0:
            return None
        keep = read_epoch(self.manifests, epoch, self.corpus.fingerprint, self.corpus.shard_counts)
        if keep is not None and len(keep.kept_ids) == 0:
            raise ValueError(f"{self.manifests}: epoch {epoch} keeps no sample; nothing to train on")
        if keep is not None and keep.weights is not None and not self.weights_delivered:
            log.warning("%s: epoch %d carries per-sample loss weights (InfoBatch); "
                        "ESStreamingDataset yields no weights: train with the Composer algorithm "
                        "es_stream.integrations.composer.InfoBatch, which applies them to the loss "
                        "(or read them with es_stream.manifest.read_epoch)", self.manifests, epoch)
        return keep

    def epoch_samples(self, epoch: int) -> int:
        """Samples of ``epoch`` over all ranks: the kept count when pruned, else the corpus."""
        if epoch not in self._kept_counts:
            keep = self.epoch_keep(epoch)
            self._kept_counts[epoch] = self._full_epoch_size if keep is None else len(keep.kept_ids)
        return self._kept_counts[epoch]

    def epoch_length(self, epoch: int) -> int:
        """Samples this rank yields in ``epoch`` (streaming pads ranks to equal counts)."""
        return math.ceil(self.epoch_samples(epoch) / World.detect().num_ranks)

    def resample_streams(self, epoch: int, stream_id: int | None = None
                         ) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """Streaming's epoch sample space, restricted to the ids ``epoch``'s manifest keeps.

        Returns the shuffle units (kept samples per shard, shards in order, empty shards left
        out) and the kept ids. ``epoch_size`` is set to the kept count here because
        streaming's partitioner reads it right after, to lay out exactly these samples over
        nodes, ranks and workers.
        """
        units, ids = super().resample_streams(epoch, stream_id)
        keep = self.epoch_keep(epoch)
        if keep is None:
            self.epoch_size = self._full_epoch_size
            return units, ids
        # no resampling is allowed (see _REFUSED), so streaming's space is every id once
        if len(ids) != self.corpus.num_samples:
            raise RuntimeError(f"streaming planned {len(ids)} samples for epoch {epoch}, the corpus "
                               f"has {self.corpus.num_samples}: resampling is not supported")
        kept = keep.kept_ids
        shard = np.searchsorted(self.corpus.shard_starts, kept, side="right") - 1
        per_shard = np.bincount(shard, minlength=self.corpus.num_shards).astype(np.int64)
        self.epoch_size = len(kept)
        return per_shard[per_shard > 0], kept.astype(np.int64)

    # ------------------------------------------------------------ epochs
    def _upcoming_epoch(self) -> int:
        """The epoch the next iteration runs: streaming's counter, or a loaded resume state's
        epoch when that is later (the rule of ``StreamingDataset._resume``)."""
        epoch = self.next_epoch
        if self._resume_epoch is not None and self._resume_epoch >= epoch:
            epoch = self._resume_epoch
        return epoch

    def __len__(self) -> int:
        """Samples this rank yields in the epoch the next iteration runs, under its manifest
        (at Composer's ``EPOCH_START`` that is the current epoch)."""
        return self.epoch_length(self._upcoming_epoch())

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        """Streaming's resume state; also remembered here so ``len`` names the resumed epoch."""
        self._resume_epoch = int(obj["epoch"])
        super().load_state_dict(obj)

    def state_dict(self, num_samples: int, from_beginning: bool) -> dict[str, Any]:
        """Streaming's resume state, with one correction for epoch boundaries.

        Composer asks for ``state_dict(sample_in_epoch, True)`` with its own epoch counter,
        which has already moved to epoch ``e + 1`` when it checkpoints at the end of epoch
        ``e``; streaming's counter still names ``e`` (its next iteration has not started), so
        the state would say "epoch e, sample 0" and a resume would replay epoch ``e`` (with
        its manifest). An epoch whose iteration has started and of which zero samples are
        counted from its beginning is therefore the next one.
        """
        state = super().state_dict(num_samples, from_beginning)
        if from_beginning and num_samples == 0 and 0 <= state["epoch"] == self.next_epoch - 1:
            state["epoch"] += 1
        return state
