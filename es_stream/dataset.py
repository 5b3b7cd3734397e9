"""`ESDataset`: the stream of meta-batches Evolved Sampling consumes."""

from __future__ import annotations

import logging
import multiprocessing
import operator
import os
import warnings
from collections import Counter
from collections.abc import Mapping
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from ._check import int_at_least
from .corpus import Corpus
from .shard_paths import is_local_url
from .agreement import check_ranks_agree, dataset_fields, in_multi_rank_run
from .distributed import rank_and_world_size, ranks_per_node, worker_and_count
from .errors import SampleError, ShardError
from .manifest import SUCCESS, EpochKeep, epoch_dir, read_epoch
from .mds_index import check_safe_columns
from .metabatch import MetaBatch
from .plan import EpochPlan, worker_resume
from .remote.store import StoreEnvironment, obstore_used_here, reads_by_range
from .sources import ShardReader, open_reader
# the decoding helpers lived here; kept importable from here
from .decode import collate_samples, resolve_decode, webdataset_decode  # noqa: F401

log = logging.getLogger(__name__)


class ESDataset(IterableDataset):
    """Meta-batches of ``meta_batch_size`` samples with stable ids, for one epoch at a time.

    Every sample of the corpus appears exactly once per epoch over all ranks and DataLoader
    workers; all ranks yield the same number of meta-batches (see :mod:`es_stream.plan` for the
    shuffle and how ranks are equalised). The order is a pure function of
    ``(seed, epoch, world size, rank, workers)``; call :meth:`set_epoch` before each epoch, as
    with ``DistributedSampler`` — the epoch lives in shared memory, so persistent workers see it.

    **Mid-epoch resume** (like mosaicml-streaming's ``state_dict(num_samples)``): the trainer
    checkpoints ``state_dict()``, the place after the meta-batches of the current epoch
    :func:`es_stream.loader` handed out (or ``state_at(k)`` when it counts them itself; equal
    on every rank in lockstep DDP, so rank 0's state serves all ranks), and after a restart calls
    :meth:`load_state_dict` on a dataset built with the same corpus and arguments. The next
    iteration of that epoch yields exactly what the uninterrupted one yielded after its first k
    meta-batches, same order, ids and data; the k are neither read nor decoded. It needs the same
    number of DataLoader workers (checked in the workers; see :func:`es_stream.plan.worker_resume`).
    A meta-batch whose samples were all lost under ``on_error="skip"`` is still yielded (empty),
    so the count never shifts.

    Args:
        corpus: an indexed :class:`Corpus`.
        meta_batch_size: B, samples per meta-batch.
        decode: how to decode a sample. A function ``sample dict -> decoded sample``; or, as
            with webdataset's ``.decode(...)``, an image spec string (``"pil"``, ``"rgb"``,
            ``"rgb8"``, ``"torchrgb"``, ``"l"``, ... — webdataset's ``imagespecs``) or a list of
            such strings and webdataset handlers ``(key, data) -> value``, which build
            ``webdataset.autodecode.Decoder([imagehandler(spec), ...])`` with webdataset's
            default handlers after them, exactly as ``wds.WebDataset(url).decode("pil")``
            decodes. Default: webdataset's default decoder for tar shards, the identity for MDS
            (whose columns ``MDSWriter`` already typed; with a shorthand, only MDS ``bytes``
            columns named like a file suffix, e.g. ``jpg``, are decoded). An unknown spec is a
            ``ValueError`` listing the valid ones, anything else not callable a ``TypeError``,
            both raised here, not at the first sample.
        collate: list of decoded samples -> batch; default ``torch.utils.data.default_collate``
            (PIL images, which it cannot stack, are kept as lists, as webdataset does).
            With the default, dict samples of one meta-batch must all have the same fields (as
            webdataset's collation requires): a sample whose fields differ from those most of
            its meta-batch has is a :class:`~es_stream.errors.SampleError` naming it, its shard
            and the fields, never a bare ``KeyError`` or a field dropped in silence. A custom
            ``collate`` gets the samples as they are.
        shuffle: shuffle shard order and, for seekable shards, samples within blocks.
        seed: shuffle seed.
        drop_last: give every rank only full meta-batches; left-out samples are counted in
            :attr:`dropped_per_epoch`.
        on_error: ``"raise"`` (default): the first bad sample or shard raises a
            :class:`~es_stream.ShardError` naming it (caught as that type also through
            DataLoader workers). ``"skip"``: a bad *sample* (a decode error, differing fields,
            a corrupt header or short read of one sample of a tar read by offset — a
            :class:`~es_stream.errors.SampleError`) is skipped alone; a *shard* that cannot be
            read any further (file missing or unopenable, a ``pipe:``/URL stream that failed
            or ended early, an MDS shard that cannot be fetched or whose offset table is
            corrupt) is skipped for the rest of the epoch in that worker. Each skip warns once
            (``RuntimeWarning`` naming the shard and sample id; in a worker process it goes to
            that worker's stderr). Every lost id is reported exactly once, in ``lost_ids`` of
            the meta-batch it was meant for; a meta-batch whose samples were all lost is still
            yielded, with ``len(mb) == 0`` and ``data=None``, so all ranks keep the same number
            of meta-batches: skip it in the loop (in DDP, on every rank together, e.g. after an
            all-reduce of ``len(mb)``; selectors refuse a meta-batch shorter than b).
            :attr:`samples_lost` counts losses in this process only; through DataLoader
            workers, the total is the sum of ``len(mb.lost_ids)``.
        block_size: positions per shuffle block (see :mod:`es_stream.plan`).
        manifests: a pruning manifest directory (written by :class:`es_stream.Pruner` or
            ``es-stream prune``). Epoch e reads ``manifests/epoch=e`` when it starts; pruned
            samples are left out of the plan, so they are never read nor decoded (streamed
            ``pipe:`` shards still pass their bytes by, undecoded). An epoch with no directory
            keeps everything (logged once). Loss weights from the manifest (InfoBatch) arrive
            as ``MetaBatch.weights``, a float32 tensor in every epoch (ones where nothing is
            rescaled), so ``(losses * mb.weights).mean()`` needs no case for unpruned epochs.
        rank, world_size: override what is read from ``torch.distributed`` or the environment
            (``RANK``/``WORLD_SIZE``) when the dataset is created.
        allow_unsafe_types: load pickles, which run code their author chose: tar members
            ``.pyd``/``.pickle``/``.pkl`` (and ``.pth`` beyond tensors) with the default decoding,
            MDS ``pkl`` columns. Off by default, as in streaming's ``StreamingDataset``: such a
            member is a :class:`~es_stream.errors.SampleError` naming the opt-in, an MDS corpus
            with a ``pkl`` column a ``ValueError`` here. Turn it on only for data you trust.
    """

    def __init__(self, corpus: Corpus, meta_batch_size: int,
                 decode: Callable[[dict], Any] | str | list | tuple | None = None,
                 collate: Callable[[list], Any] | None = None, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, on_error: str = "raise", *, block_size: int = 1 << 18,
                 manifests: str | os.PathLike | None = None, rank: int | None = None,
                 world_size: int | None = None, allow_unsafe_types: bool = False) -> None:
        super().__init__()
        if not isinstance(corpus, Corpus):
            raise TypeError(f"corpus must be an es_stream.Corpus, got {type(corpus).__name__}")
        meta_batch_size = int_at_least(meta_batch_size, 1, "meta_batch_size")
        seed = int_at_least(seed, 0, "seed")
        block_size = int_at_least(block_size, 1, "block_size")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        detected_rank, detected_world = rank_and_world_size()
        self.rank = detected_rank if rank is None else rank
        self.world_size = detected_world if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world_size {self.world_size}")
        corpus.check_fresh()
        if corpus.mds is not None:
            check_safe_columns(corpus.mds.index, corpus.mds.local, allow_unsafe_types,
                               "ESDataset(..., allow_unsafe_types=True)")
        self.allow_unsafe_types = allow_unsafe_types
        self.corpus = corpus
        self.meta_batch_size = meta_batch_size
        self.decode = resolve_decode(decode, corpus.format, allow_unsafe_types)
        if collate is not None and not callable(collate):
            raise TypeError(f"collate must be a function list of samples -> batch, got "
                            f"{type(collate).__name__} {collate!r:.60}")
        self.collate = collate if collate is not None else collate_samples
        self.shuffle, self.seed, self.drop_last, self.on_error = shuffle, seed, drop_last, on_error
        self.block_size = block_size
        # object-store shards are read by byte range (es_stream.remote), so they seek too
        self.seekable = corpus.format == "mds" or all(
            is_local_url(s.name) or reads_by_range(s.name) for s in corpus.shards)
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        # resume point [epoch (-1: none), meta-batches consumed, workers they came from], and the
        # worker count of the last iteration started (0: none yet); shared like the epoch
        self._resume = torch.tensor([-1, 0, 0], dtype=torch.int64).share_memory_()
        self._loader_workers = torch.zeros((), dtype=torch.int64).share_memory_()
        # the epoch an iteration last started in, in any process (-1: none), shared
        self._started_epoch = torch.full((), -1, dtype=torch.int64).share_memory_()
        # the count of whoever hands this dataset's meta-batches to the loop in this process
        # (es_stream.loader's, an iteration here, a loaded state): what state_dict() reports
        self._progress: BatchCount | None = None
        self.samples_lost = 0
        self.manifests = None if manifests is None else os.fspath(manifests)
        self._keep_cache: tuple[tuple[int, int], EpochKeep | None] | None = None
        self._logged_unpruned: set[int] = set()
        self.plan(0)  # validate the partition now, not in a worker

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next iteration yields. An epoch other than a loaded resume point's
        clears that point: it applies to the resumed epoch only.

        Under an initialised ``torch.distributed`` process group of several ranks this is a
        collective (every rank calls it for the same epoch, as a training loop does): the ranks
        compare :func:`es_stream.agreement.dataset_fields` (corpus and its shards, seed,
        meta-batch size, world size, shuffle, drop_last, epoch, the manifests' run) and a
        difference raises :class:`es_stream.RankMismatchError` on every rank, naming the field
        and each rank's value, instead of duplicating samples or hanging."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if epoch != int(self._resume[0]):
            self._resume.copy_(torch.tensor([-1, 0, 0]))
        self._epoch.fill_(epoch)
        if in_multi_rank_run():
            # ranks that disagree would duplicate or drop samples, or hang at a collective
            check_ranks_agree(dataset_fields(self, epoch), where=f"at the start of epoch {epoch}")

    def resume_fields(self) -> dict[str, tuple[Any, str]]:
        """State fields an exact resume needs unchanged (name -> (value, what to do when it
        differs)); a mix of datasets compares each of theirs."""
        rebuild = "build the ESDataset with {}={!r}, as when the state was taken"
        return {
            "corpus_fingerprint": (self.corpus.fingerprint, "the shards changed; resume only over "
                                   "the corpus the state was taken on ({}={!r})"),
            "world_size": (self.world_size, "exact resume needs the same ranks: run with {}={!r}"),
            "seed": (self.seed, rebuild), "meta_batch_size": (self.meta_batch_size, rebuild),
            "shuffle": (self.shuffle, rebuild), "drop_last": (self.drop_last, rebuild),
            "block_size": (self.block_size, rebuild)}

    def consumed(self) -> int:
        """Meta-batches of the current epoch consumed so far, counted from the epoch's start
        (those consumed before a resume included), as :func:`es_stream.loader` (or an iteration
        in this process) yielded them; 0 before the epoch's iteration starts.

        Raises ``ValueError`` when an iteration of this epoch ran in DataLoader workers that
        :func:`es_stream.loader` did not make: this process never saw what they yielded."""
        epoch = self.epoch
        if self._progress is not None and self._progress.epoch == epoch:
            return self._progress.batches
        if int(self._started_epoch) == epoch:
            raise ValueError(f"epoch {epoch} is being iterated by a DataLoader that does not count "
                             "the meta-batches it yields: iterate through es_stream.loader(dataset), "
                             "or take state_at(num_batches) yourself")
        return self.resume_batches(epoch)

    def track(self, count: "BatchCount") -> None:
        """Report ``count`` as this dataset's place from now on: what hands the meta-batches to
        the loop (:func:`es_stream.loader`'s loader) owns the count and calls this."""
        self._progress = count

    def resume_batches(self, epoch: int) -> int:
        """Meta-batches of ``epoch`` a new iteration starts after (the loaded resume point's;
        0 when none applies)."""
        resume_epoch, resume_batches, _ = self._resume.tolist()
        return resume_batches if resume_epoch == epoch else 0

    def state_dict(self, *deprecated_args: Any, **deprecated: Any) -> dict[str, Any]:
        """Where this rank stands: the meta-batches of the current epoch handed to the loop so
        far (:meth:`consumed`, as :func:`es_stream.loader` counted them; torchdata's protocol:
        the state is that of the last meta-batch handed to the loop). See :meth:`state_at`.

        ``state_dict(num_batches)`` (deprecated) is :meth:`state_at`."""
        if deprecated_args or deprecated:
            num_batches = (deprecated_args + tuple(deprecated.values()))[0]
            if len(deprecated_args) + len(deprecated) > 1 or set(deprecated) - {"num_batches"}:
                raise TypeError("ESDataset.state_dict() takes no arguments (num_batches, "
                                "deprecated, at most)")
            warnings.warn("ESDataset.state_dict(num_batches) is deprecated: use "
                          "state_at(num_batches), or state_dict() with es_stream.loader counting",
                          DeprecationWarning, stacklevel=2)
            if num_batches is not None:
                return self.state_at(num_batches)
        return self.state_at(self.consumed())

    def state_at(self, num_batches: int) -> dict[str, Any]:
        """The state after ``num_batches`` meta-batches of the current epoch consumed, counted
        from the epoch's start (those consumed before a resume included), for a loop that counts
        them itself.

        Works before any iteration (``num_batches=0``) and at the epoch's end
        (``num_batches == len(self)``: the resumed epoch yields nothing, and the trainer goes on
        with ``set_epoch(epoch + 1)``). ``num_workers`` is the worker count of the last loader
        that iterated this dataset (1 also stands for main-process iteration).
        """
        total = len(self)
        num_batches = operator.index(num_batches)
        if not 0 <= num_batches <= total:
            raise ValueError(f"num_batches={num_batches} is outside [0, {total}]: pass the meta-batches "
                             f"of the current epoch ({self.epoch}) consumed so far")
        workers = int(self._loader_workers)
        if num_batches and not workers:
            raise ValueError(f"state_dict(num_batches={num_batches}): this dataset was never iterated "
                             "nor loaded from a state, so which DataLoader workers yielded those "
                             "meta-batches is unknown; take the state from the dataset you iterate")
        state = {name: mine for name, (mine, _) in self.resume_fields().items()}
        return {"epoch": self.epoch, "batches": num_batches, "epoch_batches": total,
                "num_workers": workers, **state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`: set its epoch and a resume point in shared memory, so
        workers already started see it too. The next iteration of that epoch (each one, until
        :meth:`set_epoch` selects another epoch) skips the consumed meta-batches in each worker.
        Raises ``ValueError`` naming the field when the state does not fit this dataset."""
        fields = self.resume_fields()
        missing = sorted({"epoch", "batches", "epoch_batches", "num_workers", *fields} - set(state))
        if missing:
            raise ValueError(f"not an ESDataset state: missing {missing}; pass what "
                             "ESDataset.state_dict returned")
        for name, (mine, fix) in fields.items():
            if state[name] != mine:
                raise ValueError(f"cannot resume: the state has {name}={state[name]!r}, this dataset "
                                 f"{name}={mine!r}; " + fix.format(name, state[name]))
        restore_position(self, state)

    def _worker_run(self, epoch: int, num_batches: int, worker: int, num_workers: int) -> tuple[int, int]:
        """(run, skip) this worker reads: its own run from the start unless resuming ``epoch``."""
        return worker_run(self._resume, epoch, num_batches, worker, num_workers)

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
        epoch, plan, num_workers, run, skip = begin_iteration(self)
        batches = plan.worker_batches(num_workers, run, skip)
        keep = self.epoch_keep(epoch)
        reader = open_reader(self.corpus, allow_unsafe_types=self.allow_unsafe_types)
        reader.will_read(batches, lambda: plan.node_ids(ranks_per_node(self.world_size)))
        failed_shards: set[int] = set()  # shards this worker can no longer read, this epoch
        # iterated in this process: it hands the meta-batches out, so it counts them
        count = BatchCount(epoch, self.resume_batches(epoch))
        if get_worker_info() is None:
            self.track(count)
        try:
            for ids in batches:
                mb = self.read_meta_batch(reader, ids, epoch, keep, failed_shards)
                count.batches += 1
                yield mb
        finally:
            reader.close()

    def read_meta_batch(self, reader: ShardReader, ids: np.ndarray, epoch: int,
                        keep: EpochKeep | None, failed_shards: set[int]) -> MetaBatch:
        """Read (with ``reader``, from :func:`~es_stream.sources.open_reader`), decode and collate
        the samples ``ids`` of ``epoch`` with this dataset's settings; ``keep`` is
        :meth:`epoch_keep`, ``failed_shards`` the shards this worker stopped reading this epoch
        (updated). Every id ends up either in ``ids`` or, under ``on_error="skip"``, in
        ``lost_ids`` of this very meta-batch — which is yielded even when all of its samples
        were lost, so every rank keeps the same count. What :class:`~es_stream.MixedDataset`
        reads each corpus's meta-batches with."""
        samples, kept, kept_shards, lost = self._read_samples(reader, ids, epoch, failed_shards)
        if self.collate is collate_samples or self.collate is default_collate:
            for i in reversed(self._mismatched_fields(samples, kept, kept_shards, epoch)):
                lost.append(kept.pop(i))
                del samples[i], kept_shards[i]
        self.samples_lost += len(lost)
        kept_ids = np.asarray(kept, dtype=np.int64)
        weights = None if keep is None or keep.weights is None else torch.from_numpy(
            keep.weights[np.searchsorted(keep.kept_ids, kept_ids)].astype(np.float32, copy=False))
        return MetaBatch(ids=torch.from_numpy(kept_ids),
                         data=self.collate(samples) if samples else None, epoch=epoch,
                         lost_ids=torch.tensor(lost, dtype=torch.int64), weights=weights)

    def _read_samples(self, reader: ShardReader, ids: np.ndarray, epoch: int, failed_shards: set[int]
                      ) -> tuple[list, list[int], list[int], list[int]]:
        """(decoded samples, their ids, their shards, lost ids) of one meta-batch."""
        shards, positions = self.corpus.locate(ids)
        samples: list = []
        kept: list[int] = []
        kept_shards: list[int] = []
        lost: list[int] = []
        # a reader that reads a meta-batch at once (local tar shards) returns each sample or the
        # error reading it would raise; the loop below still applies them in the meta-batch's
        # order, so on_error behaves exactly as when samples are read one by one
        early = reader.read_batch(ids, shards, failed_shards)
        for sid, shard, pos, sample in zip(ids.tolist(), shards.tolist(), positions.tolist(),
                                           early):
            if shard in failed_shards:
                lost.append(sid)
                continue
            try:
                if sample is None:
                    sample = reader.read(shard, pos, sid)
                elif isinstance(sample, ShardError):
                    raise sample
                samples.append(sample if self.decode is None else self._decode(sample, shard, sid))
            except ShardError as exc:
                self._skip(exc, epoch, shard, sid, failed_shards)
                lost.append(sid)
                continue
            kept.append(sid)
            kept_shards.append(shard)
        return samples, kept, kept_shards, lost

    def _skip(self, exc: ShardError, epoch: int, shard: int, sample_id: int,
              failed_shards: set[int]) -> None:
        """Re-raise ``exc`` (``on_error="raise"``), or warn and note what it loses: just the
        sample for a :class:`SampleError`, the rest of the shard in this worker otherwise."""
        if self.on_error == "raise":
            raise exc
        if isinstance(exc, SampleError):
            warnings.warn(f"epoch {epoch}: skipping sample id {sample_id}: {exc}", RuntimeWarning,
                          stacklevel=3)
            return
        failed_shards.add(shard)
        warnings.warn(f"epoch {epoch}: skipping the rest of shard {self.corpus.shards[shard].name} "
                      f"in this worker from sample id {sample_id} on (the lost ids arrive in "
                      f"MetaBatch.lost_ids): {exc}", RuntimeWarning, stacklevel=3)

    def _mismatched_fields(self, samples: list, kept: list[int], kept_shards: list[int],
                           epoch: int) -> list[int]:
        """Positions of the dict samples whose fields differ from the meta-batch's.

        ``default_collate`` takes the first sample's keys: a field the first sample lacks would
        vanish from the whole meta-batch, one a later sample lacks would be a bare KeyError.
        Like webdataset's own collation, every sample must have the same fields; the reference
        is the field set most samples have (the earliest one on a tie). Raises a
        :class:`SampleError` naming the first odd sample under ``on_error="raise"``.
        """
        if len(samples) < 2 or not all(isinstance(s, Mapping) for s in samples):
            return []
        fields = [frozenset(s) for s in samples]
        if fields.count(fields[0]) == len(fields):  # the usual case, one pass
            return []
        common, how_many = Counter(fields).most_common(1)[0]
        odd = [i for i, f in enumerate(fields) if f != common]
        for i in odd:
            key = samples[i].get("__key__")
            where = "" if key is None else f" (key {key!r})"
            missing = sorted(map(str, common - fields[i]))
            extra = sorted(map(str, fields[i] - common))
            exc = SampleError(
                self.corpus.shards[kept_shards[i]].name,
                f"sample{where} has fields {sorted(map(str, fields[i]))} but {how_many} of the "
                f"{len(samples)} samples of its meta-batch have {sorted(map(str, common))}"
                f"{f'; missing {missing}' if missing else ''}{f'; extra {extra}' if extra else ''}"
                ": give every sample the same fields, or pass a collate= that handles optional "
                "ones", sample=kept[i])
            self._skip(exc, epoch, kept_shards[i], kept[i], set())
        return odd

    def _decode(self, sample: dict, shard: int, sample_id: int) -> Any:
        try:
            return self.decode(sample)
        except Exception as exc:
            raise SampleError(self.corpus.shards[shard].name, f"cannot decode sample "
                              f"({_describe(exc)}); re-write the sample, or pass a decode= that "
                              "handles it", sample=sample_id) from exc


def _describe(exc: BaseException) -> str:
    """``Type: message``, the field and the cause too: webdataset's ``DecodingError`` has an
    empty message and keeps the field (``k``) and the real error (``__cause__``) aside."""
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    field = getattr(exc, "k", None)
    if isinstance(field, str):
        text += f" in field {field!r}"
    if exc.__cause__ is not None:
        text += f", caused by {_describe(exc.__cause__)}"
    return text


class BatchCount:
    """Meta-batches of ``epoch`` handed to the training loop, counted from the epoch's start
    (those consumed before a resume included). What hands them out owns it and counts in it
    (the loader of :func:`loader`, or an :class:`ESDataset` iterated in this process); the
    dataset reports it as its place (:meth:`ESDataset.track`)."""

    __slots__ = ("epoch", "batches")

    def __init__(self, epoch: int, batches: int) -> None:
        self.epoch, self.batches = epoch, batches

    def __repr__(self) -> str:
        return f"BatchCount(epoch={self.epoch}, batches={self.batches})"


def begin_iteration(dataset: Any) -> tuple[int, EpochPlan, int, int, int]:
    """Start iterating ``dataset``'s current epoch in this process (a DataLoader worker or the
    main one): ``(epoch, plan, num_workers, run, skip)``, the run of meta-batches this worker
    reads and how many of them a resume skips; records the worker count and the started epoch."""
    epoch = dataset.epoch
    worker, num_workers = worker_and_count()
    plan = dataset.plan(epoch)
    run, skip = dataset._worker_run(epoch, plan.num_batches, worker, num_workers)
    dataset._loader_workers.fill_(num_workers)
    dataset._started_epoch.fill_(epoch)
    return epoch, plan, num_workers, run, skip

def _reads_remote(dataset: Any) -> bool:
    """Whether ``dataset`` (or any corpus of a mix) has shards read by byte range."""
    parts = getattr(dataset, "datasets", None) or [dataset]
    return any(d.corpus.remote_objects() for d in parts)


def restore_position(dataset: Any, state: dict[str, Any]) -> None:
    """Put ``dataset`` (an :class:`ESDataset` or a dataset of the same progress protocol, as
    :class:`es_stream.mixing.MixedDataset`) at the place ``state`` records: its epoch, the
    meta-batches consumed in it and the worker count they were read with. Raises ``ValueError``
    when the epoch no longer has the meta-batches it had (a rewritten pruning manifest)."""
    epoch, batches, workers = int(state["epoch"]), int(state["batches"]), int(state["num_workers"])
    total = dataset.plan(epoch).num_batches
    if state["epoch_batches"] != total or not 0 <= batches <= total:
        raise ValueError(f"cannot resume: epoch {epoch} had {state['epoch_batches']} meta-batches "
                         f"when the state was taken (batches={batches}) and has {total} now; "
                         "was its pruning manifest rewritten?")
    dataset.set_epoch(epoch)
    dataset._resume.copy_(torch.tensor([epoch, batches, max(workers, 1)]))
    dataset._progress = BatchCount(epoch, batches)
    if batches:
        dataset._loader_workers.fill_(max(workers, 1))


def worker_run(resume: torch.Tensor, epoch: int, num_batches: int, worker: int,
               num_workers: int) -> tuple[int, int]:
    """(run, skip) a DataLoader worker reads of ``epoch``: its own run from the start, unless
    ``resume`` (``[epoch, consumed, taken_with_workers]``) resumes this epoch."""
    resume_epoch, consumed, taken_with = resume.tolist()
    if resume_epoch != epoch or consumed == 0:
        return worker, 0
    if taken_with != num_workers:
        raise ValueError(f"cannot resume epoch {epoch}: the state was taken with num_workers="
                         f"{taken_with if taken_with > 1 else '0 or 1'} and this DataLoader has "
                         f"num_workers={num_workers if num_workers > 1 else '0 or 1'}; resume with "
                         "the same number of workers (the meta-batch order depends on it)")
    return worker_resume(num_batches, num_workers, consumed, worker)



def _counted_dataset(dataset: Any) -> bool:
    """A dataset whose meta-batches the loader counts: an ESDataset, or one that speaks its
    progress protocol (``track``, ``resume_batches``, ``epoch``, ``seed``, ``rank``), as
    :class:`es_stream.mixing.MixedDataset` does by setting ``loader_counts = True``."""
    return isinstance(dataset, ESDataset) or getattr(type(dataset), "loader_counts", False)


class _CountingLoader(DataLoader):
    """A DataLoader that counts, in the training process, the meta-batches it hands out of an
    :class:`ESDataset` iterated in workers (torchdata's ``Loader`` does the same), in its own
    :attr:`count`, which the dataset reports as its place (``dataset.state_dict()``)."""

    count: BatchCount | None = None

    def __iter__(self) -> Iterator[Any]:
        iterator = super().__iter__()
        dataset = self.dataset
        if not _counted_dataset(dataset) or self.num_workers == 0:
            return iterator  # counted by the dataset's own iteration, in this process
        epoch = dataset.epoch
        self.count = BatchCount(epoch, dataset.resume_batches(epoch))
        dataset.track(self.count)  # now: the workers may start before the first next()
        return _counted(iterator, self.count)


def _counted(iterator: Iterator[Any], count: BatchCount) -> Iterator[Any]:
    for mb in iterator:
        count.batches += 1
        yield mb


def loader(dataset: ESDataset, num_workers: int = 2, **kwargs: Any) -> DataLoader:
    """A ``DataLoader`` over meta-batches: ``batch_size=None`` (the dataset batches), persistent
    workers when ``num_workers > 0``, ``pin_memory`` when CUDA is available. Any keyword
    overrides these defaults. It counts the meta-batches it yields of the current epoch, which
    ``dataset.state_dict()`` (and :class:`es_stream.TrainingState`) report as consumed.

    The workers' base seed is drawn from a generator of the loader's own, seeded from the
    dataset's ``seed``, rank and current epoch (``generator=`` overrides it), not from torch's global
    generator: starting an iteration then draws nothing from the global generator, so a run
    resumed with its random state (:class:`es_stream.TrainingState`) makes the same dropout
    draws as one that never stopped."""
    options: dict[str, Any] = {
        "batch_size": None,
        "num_workers": num_workers,
        "persistent_workers": num_workers > 0,
        "pin_memory": torch.cuda.is_available(),
    }
    if _counted_dataset(dataset):
        # the epoch too: a loader made anew each epoch must not repeat its workers' random draws
        seed = np.random.SeedSequence([dataset.seed, dataset.rank, dataset.epoch]).generate_state(
            1, np.uint64)[0]
        options["generator"] = torch.Generator().manual_seed(int(seed))
    if num_workers > 0 and obstore_used_here() and _reads_remote(dataset):
        # obstore's runtime hangs in a forked child that uses it once it started here; a
        # dataset of local shards never uses it in its workers, so it keeps fork (and its
        # unpicklable decode functions)
        options["multiprocessing_context"] = "forkserver"
        options["worker_init_fn"] = StoreEnvironment(kwargs.pop("worker_init_fn", None))
        # the server imports es_stream (and torch) once; without it each worker imports them
        # anew, seconds per worker on a busy machine (no effect once the server runs)
        multiprocessing.set_forkserver_preload(["es_stream"])
    options.update(kwargs)
    return _CountingLoader(dataset, **options)
