"""InfoBatch-style pruning for MosaicML Composer: ``Trainer(algorithms=[InfoBatch(ratio=0.5)])``.

es-stream's measured default (see the README): train on every sample the DataLoader yields,
record each sample's training loss as its score (no extra forward), and at each epoch end let
:class:`es_stream.Pruner` with :class:`es_stream.InfoBatchPolicy` write the next epoch's
manifests: part of the below-mean-loss samples are pruned (an
:class:`~es_stream.integrations.streaming_dataset.ESStreamingDataset` never reads them next
epoch) and the kept low-loss ones get loss weight ``1 / (1 - ratio)``, which :class:`InfoBatch`
applies to ``state.loss``.

Needs ``pip install 'es-stream[composer]'`` (mosaicml >= 0.32).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from composer.core import Algorithm, Event, State
from composer.core.precision import get_precision_context
from composer.loggers import Logger

from ...corpus import Corpus
from ...manifest import read_epoch
from ...policy import InfoBatchPolicy
from ...pruner import Pruner
from ...store import ScoreStore
from ..batch import IdKey, batch_size_of, default_id_key, split_ids
from .common import (LossFn, ScoreCheckpoint, agreed_manifests, check_dataset_ranks,
                     per_sample_losses,
                     refresh_dataloader_len, train_dataset, unwrap_model)
from .evolved_sampling import EvolvedSampling

__all__ = ["InfoBatch"]

_WHO = "InfoBatch"


class InfoBatch(Algorithm):
    """InfoBatch-style pruning (Qin et al., ICLR 2024) as a Composer algorithm.

    Every sample the DataLoader yields is trained on; its per-sample training loss becomes its
    score (the forward Composer runs anyway: no extra one); at each epoch end
    ``Pruner(corpus, store, InfoBatchPolicy(ratio, anneal, seed), manifests)`` decides the next
    epoch. The training dataset must be an
    :class:`~es_stream.integrations.streaming_dataset.ESStreamingDataset` reading the same ``manifests`` directory (or pass ``corpus=`` for another dataset that reads
    them), and ``max_duration`` must be in epochs.

    What happens, per Composer event:

    * ``INIT``: the algorithm moves itself to the end of ``state.algorithms``, so that (Composer
      runs ``AFTER_*`` events in reverse list order) it is the first on ``AFTER_DATALOADER`` and
      sees the batch as loaded. It refuses to share a Trainer with :class:`EvolvedSampling`: both
      take the ids out of the batch and both own a score store of the same corpus.
    * ``FIT_START``: opens the score store, builds the :class:`es_stream.Pruner` (epoch
      ``max_duration``, passed to it as the run's length, so a schedule that prunes no epoch of
      the run warns here; the manifest directory the dataset reads), applies a restored
      checkpoint, and makes Composer re-read ``len(dataloader)`` (a pruned epoch has fewer
      batches).
    * ``EPOCH_START``: reads the epoch's manifests in the main process
      (:func:`es_stream.manifest.read_epoch`) and keeps **only the ids whose weight is not 1**
      (sorted) with their weights: memory is bounded by the up-weighted samples (12 bytes
      each), not the corpus. An epoch without manifests (the first, the annealing tail) weights
      every sample 1. A run resumed mid-epoch (no ``EPOCH_START``) reads them on its first step.
    * ``AFTER_DATALOADER``: takes the ids out of the batch (kept in it when
      ``strip_ids=False``) and looks up each sample's weight on the host (``np.searchsorted``:
      the ids come from the DataLoader on the CPU). :attr:`last_ids` / :attr:`last_weights` hold
      them for the step.
    * ``AFTER_LOSS`` (once per microbatch): per-sample losses of the microbatch from
      ``loss_fn(outputs, batch)`` or the model's ``loss(outputs, batch, reduction="none")``,
      under the trainer's precision; ``state.loss`` becomes their weighted mean
      ``(losses * w).mean()`` (``w`` moved to the losses' device, never the other way), which
      Composer scales by the microbatch's share of the batch as usual; the detached losses are
      the samples' new scores (a GPU loss reaches a host store through a
      :class:`es_stream.FeedbackChannel`, without waiting for the device). Microbatches
      (``device_train_microbatch_size``) are mapped to the step's ids in order, as Composer's
      default ``split_batch`` makes them (contiguous); a microbatch that does not fit, or a step
      whose microbatches do not add up to the batch, raises (a custom ``split_batch`` that
      reorders samples cannot be mapped). An auto-microbatching retry starts the mapping again.
    * ``EPOCH_END``: ``Pruner.on_epoch_end`` (under several ranks the ranks merge their scores
      first) writes the next epoch's manifests; its summary goes to the loggers as
      ``es/prune/<key>`` and the epoch's own stats as ``es/samples_seen``, ``es/upweighted``
      (samples trained with weight != 1), ``es/weight_mean`` (mean weight applied) and
      ``es/loss_mean`` (mean unweighted training loss; one device sync per epoch).

    **Loss.** ``state.loss`` is replaced by a scalar, so Composer's logged ``loss/train/total``
    is the weighted loss. A model whose loss has several terms (a dict or tuple) must give
    their per-sample sum through ``loss_fn``. ``loss_fn(outputs, batch) -> Tensor[m]`` (``m``
    the microbatch size) runs with gradients (it is the loss that is back-propagated); for a
    causal language model pass ``loss_fn=causal_lm_sample_loss`` (each sample's mean token
    loss). The scores are the losses of the forward pass that trained on the sample, as in the
    InfoBatch paper (augmentations applied before ``BEFORE_LOSS`` are included).

    **Checkpoints.** ``state_dict`` holds the scores (see :class:`ScoreCheckpoint`:
    in the checkpoint as a tensor, or with ``store_path`` as the path of a snapshot written
    beside a memory-mapped store), the step count, the epoch's stats so far and the pruner's
    settings (a resume with another ratio, seed or corpus is refused). A run resumed from an
    epoch-end or mid-epoch checkpoint writes the manifests an uninterrupted run writes. Under
    several ranks Composer saves rank 0's state: exact only for a single rank.

    Args:
        ratio: fraction of the below-mean-loss samples dropped from each pruned epoch; the kept
            ones get weight ``1 / (1 - ratio)``. In [0, 1).
        anneal: trailing fraction of the epochs (rounded up) that train on everything.
        loss_fn: ``(outputs, batch) -> per-sample losses`` (see **Loss**).
        id_key: where each batch holds the sample ids: a dict key (default ``"es_id"``) or a
            tuple index (default ``-1``).
        strip_ids: remove the ids from the batch the model sees (default).
        num_samples: corpus size; default: from the corpus.
        corpus: the :class:`es_stream.Corpus` the ids index (default: the training
            ``ESStreamingDataset``'s).
        manifests: the manifest directory (default: the training dataset's; the two must agree).
        store_path: memory-map the scores in this ``.npy`` file (see **Checkpoints**).
        keep_snapshots: score snapshots kept beside ``store_path``.
        store_device: device of an in-memory store (e.g. ``"cuda"``: the scores stay on the GPU).
        seed: the policy's seed (which below-mean samples are dropped).
        overwrite: let this run replace manifests that another run (another corpus, ratio,
            anneal or seed) wrote in ``manifests``; default False refuses them at
            ``FIT_START`` with a :class:`es_stream.ManifestError` naming the directory (see
            :class:`es_stream.Pruner`). A resumed run is the same run and needs no overwrite.
    """

    def __init__(self, ratio: float = 0.5, anneal: float = 0.125, loss_fn: LossFn | None = None,
                 id_key: IdKey | None = None, strip_ids: bool = True,
                 num_samples: int | None = None, corpus: Corpus | None = None,
                 manifests: str | os.PathLike | None = None,
                 store_path: str | os.PathLike | None = None, keep_snapshots: int = 2,
                 store_device: torch.device | str | None = None, seed: int = 0,
                 overwrite: bool = False) -> None:
        for name, value in (("ratio", ratio), ("anneal", anneal)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"InfoBatch: {name} must be a number, got {type(value).__name__}")
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"InfoBatch: ratio must be in [0, 1) (the share of below-mean-loss "
                             f"samples dropped per epoch), got {ratio!r}")
        if not 0.0 <= anneal <= 1.0:
            raise ValueError(f"InfoBatch: anneal must be a fraction of the epochs in [0, 1], "
                             f"got {anneal!r}")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"InfoBatch: loss_fn must be a function (outputs, batch) -> per-sample "
                            f"losses, got {type(loss_fn).__name__}")
        if not isinstance(overwrite, bool):
            raise TypeError(f"InfoBatch: overwrite must be True or False, got {overwrite!r}")
        if corpus is not None and not isinstance(corpus, Corpus):
            raise TypeError(f"InfoBatch: corpus must be an es_stream.Corpus, got "
                            f"{type(corpus).__name__}")
        if num_samples is not None and (isinstance(num_samples, bool) or
                                        not isinstance(num_samples, (int, np.integer)) or
                                        num_samples < 1):
            raise ValueError(f"InfoBatch: num_samples must be a positive integer, got {num_samples!r}")
        self.policy = InfoBatchPolicy(ratio=float(ratio), anneal=float(anneal), seed=int(seed))
        self.ratio, self.anneal, self.seed = float(ratio), float(anneal), int(seed)
        self.scores = ScoreCheckpoint(store_path, keep_snapshots, store_device)
        self.loss_fn, self.id_key, self.strip_ids = loss_fn, id_key, strip_ids
        self.num_samples, self.corpus = num_samples, corpus
        self.manifests = None if manifests is None else os.fspath(manifests)
        self.overwrite = overwrite
        self.store: ScoreStore | None = None
        self.pruner: Pruner | None = None
        self.last_ids: torch.Tensor | None = None      # the step's ids (CPU int64)
        self.last_weights: torch.Tensor | None = None  # their loss weights (CPU float32)
        self.step = 0
        self._pending: dict[str, Any] | None = None
        self._weights_epoch: int | None = None
        self._up_ids = np.empty(0, np.int64)       # the epoch's ids with weight != 1, sorted
        self._up_weights = np.empty(0, np.float32)  # and their weights
        self._offset = 0  # rows of the step's ids the microbatches so far took
        self._reset_stats()

    def __repr__(self) -> str:
        return f"InfoBatch(ratio={self.ratio}, anneal={self.anneal}, seed={self.seed})"

    # ------------------------------------------------------------------ events
    def match(self, event: Event, state: State) -> bool:
        return event in (Event.INIT, Event.FIT_START, Event.EPOCH_START, Event.AFTER_DATALOADER,
                         Event.BEFORE_TRAIN_BATCH, Event.AFTER_LOSS, Event.AFTER_TRAIN_BATCH,
                         Event.EPOCH_END)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT:
            self._init(state)
        elif event == Event.FIT_START:
            self._setup(state)
            refresh_dataloader_len(state)
        elif event == Event.EPOCH_START:
            check_dataset_ranks(state)
            refresh_dataloader_len(state)
            self._load_weights(int(state.timestamp.epoch))
        elif event == Event.AFTER_DATALOADER:
            self._take_ids(state)
        elif event == Event.BEFORE_TRAIN_BATCH:
            self._offset = 0  # also where an auto-microbatching retry starts the batch again
        elif event == Event.AFTER_LOSS:
            self._weigh_loss(state)
        elif event == Event.AFTER_TRAIN_BATCH:
            self._end_step()
        elif event == Event.EPOCH_END:
            self._end_epoch(state, logger)

    def _init(self, state: State) -> None:
        others = [type(a).__name__ for a in state.algorithms
                  if a is not self and isinstance(a, (EvolvedSampling, InfoBatch))]
        if others:
            raise ValueError(f"InfoBatch cannot share a Trainer with {', '.join(others)}: each "
                             "takes the sample ids out of the batch and keeps its own scores of "
                             "the corpus; train with one of them")
        # Composer's set_filo_order pass reverses the list on AFTER_* events: last in the list
        # is first on AFTER_DATALOADER, where the ids must leave the batch as loaded.
        state.algorithms = [a for a in state.algorithms if a is not self] + [self]

    # ------------------------------------------------------------------ setup
    def _setup(self, state: State) -> None:
        dataset = train_dataset(state)
        corpus = self.corpus if self.corpus is not None else getattr(dataset, "corpus", None)
        manifests = agreed_manifests(state, dataset, corpus, self.manifests, "InfoBatch")
        n = self.num_samples if self.num_samples is not None else corpus.num_samples
        if corpus.num_samples != n:
            raise ValueError(f"InfoBatch: num_samples={n} but the corpus has {corpus.num_samples} "
                             "samples")
        if self.store is None:
            self.store = self.scores.open_store(n)
        elif self.store.num_samples != n:
            raise ValueError(f"InfoBatch was set up for {self.store.num_samples} samples, this "
                             f"fit's corpus has {n}; use a new InfoBatch per corpus")
        self.manifests, self.corpus = manifests, corpus
        # agreed_manifests checked that max_duration is in epochs: the run's length is known
        self.pruner = Pruner(corpus, self.store, self.policy, manifests,
                             overwrite=self.overwrite, epochs=int(state.max_duration.value))
        if hasattr(dataset, "weights_delivered"):
            dataset.weights_delivered = True  # silences its "weights not delivered" warning
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._load(pending)
        self._weights_epoch = None  # (re)read at the first step: a resume may land mid-epoch

    def _load_weights(self, epoch: int) -> None:
        """The epoch's up-weighted ids (sorted) and weights, from its manifests."""
        keep = read_epoch(self.manifests, epoch, self.corpus.fingerprint, self.corpus.shard_counts)
        if keep is None or keep.weights is None:
            self._up_ids, self._up_weights = np.empty(0, np.int64), np.empty(0, np.float32)
        else:
            differ = keep.weights != 1
            self._up_ids = np.ascontiguousarray(keep.kept_ids[differ], dtype=np.int64)
            self._up_weights = np.ascontiguousarray(keep.weights[differ], dtype=np.float32)
        self._weights_epoch = epoch

    # -------------------------------------------------------------- each step
    def _take_ids(self, state: State) -> None:
        if self.store is None:
            raise RuntimeError("InfoBatch was not set up: FIT_START did not run")
        epoch = int(state.timestamp.epoch)
        if self._weights_epoch != epoch:
            self._load_weights(epoch)
        id_key = self.id_key if self.id_key is not None else default_id_key(state.batch)
        ids, rest = split_ids(state.batch, id_key)
        self.store.check_ids(ids)
        if self.strip_ids:
            state.batch = rest
        self.last_ids, self.last_weights = ids, torch.from_numpy(self._lookup(ids.numpy()))
        self._offset = 0

    def _lookup(self, ids: np.ndarray) -> np.ndarray:
        weights = np.ones(len(ids), np.float32)
        if len(self._up_ids):
            pos = np.searchsorted(self._up_ids, ids).clip(max=len(self._up_ids) - 1)
            hit = self._up_ids[pos] == ids
            weights[hit] = self._up_weights[pos[hit]]
        return weights

    def _weigh_loss(self, state: State) -> None:
        if self.last_ids is None:
            raise RuntimeError("InfoBatch: AFTER_LOSS without a batch from AFTER_DATALOADER")
        model = unwrap_model(state)
        with get_precision_context(state.precision, state.precision_config):
            size = _microbatch_rows(state, self.last_ids, self._offset)
            losses = per_sample_losses(model, state.outputs, state.batch, size, self.loss_fn,
                                       _WHO, "microbatch")
        start = self._offset
        self._offset = stop = start + size
        w = self.last_weights[start:stop].to(losses.device, non_blocking=True)
        state.loss = (losses * w).mean()
        detached = losses.detach()
        self._record(self.last_ids[start:stop], detached)
        self._loss_sum = detached.sum() if self._loss_sum is None else self._loss_sum + detached.sum()

    def _record(self, ids: torch.Tensor, losses: torch.Tensor) -> None:
        """The losses become the samples' scores, without waiting for the device."""
        store = self.store
        if losses.device.type == "cpu" or store.device == losses.device \
                or store.device.type != "cpu":
            store.scatter(ids, losses, checked=True)
            return
        store.channel(losses.device).commit(ids, losses)

    def _end_step(self) -> None:
        if self.last_ids is None:
            return
        if self._offset != len(self.last_ids):
            raise RuntimeError(f"InfoBatch: the microbatches held {self._offset} samples, the "
                               f"batch {len(self.last_ids)}: each sample must reach AFTER_LOSS "
                               "once (Composer's default split_batch does this)")
        self.step += 1
        weights = self.last_weights.numpy()
        self._seen += len(weights)
        self._upweighted += int((weights != 1).sum())
        self._weight_sum += float(weights.astype(np.float64).sum())

    # ------------------------------------------------------------------ epochs
    def _reset_stats(self) -> None:
        self._seen, self._upweighted, self._weight_sum = 0, 0, 0.0
        self._loss_sum: torch.Tensor | None = None

    def stats(self) -> dict[str, float]:
        """This epoch's stats so far (see the class docs); one device sync."""
        seen = max(self._seen, 1)
        loss = float("nan") if self._loss_sum is None else float(self._loss_sum) / seen
        return {"samples_seen": float(self._seen), "upweighted": float(self._upweighted),
                "weight_mean": self._weight_sum / seen if self._seen else float("nan"),
                "loss_mean": loss if self._seen else float("nan")}

    def _end_epoch(self, state: State, logger: Logger) -> None:
        if self.pruner is None:
            return
        logger.log_metrics({f"es/{k}": v for k, v in self.stats().items()})
        self._reset_stats()
        finished = int(state.timestamp.epoch) - 1  # the timestamp has moved on already
        self.pruner.on_epoch_end(finished, int(state.max_duration.value))
        summary = self.pruner.last_summary  # rank 0's decision (the others do not write)
        if summary is not None and summary["epoch"] == finished + 1:
            logger.log_metrics({f"es/prune/{k}": float(v) for k, v in summary.items()})

    # -------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        """The scores (a tensor, or a snapshot path with ``store_path``), the step count, the
        epoch's stats so far and the pruner's settings."""
        state = super().state_dict()
        if self.store is None:  # saved before training started: carry a loaded state on
            state.update(self._pending or {})
            return state
        state["num_samples"] = self.store.num_samples
        state["step"] = self.step
        state["pruner"] = self.pruner.state_dict()
        loss_sum = None if self._loss_sum is None else float(self._loss_sum)
        state["epoch_stats"] = {"seen": self._seen, "upweighted": self._upweighted,
                                "weight_sum": self._weight_sum, "loss_sum": loss_sum}
        state.update(self.scores.save(self.store, self.step))
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a checkpoint's scores (applied at ``FIT_START`` when the store does not
        exist yet, as when Composer loads ``load_path`` in the Trainer)."""
        if "num_samples" not in state:
            return  # a checkpoint saved before the first fit
        if self.store is None:
            self._pending = dict(state)
        else:
            self._load(state)

    def _load(self, state: dict[str, Any]) -> None:
        if int(state["num_samples"]) != self.store.num_samples:
            raise ValueError(f"checkpoint of InfoBatch holds {state['num_samples']} scores, this "
                             f"corpus has {self.store.num_samples} samples: another corpus?")
        try:
            self.pruner.load_state_dict(state["pruner"])
        except ValueError as exc:
            raise ValueError(f"InfoBatch: {exc} (InfoBatch's ratio=, anneal=, seed= and the corpus "
                             "must be those of the run that wrote the checkpoint)") from exc
        self.step = int(state["step"])
        stats = state["epoch_stats"]
        self._seen, self._upweighted = int(stats["seen"]), int(stats["upweighted"])
        self._weight_sum = float(stats["weight_sum"])
        self._loss_sum = None if stats["loss_sum"] is None else torch.tensor(stats["loss_sum"])
        self.scores.restore(self.store, state)


def _microbatch_rows(state: State, ids: torch.Tensor, offset: int) -> int:
    """Samples in ``state.batch`` (the microbatch): the length of its first per-sample field."""
    size = batch_size_of(state.batch)
    if size is None:
        raise ValueError("InfoBatch: cannot tell the microbatch's size (it holds no tensor); "
                         "yield tensors, or train without device_train_microbatch_size")
    if offset + size > len(ids):
        raise RuntimeError(f"InfoBatch: this microbatch of {size} samples follows {offset} others, "
                           f"but the batch had {len(ids)}: Composer's microbatches must split "
                           "the batch in order (its default split_batch)")
    return size
