"""Evolved Sampling for MosaicML Composer: ``Trainer(algorithms=[EvolvedSampling(keep=0.25)])``.

From each batch the trainer's DataLoader yields (the *meta-batch*, B samples, each carrying its
es-stream sample id), :class:`EvolvedSampling` runs a no-grad forward, gives the per-sample
losses to :class:`es_stream.ESSelector` (the ES rule of Cheng et al. 2025), and replaces
``state.batch`` by the b samples selected, so only those are forwarded with gradients and
back-propagated. With a pruning policy it also writes, at each epoch end, the manifests that make
an :class:`~es_stream.integrations.streaming_dataset.ESStreamingDataset` skip pruned samples in
the next epoch (ESWP).

Needs ``pip install 'es-stream[composer]'`` (mosaicml >= 0.32).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
from composer.core import Algorithm, Event, State
from composer.core.precision import get_precision_context
from composer.loggers import Logger
from composer.utils import dist as composer_dist

from ..._check import int_at_least
from ...corpus import Corpus
from ...distributed import merge_rank_scores
from ...policy import InfoBatchPolicy, Policy
from ...pruner import Pruner
from ...reducible import ReducibleLossSelector
from ...selector import ESSelector
from ...store import ScoreStore
from ..batch import IdKey, default_id_key, split_ids, take_rows
from .common import (LossFn, ScoreCheckpoint, agreed_manifests, check_dataset_ranks,
                     per_sample_losses,
                     refresh_dataloader_len, train_dataset, unwrap_model)

log = logging.getLogger(__name__)

__all__ = ["EvolvedSampling", "run_evolved_sampling_first"]


class _DurationESSelector(ESSelector):
    """An :class:`ESSelector` whose burn-in and annealing follow Composer's elapsed duration
    (set before each step as :attr:`uniform_now`) instead of a step count, so they mean the
    same thing as Composer's own ``start``/``end`` fractions and survive resumes unchanged."""

    uniform_now = False

    def is_uniform_step(self, step: int | None = None) -> bool:
        return self.uniform_now


def run_evolved_sampling_first(algorithms: Sequence[Algorithm], event: Event) -> Sequence[Algorithm]:
    """A Composer algorithm pass that puts :class:`EvolvedSampling` first.

    Not needed with Composer's default passes (see :meth:`EvolvedSampling.apply`); add it last,
    ``Trainer(algorithm_passes=[run_evolved_sampling_first])``, when other passes of yours
    reorder algorithms.
    """
    del event
    return sorted(algorithms, key=lambda a: not isinstance(a, EvolvedSampling))



class EvolvedSampling(Algorithm):
    """Evolved Sampling (ES) and ES with pruning (ESWP) as a Composer algorithm.

    Give exactly one of ``batch_size`` (b, samples kept from each meta-batch) or ``keep``
    (b/B, like Composer's ``SelectiveBackprop``). The DataLoader's batch size is the meta-batch
    size B; every batch must carry the es-stream id of each sample (see ``id_key``).

    What happens, per Composer event:

    * ``INIT``: the algorithm moves itself to the end of ``state.algorithms``. Composer runs
      ``AFTER_*`` events in reverse list order (its FILO pass), so this makes ES the *first*
      algorithm on ``AFTER_DATALOADER``: it ranks the samples as the DataLoader delivered them,
      before any augmentation (with passes of your own, add :func:`run_evolved_sampling_first`).
    * ``FIT_START``: the selector (and its score store) is created for the corpus, and a
      restored checkpoint's state applied; with a ``policy`` the :class:`es_stream.Pruner` is
      built with the run's length (``max_duration`` in epochs), so a schedule that prunes no
      epoch of the run warns here.
    * ``AFTER_DATALOADER``: the ids are taken out of the batch (kept with it when
      ``strip_ids=False``), the batch is moved to the device, a forward runs under
      ``torch.no_grad()`` and the trainer's precision context, ``loss_fn`` gives one loss per
      sample, :meth:`ESSelector.select` picks b of the B samples, and ``state.batch`` becomes
      those b rows of every per-sample field (tuple and dict batches, nested ones too), in
      their original order. A meta-batch of at most b samples (an epoch's tail) is trained
      whole; its scores are still updated. :attr:`last_ids` holds the selected ids.
    * ``EPOCH_END``: the selector's stats for the epoch (:meth:`ESSelector.stats`: selected
      fraction, uniform steps, never-scored share, weight and score quantiles) go to Composer's
      loggers as ``es/<key>`` (and to the ``es_stream`` logger), then restart; with a
      ``policy``, :class:`es_stream.Pruner` writes the next epoch's manifests (ranks first merge
      their scores) and its summary goes to the loggers as ``es/prune/<key>`` (rank 0, which
      decides); without one, under several ranks, the ranks merge their scores
      (:func:`es_stream.merge_rank_scores`).
    * ``FIT_START`` / ``EPOCH_START``: with pruning on an ``ESStreamingDataset``, the trainer's
      ``dataloader_len`` is re-read from ``len(dataloader)``, i.e. from the epoch's kept count.

    The trainer counts samples before ``AFTER_DATALOADER`` runs, so ``state.timestamp.sample``
    and ``sample_in_epoch`` count every sample of the meta-batch as consumed (the ones not
    selected were read and forwarded): a resumed run's DataLoader continues after the last
    meta-batch, not after ``b / B`` of it.

    **Losses.** ``loss_fn(outputs, batch) -> Tensor[B]`` where ``outputs = model(batch)`` and
    ``batch`` is the meta-batch without its ids. The default calls the model's own
    ``loss(outputs, batch, reduction="none")``: for a classifier (e.g. Composer's
    ``ComposerClassifier`` with its default ``soft_cross_entropy``) that is each sample's cross
    entropy. A language model's loss is usually averaged over all tokens of the batch (Hugging
    Face models compute it inside ``forward``), so there pass
    ``loss_fn=causal_lm_sample_loss``: a sample's loss is then the mean of its tokens' losses
    (ignoring ``-100`` labels), so long and short samples are compared per token.

    **Checkpoints.** The algorithm's ``state_dict`` holds the selector's state (step,
    generator) and the scores, restored by Composer's ``load_path`` before training resumes,
    so a resumed run selects what an uninterrupted one would have. The scores are 4 bytes per
    sample. With ``store_path=None`` (default) they live in memory and travel *inside* the
    checkpoint as a tensor (40 MB at 1e7 samples). With ``store_path="scores.npy"`` the store is
    memory-mapped there (for corpora whose scores should not sit in memory or in every
    checkpoint): each checkpoint then writes a snapshot ``<store_path>.step-<selector step>.npy``
    beside it and holds only its path; the newest ``keep_snapshots`` are kept, so keep at least
    as many as Composer keeps checkpoints (``save_num_checkpoints_to_keep``).

    **Several ranks.** Composer saves rank 0's algorithm state, so a multi-rank resume gives
    every rank rank 0's generator and scores: consistent across ranks (scores are merged at
    epoch ends), but exact only for single-rank runs.

    **Burn-in and annealing** are fractions of ``max_duration`` in its own unit (as Composer's
    ``SelectiveBackprop`` ``start``/``end``): while Composer's elapsed duration is below
    ``burn_in`` or at least ``1 - anneal``, selection is uniform; scores update throughout.
    With an epoch ``max_duration`` the elapsed duration moves at epoch ends.

    Args:
        batch_size: b, samples back-propagated per meta-batch.
        keep: b/B instead of b (b = ``int(keep * B)``, at least 1), per meta-batch.
        beta1: weight of the score in the sampling weight (ES rule; paper default 0.2).
        beta2: weight of the score in its own update (paper default 0.8).
        burn_in: leading fraction of training with uniform selection.
        anneal: trailing fraction of training with uniform selection.
        policy: optional pruning policy (:class:`es_stream.ESWPPolicy`) applied at each epoch
            end; needs an epoch ``max_duration``. (``InfoBatchPolicy`` is refused here: InfoBatch
            trains on every sample it reads, with loss weights; use the :class:`InfoBatch`
            algorithm, :mod:`es_stream.integrations.composer.infobatch`.)
        manifests: directory of the manifests (default: the training ``ESStreamingDataset``'s
            ``manifests``; the two must agree).
        decay: optional decay of pruned samples' scores (see :class:`es_stream.Pruner`).
        loss_fn: ``(outputs, batch) -> per-sample losses [B]`` (see above).
        id_key: where each batch holds the sample ids: a dict key (default ``"es_id"``,
            what ``ESStreamingDataset`` yields) or a tuple index (default ``-1``, the last
            field, e.g. a dataset yielding ``(x, y, sample_id)``).
        strip_ids: remove the ids from the batch the model sees (default), so models that
            unpack ``(x, y)`` or pass every key on keep working.
        num_samples: corpus size n; default: from ``corpus`` or the training dataset's corpus.
        corpus: the :class:`es_stream.Corpus` the ids index (needed for pruning when the
            training dataset is not an ``ESStreamingDataset``).
        store_path: memory-map the scores in this ``.npy`` file (see **Checkpoints**).
        keep_snapshots: score snapshots kept beside ``store_path``.
        store_device: device of an in-memory store (e.g. ``"cuda"``: no host traffic at all).
        uniform_mix: mix this share of uniform probability into every draw (see ESSelector).
        floor: smallest sampling weight.
        seed: selector seed; rank r uses ``seed + r``.
        reference_store: reference-model losses (a :class:`es_stream.ScoreStore`, or the path of
            one written by ``es-stream score``): selection then ranks the **reducible loss**
            ``loss - reference[id]`` (RHO-LOSS, :class:`es_stream.ReducibleLossSelector`). The
            store must be complete, fully scored and of this corpus (checked at ``FIT_START``).
        reference_rule: with ``reference_store``: ``"es"`` (default) applies the ES rule
            (scores, burn-in, annealing, pruning as above) to the reducible loss; ``"topk"``
            back-propagates the b largest reducible losses (RHO-LOSS as published; the ES scores
            of the reducible loss are still updated, burn-in/annealing do not apply).
        overwrite: with a ``policy``: let this run replace manifests that another run (another
            corpus, policy or its settings, decay) wrote in ``manifests``; default False
            refuses them at ``FIT_START`` with a :class:`es_stream.ManifestError` naming the
            directory (see :class:`es_stream.Pruner`). A resumed run needs no overwrite.
    """

    def __init__(self, batch_size: int | None = None, keep: float | None = None, *,
                 beta1: float = 0.2, beta2: float = 0.8, burn_in: float = 0.0, anneal: float = 0.0,
                 policy: Policy | None = None, manifests: str | os.PathLike | None = None,
                 decay: float = 0.0, loss_fn: LossFn | None = None, id_key: IdKey | None = None,
                 strip_ids: bool = True, num_samples: int | None = None,
                 corpus: Corpus | None = None, store_path: str | os.PathLike | None = None,
                 keep_snapshots: int = 2, store_device: torch.device | str | None = None,
                 uniform_mix: float = 0.0, floor: float = 1e-8, seed: int = 0,
                 reference_store: ScoreStore | str | os.PathLike | None = None,
                 reference_rule: str = "es", overwrite: bool = False) -> None:
        if (batch_size is None) == (keep is None):
            raise ValueError("EvolvedSampling: give exactly one of batch_size (b) or keep (b/B), "
                             f"got batch_size={batch_size!r}, keep={keep!r}")
        if batch_size is not None:
            batch_size = int_at_least(batch_size, 1, "batch_size (b)")
        if keep is not None and not 0.0 < keep <= 1.0:
            raise ValueError(f"keep (b/B) must be in (0, 1], got {keep!r}")
        for name, frac in (("burn_in", burn_in), ("anneal", anneal)):
            if not 0.0 <= frac <= 1.0:
                raise ValueError(f"{name} must be a fraction of max_duration in [0, 1], got {frac}")
        if burn_in + anneal > 1.0:
            raise ValueError(f"burn_in + anneal must be <= 1, got {burn_in} + {anneal}")
        if isinstance(policy, InfoBatchPolicy):
            raise ValueError("EvolvedSampling(policy=InfoBatchPolicy) is not supported: InfoBatch "
                             "trains on every sample it reads and weights their losses; use the "
                             "InfoBatch algorithm instead (from es_stream.integrations.composer "
                             "import InfoBatch; Trainer(algorithms=[InfoBatch(ratio=...)])), or "
                             "ESWPPolicy here")
        if policy is not None and not hasattr(policy, "decide"):
            raise TypeError(f"policy must be a pruning policy such as es_stream.ESWPPolicy, got "
                            f"{type(policy).__name__}")
        if not isinstance(overwrite, bool):
            raise TypeError(f"EvolvedSampling: overwrite must be True or False, got {overwrite!r}")
        if reference_rule not in ("es", "topk"):
            raise ValueError(f"reference_rule must be 'es' or 'topk', got {reference_rule!r}")
        if reference_store is not None and not isinstance(reference_store, (ScoreStore, str, os.PathLike)):
            raise TypeError("reference_store must be an es_stream.ScoreStore or the path of one "
                            f"(es-stream score --out), got {type(reference_store).__name__}")
        self.reference_store, self.reference_rule = reference_store, reference_rule
        self.reducible: ReducibleLossSelector | None = None
        self.scores = ScoreCheckpoint(store_path, keep_snapshots, store_device)
        self.batch_size, self.keep = batch_size, keep
        self.beta1, self.beta2, self.burn_in, self.anneal = beta1, beta2, burn_in, anneal
        self.policy, self.decay = policy, decay
        self.manifests = None if manifests is None else os.fspath(manifests)
        self.overwrite = overwrite
        self.loss_fn, self.id_key, self.strip_ids = loss_fn, id_key, strip_ids
        self.num_samples, self.corpus = num_samples, corpus
        self.uniform_mix, self.floor, self.seed = uniform_mix, floor, seed
        self.selector: _DurationESSelector | None = None
        self.pruner: Pruner | None = None
        self.last_ids: torch.Tensor | None = None
        self._pending: dict[str, Any] | None = None

    def __repr__(self) -> str:
        size = f"batch_size={self.batch_size}" if self.batch_size is not None else f"keep={self.keep}"
        return (f"EvolvedSampling({size}, beta1={self.beta1}, beta2={self.beta2}, "
                f"burn_in={self.burn_in}, anneal={self.anneal}, policy={self.policy!r})")

    # ------------------------------------------------------------------ events
    def match(self, event: Event, state: State) -> bool:
        return event in (Event.INIT, Event.FIT_START, Event.EPOCH_START, Event.AFTER_DATALOADER,
                         Event.EPOCH_END)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT:
            # Composer's set_filo_order pass reverses the list on AFTER_* events: last in the
            # list is first on AFTER_DATALOADER, where ES must see the batch as loaded.
            state.algorithms = [a for a in state.algorithms if a is not self] + [self]
        elif event == Event.FIT_START:
            self._setup(state)
            self._refresh_dataloader_len(state)
        elif event == Event.EPOCH_START:
            check_dataset_ranks(state)
            self._refresh_dataloader_len(state)
        elif event == Event.AFTER_DATALOADER:
            self._select(state, logger)
        elif event == Event.EPOCH_END:
            self._end_epoch(state, logger)

    # ------------------------------------------------------------------ setup
    def _train_dataset(self, state: State) -> Any:
        return train_dataset(state)

    def _setup(self, state: State) -> None:
        dataset = self._train_dataset(state)
        corpus = self.corpus if self.corpus is not None else getattr(dataset, "corpus", None)
        n = self.num_samples if self.num_samples is not None else (
            None if corpus is None else corpus.num_samples)
        if n is None:
            raise ValueError("EvolvedSampling needs the corpus size: train on an ESStreamingDataset, "
                             "or pass num_samples= (or corpus=)")
        if corpus is not None and corpus.num_samples != n:
            raise ValueError(f"num_samples={n} but the corpus has {corpus.num_samples} samples")
        if self.selector is None:
            store = self.scores.open_store(n)
            self.selector = _DurationESSelector(
                n, self.batch_size or 1, beta1=self.beta1, beta2=self.beta2, floor=self.floor,
                uniform_mix=self.uniform_mix, seed=self.seed + composer_dist.get_global_rank(),
                store=store)
        elif self.selector.num_samples != n:
            raise ValueError(f"EvolvedSampling was set up for {self.selector.num_samples} samples, "
                             f"this fit's corpus has {n}; use a new EvolvedSampling per corpus")
        if self.reference_store is not None and self.reducible is None:
            self.reducible = self._reference(n, corpus)
        if self.policy is not None:
            self.pruner = self._make_pruner(state, dataset, corpus)
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._load(pending)

    def _reference(self, n: int, corpus: Corpus | None) -> ReducibleLossSelector:
        ref = self.reference_store
        fingerprint = None if corpus is None else corpus.fingerprint
        if not isinstance(ref, ScoreStore):
            path = os.fspath(ref)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"reference_store={path!r}: no such score store (write it "
                                        "with es-stream score --out)")
            ref = ScoreStore.open(path, n, fingerprint=fingerprint)
        elif ref.num_samples != n:
            raise ValueError(f"reference_store holds {ref.num_samples} scores, this corpus has {n} "
                             "samples: a reference of another corpus")
        # rule "topk" here: the reader of reference losses; the ES rule is this algorithm's own
        return ReducibleLossSelector(ref, 1, rule="topk", fingerprint=fingerprint)

    def _make_pruner(self, state: State, dataset: Any, corpus: Corpus | None) -> Pruner:
        self.manifests = agreed_manifests(state, dataset, corpus, self.manifests,
                                          "EvolvedSampling(policy=...)")
        # agreed_manifests checked that max_duration is in epochs: the run's length is known
        return Pruner(corpus, self.selector.store, self.policy, self.manifests, self.decay,
                      overwrite=self.overwrite, epochs=int(state.max_duration.value))

    def _refresh_dataloader_len(self, state: State) -> None:
        refresh_dataloader_len(state)

    # -------------------------------------------------------------- selection
    def _uniform_phase(self, state: State) -> bool:
        if self.burn_in == 0 and self.anneal == 0:
            return False
        elapsed = float(state.get_elapsed_duration())
        return elapsed < self.burn_in or (self.anneal > 0 and elapsed >= 1.0 - self.anneal)

    def _losses(self, state: State, batch: Any, size: int) -> torch.Tensor:
        model = unwrap_model(state)
        with torch.no_grad(), get_precision_context(state.precision, state.precision_config):
            outputs = model(batch)
            return per_sample_losses(model, outputs, batch, size, self.loss_fn,
                                     "EvolvedSampling", "meta-batch")

    def _select(self, state: State, logger: Logger) -> None:
        if self.selector is None:
            raise RuntimeError("EvolvedSampling was not set up: FIT_START did not run")
        id_key = self.id_key if self.id_key is not None else default_id_key(state.batch)
        ids, rest = split_ids(state.batch, id_key)
        size = len(ids)
        batch = state.device.batch_to_device(rest)
        losses = self._losses(state, batch, size)
        b = self.batch_size if self.batch_size is not None else max(1, int(self.keep * size))
        self.selector.uniform_now = self._uniform_phase(state)
        if self.reducible is not None:  # RHO-LOSS: rank by loss - reference loss
            losses = self.reducible.reducible(ids, losses)
        if size <= b:  # an epoch's short tail: train on all of it, still learn its scores
            w = self.selector.update(ids, losses)
            self.selector.metrics.observe(samples=size, selected=size, uniform=True, scores=w,
                                          never_scored=self.selector.last_never_scored)
            index = torch.arange(size)
        elif self.reducible is not None and self.reference_rule == "topk":
            self.selector.update(ids, losses)
            self.selector.step += 1
            self.selector.metrics.observe(samples=size, selected=b, uniform=False, scores=losses,
                                          never_scored=self.selector.last_never_scored)
            index = losses.topk(b, sorted=False).indices.sort().values
        else:
            self.selector.batch_size = b
            index = self.selector.select(ids, losses).sort().values
        keep_from = batch if self.strip_ids else state.device.batch_to_device(state.batch)
        state.batch = take_rows(keep_from, index, size)
        self.last_ids = ids[index.cpu()]
        logger.log_metrics({"es/meta_batch": size, "es/selected": len(index),
                            "es/uniform": int(self.selector.uniform_now)})

    # ------------------------------------------------------------------ epochs
    def _end_epoch(self, state: State, logger: Logger) -> None:
        if self.selector is None:
            return
        # this epoch's selection stats, then a fresh period (one device sync per epoch)
        stats = self.selector.log_stats(step=int(state.timestamp.batch))
        logger.log_metrics({f"es/{k}": v for k, v in stats.items()})
        if self.pruner is not None:
            finished = int(state.timestamp.epoch) - 1  # the timestamp has moved on already
            self.pruner.on_epoch_end(finished, int(state.max_duration.value))
            summary = self.pruner.last_summary  # rank 0's decision (the others do not write)
            if summary is not None and summary["epoch"] == finished + 1:
                logger.log_metrics({f"es/prune/{k}": float(v) for k, v in summary.items()})
        elif composer_dist.get_world_size() > 1:
            merge_rank_scores(self.selector.store)

    # -------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        """The selector's state and the scores (a tensor, or a snapshot path with
        ``store_path``); see the class docs."""
        state = super().state_dict()
        if self.selector is None:  # saved before training started: carry a loaded state on
            state.update(self._pending or {})
            return state
        state["num_samples"] = self.selector.num_samples
        state["selector"] = self.selector.state_dict()  # holds no scores: saved beside it
        state.update(self.scores.save(self.selector.store, self.selector.step))
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a checkpoint's selector and scores (applied at ``FIT_START`` when the
        selector does not exist yet, as when Composer loads ``load_path`` in the Trainer)."""
        if "selector" not in state:
            return  # a checkpoint saved before the first fit
        if self.selector is None:
            self._pending = dict(state)
        else:
            self._load(state)

    def _load(self, state: dict[str, Any]) -> None:
        store = self.selector.store
        if int(state["num_samples"]) != store.num_samples:
            raise ValueError(f"checkpoint of EvolvedSampling holds {state['num_samples']} scores, "
                             f"this corpus has {store.num_samples} samples: another corpus?")
        self.selector.load_state_dict(state["selector"])
        self.scores.restore(store, state)
