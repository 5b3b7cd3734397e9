"""`ESDataset`: the stream of meta-batches Evolved Sampling consumes."""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, default_collate

from .corpus import Corpus, is_local_url
from .distributed import rank_and_world_size, worker_and_count
from .errors import ShardError
from .manifest import SUCCESS, EpochKeep, epoch_dir, read_epoch
from .metabatch import MetaBatch
from .plan import EpochPlan
from .sources import open_reader

log = logging.getLogger(__name__)


def webdataset_decode() -> Callable[[dict], Any]:
    """webdataset's default decoding (``.cls`` -> int, ``.txt`` -> str, ``.json``, ``.npy``,
    ``.pth``, ...; unknown suffixes stay bytes): ``webdataset.autodecode.Decoder([])``."""
    from webdataset.autodecode import Decoder

    return Decoder([])


class ESDataset(IterableDataset):
    """Meta-batches of ``meta_batch_size`` samples with stable ids, for one epoch at a time.

    Every sample of the corpus appears exactly once per epoch over all ranks and DataLoader
    workers; all ranks yield the same number of meta-batches (see :mod:`es_stream.plan` for the
    shuffle and how ranks are equalised). The order is a pure function of
    ``(seed, epoch, world size, rank, workers)``; call :meth:`set_epoch` before each epoch, as
    with ``DistributedSampler`` — the epoch lives in shared memory, so persistent workers see it.

    Args:
        corpus: an indexed :class:`Corpus`.
        meta_batch_size: B, samples per meta-batch.
        decode: per-sample function; default webdataset's decoder for tar shards, the identity
            for MDS (whose columns ``MDSWriter`` already typed).
        collate: list of decoded samples -> batch; default ``torch.utils.data.default_collate``.
        shuffle: shuffle shard order and, for seekable shards, samples within blocks.
        seed: shuffle seed.
        drop_last: give every rank only full meta-batches; left-out samples are counted in
            :attr:`dropped_per_epoch`.
        on_error: ``"raise"`` (default) or ``"skip"``: a shard found corrupt mid-epoch is then
            skipped for the rest of the epoch in that worker with a warning; the lost ids ride on
            the next meta-batch as ``MetaBatch.lost_ids`` and, in-process, add to
            :attr:`samples_lost`.
        block_size: positions per shuffle block (see :mod:`es_stream.plan`).
        manifests: a pruning manifest directory (written by :class:`es_stream.Pruner` or
            ``es-stream prune``). Epoch e reads ``manifests/epoch=e`` when it starts; pruned
            samples are left out of the plan, so they are never read nor decoded (streamed
            ``pipe:`` shards still pass their bytes by, undecoded). An epoch with no directory
            keeps everything (logged once). Loss weights from the manifest (InfoBatch) arrive
            as ``MetaBatch.weights``.
        rank, world_size: override what is read from ``torch.distributed`` or the environment
            (``RANK``/``WORLD_SIZE``) when the dataset is created.
    """

    def __init__(self, corpus: Corpus, meta_batch_size: int, decode: Callable[[dict], Any] | None = None,
                 collate: Callable[[list], Any] | None = None, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, on_error: str = "raise", *, block_size: int = 1 << 18,
                 manifests: str | os.PathLike | None = None, rank: int | None = None,
                 world_size: int | None = None) -> None:
        super().__init__()
        if not isinstance(corpus, Corpus):
            raise TypeError(f"corpus must be an es_stream.Corpus, got {type(corpus).__name__}")
        if not isinstance(meta_batch_size, int) or meta_batch_size < 1:
            raise ValueError(f"meta_batch_size must be an integer >= 1, got {meta_batch_size!r}")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        detected_rank, detected_world = rank_and_world_size()
        self.rank = detected_rank if rank is None else rank
        self.world_size = detected_world if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world_size {self.world_size}")
        corpus.check_fresh()
        self.corpus = corpus
        self.meta_batch_size = meta_batch_size
        self.decode = decode if decode is not None else (
            webdataset_decode() if corpus.format == "wds" else None)
        self.collate = collate if collate is not None else default_collate
        self.shuffle, self.seed, self.drop_last, self.on_error = shuffle, seed, drop_last, on_error
        self.block_size = block_size
        self.seekable = corpus.format == "mds" or all(is_local_url(s.name) for s in corpus.shards)
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self.samples_lost = 0
        self.manifests = None if manifests is None else os.fspath(manifests)
        self._keep_cache: tuple[tuple[int, int], EpochKeep | None] | None = None
        self._logged_unpruned: set[int] = set()
        self.plan(0)  # validate the partition now, not in a worker

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next iteration yields."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self._epoch.fill_(epoch)

    def epoch_keep(self, epoch: int) -> EpochKeep | None:
        """The manifest decision for ``epoch``, or None when nothing is pruned (cached)."""
        if self.manifests is None:
            return None
        success = os.path.join(epoch_dir(self.manifests, epoch), SUCCESS)
        key = (epoch, os.stat(success).st_mtime_ns if os.path.exists(success) else -1)
        if self._keep_cache is None or self._keep_cache[0] != key:
            keep = read_epoch(self.manifests, epoch, self.corpus.fingerprint, self.corpus.shard_counts)
            if keep is None and epoch not in self._logged_unpruned:
                self._logged_unpruned.add(epoch)
                log.info("epoch %d: no manifest in %s, keeping every sample", epoch, self.manifests)
            self._keep_cache = (key, keep)
        return self._keep_cache[1]

    def plan(self, epoch: int | None = None) -> EpochPlan:
        """This rank's :class:`EpochPlan` for ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else epoch
        keep = self.epoch_keep(epoch)
        return EpochPlan(self.corpus.shard_counts, meta_batch_size=self.meta_batch_size,
                         seed=self.seed, epoch=epoch, world_size=self.world_size, rank=self.rank,
                         shuffle=self.shuffle, seekable=self.seekable, block_size=self.block_size,
                         drop_last=self.drop_last, kept_ids=None if keep is None else keep.kept_ids)

    def __len__(self) -> int:
        """Meta-batches this rank yields per epoch (equal on every rank)."""
        return self.plan().num_batches

    @property
    def dropped_per_epoch(self) -> int:
        """Samples left out of each epoch by ``drop_last`` (0 without it)."""
        return self.plan().dropped

    def __iter__(self) -> Iterator[MetaBatch]:
        epoch = self.epoch
        worker, num_workers = worker_and_count()
        batches = self.plan(epoch).worker_batches(num_workers, worker)
        keep = self.epoch_keep(epoch)
        weights = None if keep is None else keep.weights
        reader = open_reader(self.corpus)
        failed_shards: set[int] = set()
        pending_lost: list[int] = []
        try:
            for ids in batches:
                shards, positions = self.corpus.locate(ids)
                samples, kept = [], []
                for sid, shard, pos in zip(ids.tolist(), shards.tolist(), positions.tolist()):
                    if shard in failed_shards:
                        pending_lost.append(sid)
                        continue
                    try:
                        sample = reader.read(shard, pos, sid)
                        samples.append(sample if self.decode is None else self._decode(sample, shard, sid))
                        kept.append(sid)
                    except ShardError as exc:
                        if self.on_error == "raise":
                            raise
                        warnings.warn(f"skipping the rest of this shard in epoch {epoch}: {exc}",
                                      RuntimeWarning, stacklevel=2)
                        failed_shards.add(shard)
                        pending_lost.append(sid)
                if not kept:
                    continue
                lost = torch.tensor(pending_lost, dtype=torch.int64)
                self.samples_lost += len(pending_lost)
                pending_lost = []
                kept_ids = np.asarray(kept, dtype=np.int64)
                yield MetaBatch(ids=torch.from_numpy(kept_ids), data=self.collate(samples),
                                epoch=epoch, lost_ids=lost,
                                weights=None if weights is None else torch.from_numpy(
                                    weights[np.searchsorted(keep.kept_ids, kept_ids)]))
            if pending_lost:
                self.samples_lost += len(pending_lost)
                warnings.warn(f"epoch {epoch}: {len(pending_lost)} samples lost to corrupt shards "
                              "after this worker's last meta-batch", RuntimeWarning, stacklevel=2)
        finally:
            reader.close()

    def _decode(self, sample: dict, shard: int, sample_id: int) -> Any:
        try:
            return self.decode(sample)
        except Exception as exc:
            raise ShardError(self.corpus.shards[shard].name, f"cannot decode sample ({exc})",
                             sample=sample_id) from exc


def loader(dataset: ESDataset, num_workers: int = 2, **kwargs: Any) -> DataLoader:
    """A ``DataLoader`` over meta-batches: ``batch_size=None`` (the dataset batches), persistent
    workers when ``num_workers > 0``, ``pin_memory`` when CUDA is available. Any keyword
    overrides these defaults."""
    options: dict[str, Any] = {
        "batch_size": None,
        "num_workers": num_workers,
        "persistent_workers": num_workers > 0,
        "pin_memory": torch.cuda.is_available(),
    }
    options.update(kwargs)
    return DataLoader(dataset, **options)
