"""The one training loop of the pipelines (``pipelines.mnist1d``, ``pipelines.textlm``) and the
benchmark (``tools/bench_train.py``): a method lands here once and every workload gets it.

A workload (:class:`Workload`) says what is trained and on what: the corpus and how ESDataset
decodes and collates it, a model factory, the per-sample loss of a collated batch, the held-out
evaluation (its name and direction), gradient clipping and the device. A run (:class:`RunConfig`)
says how: epochs and their budget, b and B, the learning rate, the seed, the method's options.
:func:`train` does the rest, the same way for every workload:

* **Methods** (:mod:`pipelines.methods`, the registry): each method is one
  :class:`~pipelines.methods.Method` saying what it needs (its selector, its pruner and when it
  prunes, whether it reads a reference model, whether it trains on batches of b or selects b of
  B); :class:`_Run` reads those declarations, never a method's name. A reference (the methods
  with ``reference``: :class:`Reference`, a complete score store and what the reference model's
  training and scoring pass cost, :mod:`pipelines.reference`) is paid before the first step:
  its seconds are added to the wall-clock and to every curve point, and reported on their own
  (``reference_s``). The prune-once methods train ``epochs`` epochs over the kept part: the same
  training compute for every band and the random control (a budget-matched uniform control is
  the benchmark's ``budget_*``).
* **Schedule.** Adam with a cosine learning rate over the run's progress in epochs (epoch plus
  the fraction of its meta-batches done), so every method ends at lr 0 whatever its steps per
  epoch (pruned epochs have fewer). With ``budget_epochs`` (fractional) the run stops there,
  mid-epoch, and the schedule spans that many epochs instead of ``epochs``.
* **Timer.** Training wall-clock: the loop, loader waits and manifest writing, paused while the
  held-out set is evaluated (``evals_per_epoch`` times per epoch, the last at the epoch's end).
  On CUDA it synchronises only at those evaluation points, never per step. Beside it, over the
  same intervals, the CPU seconds of this process and its finished children
  (:func:`cpu_seconds`): with one torch thread and no DataLoader workers that is the wall-clock
  the run would take on an idle core; it grows much less than wall-clock when other work shares
  the machine, but it does grow (caches, memory bandwidth: uniform's CPU time was 1.5x higher
  under a load average of 5 than on the idle machine), so compare runs made under the same
  load (``cpu_s``, ``cpu_curve``; the benchmark's time basis, ``tools/benchtrain``).
* **Counts.** ``samples_forwarded`` (read and passed through the model at least once: scoring
  forwards included, fewer for the pruning methods and for ``es_fresh``),
  ``samples_scored`` (through the no-grad scoring forward), ``samples_backpropagated`` (in the
  loss that was back-propagated), ``steps``.
* **Already learned.** With the workload's ``learned_loss``, each epoch's ``learned_fraction``:
  the fraction of the samples read that epoch whose loss, under the model just before the step
  that read them, was below it. The losses are the ones the method computes anyway (the scoring
  forward of a selecting method, the training forward of a batch of b), so this costs a
  comparison per sample, counted on the device and read once per epoch.

A new method is one entry of :mod:`pipelines.methods` (and its selector or policy class); a
new kind of step changes one method of ``_Run``: the per-sample weights of the loss
(``weights``), the scoring forward (``score``), the optimizer step (``step``), the learning rate
queried per step (:func:`cosine_lr`); the model comes from the workload's factory, which may
load pre-trained weights.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

import es_stream
from es_stream import BatchSchedule, Corpus, ESDataset, ESSelector, ReducibleLossSelector

from . import methods
from .methods import random_scores  # noqa: F401  (its old home: kept importable)

# The method lists as the registry holds them at import (methods registered later are read
# through pipelines.methods, which the loop itself does).
#: the variants of ES (their own benchmark grid)
VARIANTS = methods.names(group="variant")
#: the methods that need nothing but the corpus (every one runs in tests/test_loop.py)
METHODS = methods.names(reference=False, oracle=False)
#: the methods that read a reference model's losses (:class:`Reference`)
REFERENCE_METHODS = methods.names(reference=True)
#: the methods that read the workload's side table of kinds (``Workload.sample_kinds``)
ORACLE_METHODS = methods.names(reference=False, oracle=True)
#: every method of the loop (the reference methods need ``RunConfig.reference``)
ALL_METHODS = METHODS + REFERENCE_METHODS + ORACLE_METHODS
#: the methods whose b moves over the run, and how (:class:`~es_stream.BatchSchedule`)
SCHEDULES = {m.name: m.schedule for m in methods.methods() if m.schedule}


class CapturingFactory:
    """A model factory that keeps the model it made: :func:`train` trains that model in place,
    so whoever builds a model to keep (a pre-trained or reference model) reads it here after."""

    def __init__(self, factory: Callable[[], nn.Module]) -> None:
        self.factory, self.model = factory, None

    def __call__(self) -> nn.Module:
        self.model = self.factory()
        return self.model


@dataclass(frozen=True)
class Workload:
    """What a pipeline supplies to :func:`train`.

    ``make_model()`` is called right after ``torch.manual_seed(seed)`` and its model moved to
    ``device``. ``losses(model, data)`` returns the per-sample losses (float ``[n]``, with
    gradients) of a collated batch already on ``device``; the loop trains on their mean.
    ``evaluate(model)`` returns the held-out quality; it is called in eval mode, timer paused.
    ``quality`` names it in the result (``final_<quality>``, ``best_<quality>``);
    ``higher_is_better`` picks the best. ``clip``: gradient-norm clipping (0: none).
    ``learned_loss``: a sample whose loss is below it counts as already learned (the per-epoch
    ``learned_fraction`` of the result; None: not measured).
    ``sample_kinds`` (int64 ``[n]``, codes into ``kind_names``): a side table of each sample's
    kind, for reporting only (the result's ``backpropagated_by_kind`` and, for a prune-once
    method, ``kept_by_kind``); no method reads it but one that declares it is an oracle.
    ``final_metrics(model)``: more held-out figures, computed once after training (timer
    stopped), the result's ``final_metrics``.
    """

    name: str
    corpus: Corpus
    make_model: Callable[[], nn.Module]
    losses: Callable[[nn.Module, Any], torch.Tensor]
    evaluate: Callable[[nn.Module], float]
    quality: str
    higher_is_better: bool
    collate: Callable[[list[Any]], Any]
    decode: Callable[[Any], Any] | None = None
    clip: float = 0.0
    device: str = "cpu"
    learned_loss: float | None = None
    chance_loss: float | None = None
    sample_kinds: torch.Tensor | None = None
    kind_names: tuple[str, ...] = ()
    final_metrics: Callable[[nn.Module], dict[str, float]] | None = None


@dataclass(frozen=True)
class Reference:
    """A reference model's per-sample losses on the training corpus (``docs/REFERENCE.md``),
    for the methods of :data:`REFERENCE_METHODS`: ``store`` is a complete memory-mapped
    :class:`~es_stream.ScoreStore` written by :func:`es_stream.score_corpus` (see
    :mod:`pipelines.reference`), ``train_s`` the reference model's training wall-clock and
    ``score_s`` the scoring pass's. Their sum (:attr:`seconds`) is paid before such a method's
    first step, so :func:`train` adds it to the method's ``wall_clock_s`` and to every point of
    its curve (and reports it on its own as ``reference_s``)."""

    store: str
    train_s: float = 0.0
    score_s: float = 0.0
    name: str = ""
    train_cpu_s: float | None = None   # CPU seconds of the same (None: not measured; the
    score_cpu_s: float | None = None   # wall-clock stands in)
    clean_losses: tuple[float, ...] | None = None  # its losses on clean validation text

    @property
    def seconds(self) -> float:
        return self.train_s + self.score_s

    @property
    def cpu_seconds(self) -> float:
        train = self.train_s if self.train_cpu_s is None else self.train_cpu_s
        return train + (self.score_s if self.score_cpu_s is None else self.score_cpu_s)


@dataclass(frozen=True)
class RunConfig:
    """How one run trains (see :func:`train`).

    ``es_options`` go to :class:`ESSelector` (beta1, beta2, burn_in, anneal, ...).
    ``eswp_ratio`` / ``infobatch_ratio``: the pruning ratios of ``eswp`` / ``infobatch``;
    ``prune_anneal``: the fraction of final epochs left unpruned; ``prune_burn_in_epochs``: the
    unpruned first epochs of ``eswp``. ``budget_epochs`` (for budget-matched controls, a fraction
    allowed, at most ``epochs``) cuts the run there. With ``run_dir`` the run's manifests are
    kept in ``run_dir/manifests`` (replaced, not merged) and its final scores in
    ``run_dir/scores.npy`` (for ``es-stream inspect/prune``); without it they go to a temporary
    directory. The variants' options, each read by its method only: ``rescale_min_keep``
    (``eswp_rescale``: smallest keep probability, weights <= 1/it), ``b_ramp``
    (``es_to_uniform``/``es_from_uniform``: fraction of training over which b moves) and
    ``fresh_epochs`` (``es_fresh``: a score updated within this many epochs' steps is fresh).
    ``reference``: the reference losses of ``rho``, ``rho_es`` and the bands (:class:`Reference`);
    ``prune_keep``: the fraction the bands and ``prune_random`` keep (``ceil(prune_keep * n)``
    samples, decided once; every epoch then reads only those, so such a run trains ``epochs``
    epochs over the kept part: the same training compute for every band and the random control).

    ``budget_passes`` (the web regime's budget): the run takes ``ceil(budget_passes * n / b)``
    optimizer steps, ``n`` the corpus's samples, whatever the method prunes or selects — the
    same training compute for every method, uniform reading ``budget_passes`` of one pass over
    the stream (a prune-once method reads that many samples of its kept part, passing over it
    more than once when it keeps less; a selecting method reads B per step). The loop resolves
    it into ``epochs`` and ``budget_epochs`` once the epoch's length is known
    (:func:`resolve_budget`), which replace those given. ``evals_per_run``: with it, held-out
    evaluations per run instead of ``evals_per_epoch``. ``filter_quantile``: the reference
    filter keeps samples whose reference loss is at most this quantile of the reference's
    losses on its clean validation text (``Reference.clean_losses``).
    """

    epochs: int
    b: int = 64
    B: int = 128
    lr: float = 3e-3
    seed: int = 0
    workers: int = 0
    progress: bool = True
    es_options: Mapping[str, Any] | None = None
    eswp_ratio: float = 0.3
    infobatch_ratio: float = 0.5
    prune_anneal: float = 0.125
    prune_burn_in_epochs: int = 1
    run_dir: str | None = None
    budget_epochs: float | None = None
    evals_per_epoch: int = 1
    rescale_min_keep: float = 0.1
    b_ramp: float = 0.75
    fresh_epochs: float = 1.0
    reference: Reference | None = None
    prune_keep: float = 0.5
    budget_passes: float | None = None
    evals_per_run: int | None = None
    filter_quantile: float = 0.95

    @property
    def horizon(self) -> float:
        """Epochs the run trains (and its schedule spans): ``budget_epochs`` or ``epochs``."""
        return float(self.epochs if self.budget_epochs is None else self.budget_epochs)

    @property
    def epochs_run(self) -> int:
        """Epochs entered, the last possibly cut part-way: ``ceil(horizon)``."""
        return math.ceil(self.horizon)

    def check(self, method: str) -> None:
        """ValueError naming the argument unless ``method`` and the settings make a run."""
        reads_reference = methods.get(method).reference  # ValueError for an unknown method
        if reads_reference and self.reference is None:
            raise ValueError(f"method {method!r} reads a reference model's losses: give "
                             "RunConfig(reference=Reference(store=...)) (pipelines.reference "
                             "trains and scores one)")
        if reads_reference and not os.path.exists(self.reference.store):
            raise FileNotFoundError(f"reference store {self.reference.store} (method {method!r}) "
                                    "does not exist; score the corpus first (pipelines.reference "
                                    "or `es-stream score`)")
        if not 0.0 < self.prune_keep <= 1.0:
            raise ValueError(f"prune_keep must be a fraction in (0, 1], got {self.prune_keep}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if not 1 <= self.b <= self.B:
            raise ValueError(f"need 1 <= b <= B, got b={self.b}, B={self.B}")
        if self.evals_per_epoch < 1:
            raise ValueError(f"evals_per_epoch must be >= 1, got {self.evals_per_epoch}")
        if not 0 < self.horizon <= self.epochs:
            raise ValueError(f"budget_epochs must be in (0, epochs={self.epochs}], "
                             f"got {self.budget_epochs}")
        if not 0 < self.rescale_min_keep <= 1:
            raise ValueError(f"rescale_min_keep must be in (0, 1], got {self.rescale_min_keep}")
        if not 0 < self.b_ramp <= 1:
            raise ValueError(f"b_ramp must be in (0, 1], got {self.b_ramp}")
        if not self.fresh_epochs > 0:
            raise ValueError(f"fresh_epochs must be > 0, got {self.fresh_epochs}")
        if self.budget_passes is not None and not self.budget_passes > 0:
            raise ValueError(f"budget_passes must be > 0, got {self.budget_passes}")
        if self.evals_per_run is not None and self.evals_per_run < 1:
            raise ValueError(f"evals_per_run must be >= 1, got {self.evals_per_run}")
        if not 0.0 < self.filter_quantile <= 1.0:
            raise ValueError(f"filter_quantile must be in (0, 1], got {self.filter_quantile}")


def resolve_budget(config: RunConfig, num_samples: int, steps_per_epoch: int) -> RunConfig:
    """``config`` with ``budget_passes`` turned into epochs of an epoch of ``steps_per_epoch``
    steps (``num_samples``: the whole corpus's), and ``evals_per_run`` into evaluations per
    epoch; unchanged without ``budget_passes``."""
    if config.budget_passes is None:
        return config
    steps = max(1, math.ceil(config.budget_passes * num_samples / config.b))
    horizon = steps / max(1, steps_per_epoch)
    evals = config.evals_per_epoch
    if config.evals_per_run is not None:
        evals = max(1, math.ceil(config.evals_per_run / horizon))
    return dataclasses.replace(config, epochs=max(1, math.ceil(horizon)), budget_epochs=horizon,
                               evals_per_epoch=evals)


# ----------------------------------------------------------------------------- the method's parts
def open_reference(corpus: Corpus, reference: Reference) -> Any:
    """The reference :class:`~es_stream.ScoreStore` of ``reference``, memory-mapped and bound to
    ``corpus`` (a store of another corpus is refused, naming it) and complete (an unfinished
    scoring pass is refused, naming the store)."""
    from es_stream import ScoreStore
    from es_stream.reference_scoring import require_complete

    store = ScoreStore.open(reference.store, corpus.num_samples, fingerprint=corpus.fingerprint)
    require_complete(store, "this run")
    return store


def save_scores(run_dir: str | None, pruner: Any, selector: Any) -> None:
    """Save the run's final scores (the pruner's store, else the selector's, if any) to
    ``run_dir/scores.npy``; nothing without ``run_dir``."""
    store = pruner.store if pruner is not None else getattr(selector, "store", None)
    if run_dir is not None and store is not None:
        os.makedirs(run_dir, exist_ok=True)
        store.save(os.path.join(run_dir, "scores.npy"))


# ----------------------------------------------------------------------------- small parts
def cosine_lr(lr: float, progress: float, horizon: float) -> float:
    """Peak ``lr`` decayed by a half cosine over ``horizon`` epochs, at ``progress`` epochs."""
    return lr * 0.5 * (1.0 + math.cos(math.pi * progress / horizon))


def to_device(data: Any, device: torch.device) -> Any:
    """A collated batch (a tensor, or a tuple/list/dict of them) on ``device``."""
    if isinstance(data, torch.Tensor):
        return data.to(device, non_blocking=True)
    if isinstance(data, (tuple, list)):
        return type(data)(to_device(d, device) for d in data)
    if isinstance(data, dict):
        return {k: to_device(v, device) for k, v in data.items()}
    return data


def take(data: Any, rows: torch.Tensor) -> Any:
    """The ``rows`` of a collated batch (every tensor of it indexed along its first dimension)."""
    if isinstance(data, torch.Tensor):
        return data[rows]
    if isinstance(data, (tuple, list)):
        return type(data)(take(d, rows) for d in data)
    if isinstance(data, dict):
        return {k: take(v, rows) for k, v in data.items()}
    raise TypeError(f"cannot take rows of a batch of type {type(data).__name__}: the workload's "
                    "collate must return tensors (or a tuple, list or dict of them)")


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its children that have ended (DataLoader
    workers once joined): a cost that grows far less than wall-clock when other processes share
    the CPUs (their caches and memory bandwidth still slow it)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class Clock:
    """Training wall-clock (``elapsed``) and CPU time (``cpu``, :func:`cpu_seconds`): both run
    between :meth:`start` and :meth:`stop`, stopped while evaluating. On CUDA, :meth:`stop`
    synchronises first (kernels queued by the steps count as training); nothing else does, so
    steps never wait on the device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.elapsed = 0.0
        self.cpu = 0.0
        self._start = 0.0
        self._cpu_start = 0.0

    def start(self) -> None:
        self._start = time.perf_counter()
        self._cpu_start = cpu_seconds()

    def stop(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.elapsed += time.perf_counter() - self._start
        self.cpu += cpu_seconds() - self._cpu_start


@dataclass
class Counts:
    """What a run has done so far."""

    forwarded: int = 0
    scored: int = 0
    backpropagated: int = 0
    steps: int = 0
    epochs_done: float = 0.0
    curve: list[tuple[float, float]] = field(default_factory=list)
    cpu_curve: list[tuple[float, float]] = field(default_factory=list)
    learned_fraction: list[float] = field(default_factory=list)
    stats: list[dict[str, float]] = field(default_factory=list)


class _Run:
    """One run in progress: the model, its optimizer, the method's selector and pruner, the
    clock and the counts. Its methods are the loop's steps, so a variant changes one of them."""

    def __init__(self, workload: Workload, method: str, config: RunConfig, model: nn.Module,
                 ds: ESDataset, manifests: str, bar: Any) -> None:
        self.workload, self.method, self.config = workload, method, config
        self.model, self.ds, self.bar = model, ds, bar
        self.dev = torch.device(workload.device)
        self.spec = spec = methods.get(method)
        options = dict(config.es_options or {}) if spec.es_options else {}
        if self.dev.type == "cuda" and spec.es_options:
            options.setdefault("device", self.dev)
        self.schedule = (BatchSchedule(spec.schedule, config.b, config.B, config.b_ramp)
                         if spec.schedule else None)
        # samples forwarded only to be trained (fresh ones selected): a device count, read once
        # at the end so that no step waits on the device
        self._fresh_trained: torch.Tensor | None = None
        self.reference = (open_reference(workload.corpus, config.reference)
                          if spec.reference else None)
        # ES's burn-in/anneal fractions count steps of unpruned epochs (an upper bound for eswp)
        ctx = methods.Context(workload.corpus, config.b, config.seed, config.epochs * len(ds),
                              len(ds), config, options, reference=self.reference,
                              chance_loss=workload.chance_loss, manifests=manifests,
                              workload=workload)
        self.selector = spec.selector(ctx) if spec.selector is not None else None
        self.pruner = spec.pruner(ctx, self.selector) if spec.pruner is not None else None
        self.opt = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        self.clock = Clock(self.dev)
        self.counts = Counts()
        # this epoch's samples below the workload's learned_loss, and samples seen: a device
        # tensor summed per step (no per-step sync), read at the epoch's end
        self._learned: torch.Tensor | int = 0
        self._seen = 0
        # back-propagated samples per kind of the workload's side table: a device tensor, read
        # once at the end
        kinds = workload.sample_kinds
        self._kinds = kinds.to(self.dev) if kinds is not None else None
        self._by_kind = (torch.zeros(len(workload.kind_names), dtype=torch.long, device=self.dev)
                         if kinds is not None else None)
        self.kept_by_kind: dict[str, int] | None = None

    def observe(self, losses: torch.Tensor) -> None:
        """Count the samples of ``losses`` (before this step's update) below ``learned_loss``."""
        if self.workload.learned_loss is not None:
            self._learned = self._learned + (losses < self.workload.learned_loss).sum()
            self._seen += len(losses)

    def close_epoch_diagnostics(self) -> None:
        """Append this epoch's ``learned_fraction`` (call with the clock stopped: it syncs)."""
        if self.workload.learned_loss is not None:
            learned = float(self._learned)
            self.counts.learned_fraction.append(learned / self._seen if self._seen else math.nan)
            self._learned, self._seen = 0, 0

    def score(self, data: Any) -> torch.Tensor:
        """The no-grad scoring forward: per-sample losses of a whole meta-batch."""
        with torch.no_grad():
            return self.workload.losses(self.model, data)

    def batch_size(self, progress: float) -> int:
        """b of this step: the schedule's at ``progress`` (fraction of the run), else ``b``."""
        return self.config.b if self.schedule is None else self.schedule(progress)

    def select(self, data: Any, ids: torch.Tensor, b: int) -> torch.Tensor:
        """Score the meta-batch (only its stale rows for ``es_fresh``) and let the selector pick
        ``b`` of it; the chosen rows, on the device."""
        sel = self.selector
        if isinstance(sel, ESSelector) and sel.fresh_steps:
            stale = sel.stale(ids)  # host ids and mask: no synchronisation
            rows = stale.nonzero().squeeze(1)
            losses = torch.zeros(len(ids), device=self.dev)
            if len(rows) == len(ids):
                losses = self.score(data)
                self.observe(losses)
            elif len(rows):
                rows_dev = rows.to(self.dev)
                losses[rows_dev] = self.score(take(data, rows_dev)).float()
                self.observe(losses[rows_dev])  # fresh rows have no loss under this model
            self.counts.forwarded += len(rows)
            self.counts.scored += len(rows)
            chosen = sel.select(ids, losses, b=b, forwarded=stale)
            fresh_trained = (~stale).to(self.dev)[chosen].sum()
            self._fresh_trained = (fresh_trained if self._fresh_trained is None
                                   else self._fresh_trained + fresh_trained)
            return chosen
        reducible = isinstance(sel, ReducibleLossSelector)
        if reducible:  # start the reference losses' copy before the forward
            sel.prefetch(ids, self.dev)
        self.counts.forwarded += len(ids)
        self.counts.scored += len(ids)
        losses = self.score(data)
        self.observe(losses)
        if reducible:  # host ids: the reference is read through its prefetch
            return sel.select(ids, losses)
        if b != self.config.b:  # only ES selectors vary b (BatchSchedule)
            return sel.select(ids.to(self.dev), losses, b=b)
        return sel.select(ids.to(self.dev), losses)

    def weights(self, mb: Any, chosen: torch.Tensor | None = None) -> torch.Tensor | None:
        """Per-sample weights of the back-propagated loss (None: all 1): the pruning policy's
        (``MetaBatch.weights``: InfoBatch's and ``eswp_rescale``'s rescaled samples, at the
        ``chosen`` rows) times the selector's importance weights (``es_reweight``)."""
        w = None
        if self.spec.weighted and mb.weights is not None:
            w = mb.weights.to(self.dev)
            if chosen is not None:
                w = w[chosen]
        last = getattr(self.selector, "last_weights", None) if chosen is not None else None
        if last is not None:
            w = last if w is None else w * last
        return w

    def step(self, mb: Any, progress: float = 0.0) -> None:
        """One meta-batch at ``progress`` (fraction of the run): score and select b of it
        (selection methods, when b is below the meta-batch's size), then one optimizer step on
        the mean of the (weighted) per-sample losses."""
        data, ids = to_device(mb.data, self.dev), mb.ids
        b = self.batch_size(progress)
        chosen = None
        if self.spec.selects and len(ids) > b:
            chosen = self.select(data, ids, b)
            data = take(data, chosen)
        else:  # a batch of b, b == B, or a tail meta-batch of at most b: train on all of it
            self.counts.forwarded += len(ids)
        losses = self.workload.losses(self.model, data)
        if chosen is None:  # no scoring forward: the training losses are this step's view
            self.observe(losses.detach())
        if chosen is None:  # no scoring forward: the training losses are the scores
            if self.spec.train_loss_scores == "pruner":  # each sample's last loss
                self.pruner.store.scatter(ids, losses.detach())
            elif self.spec.train_loss_scores == "selector":
                self.selector.record(ids, losses.detach())
        if self._kinds is not None:
            trained = ids.to(self.dev)
            trained = trained[chosen] if chosen is not None else trained
            self._by_kind += torch.bincount(self._kinds[trained], minlength=len(self._by_kind))
        weights = self.weights(mb, chosen)
        loss = losses.mean() if weights is None else (losses * weights).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.workload.clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.workload.clip)
        self.opt.step()
        self.counts.backpropagated += len(losses)
        self.counts.steps += 1

    def evaluate(self) -> None:
        """One held-out evaluation, appended to the curve (call with the clock stopped)."""
        self.model.eval()
        value = self.workload.evaluate(self.model)
        self.model.train()
        self.counts.curve.append((self.clock.elapsed, value))
        self.counts.cpu_curve.append((self.clock.cpu, value))
        self.bar.set_postfix({self.workload.quality: f"{value:.3f}",
                              "s": f"{self.clock.elapsed:.1f}"})

    def epoch(self, epoch: int, dl: Any) -> None:
        """One epoch: its meta-batches (cut where the budget ends), its mid-epoch evaluations,
        the pruning decision for the next epoch, and the end-of-epoch evaluation."""
        config, clock = self.config, self.clock
        clock.start()
        self.ds.set_epoch(epoch)
        per_epoch = len(self.ds)
        # evaluation points inside this epoch (meta-batch counts after which to evaluate)
        marks = {math.ceil(per_epoch * k / config.evals_per_epoch)
                 for k in range(1, config.evals_per_epoch)}
        # a budget ending inside this epoch: the meta-batches to take from it
        stop = (math.ceil((config.horizon - epoch) * per_epoch) if epoch + 1 > config.horizon
                else None)
        i = 0
        for i, mb in enumerate(dl, start=1):
            done = epoch + (i - 1) / per_epoch  # epochs of progress before this step
            for group in self.opt.param_groups:
                group["lr"] = cosine_lr(config.lr, done, config.horizon)
            self.step(mb, done / config.horizon)
            if stop is not None and i >= stop:
                break
            if i in marks:
                clock.stop()
                self.evaluate()  # timer paused
                clock.start()
        self.counts.epochs_done = epoch + i / per_epoch
        # The decision made at the end of epoch e is for epoch e + 1, and the run's last epoch is
        # ceil(horizon) - 1: no decision there. (Comparing with `epochs` instead, as the MNIST-1D
        # loop once did, made a budget-cut pruning run decide, time and keep manifests for an
        # epoch it never ran, and with a decaying pruner change the scores it saves.)
        if self.spec.prune == "epoch" and epoch + 1 < config.epochs_run:
            self.pruner.on_epoch_end(epoch, config.epochs)
        clock.stop()
        self.close_epoch_diagnostics()
        if self.selector is not None:  # the epoch's selection stats (one sync, clock stopped)
            self.counts.stats.append(self.selector.log_stats())
        self.evaluate()  # timer paused

    def prune_once(self) -> None:
        """The prune-once methods' one decision, before the first epoch: written to
        ``epoch=00000`` and marked ``applies_to: all``, so ESDataset reads only the kept samples
        in every epoch; and the first decision of an epoch pruner with ``prune_first`` (its
        epoch 0 is pruned too, the later ones at epoch ends). Timed: it is part of the method's
        cost."""
        if self.spec.prune == "epoch" and self.spec.prune_first:  # RS2: epoch 0 is a subset too
            self.clock.start()
            self.pruner.write(0, self.config.epochs)
            self.clock.stop()
        if self.spec.prune == "once":
            self.clock.start()
            self.pruner.policy.check(self.pruner.store)  # refused before anything is written
            self.pruner.write(0, self.config.epochs)
            self.clock.stop()
            keep = self.ds.epoch_keep(0)
            if self._kinds is not None and keep is not None:
                kept = torch.bincount(self.workload.sample_kinds[torch.as_tensor(keep.kept_ids)],
                                      minlength=len(self.workload.kind_names))
                self.kept_by_kind = dict(zip(self.workload.kind_names, kept.tolist()))

    def result(self) -> dict[str, Any]:
        """The result dict of :func:`train`."""
        ref = self.config.reference if self.spec.reference else None
        extra = ref.seconds if ref is not None else 0.0   # paid before the first step
        extra_cpu = ref.cpu_seconds if ref is not None else 0.0
        curve = [(t + extra, q) for t, q in self.counts.curve]
        values = [q for _, q in self.counts.curve]
        best = max if self.workload.higher_is_better else min
        quality = self.workload.quality
        forwarded = self.counts.forwarded
        if self._fresh_trained is not None:  # the run is over: one synchronisation
            forwarded += int(self._fresh_trained)
        return {"method": self.method, "seed": self.config.seed,
                "wall_clock_s": self.clock.elapsed + extra, "reference_s": extra,
                "cpu_s": self.clock.cpu + extra_cpu, "reference_cpu_s": extra_cpu,
                "reference_train_s": ref.train_s if ref is not None else 0.0,
                "reference_score_s": ref.score_s if ref is not None else 0.0,
                "samples_forwarded": forwarded, "samples_scored": self.counts.scored,
                "samples_backpropagated": self.counts.backpropagated, "steps": self.counts.steps,
                "epochs_done": self.counts.epochs_done,
                "params": sum(p.numel() for p in self.model.parameters()),
                f"final_{quality}": values[-1] if values else float("nan"),
                f"best_{quality}": best(values, default=float("nan")),
                "curve": curve, "learned_fraction": self.counts.learned_fraction,
                "cpu_curve": [(t + extra_cpu, q) for t, q in self.counts.cpu_curve],
                "stats": self.counts.stats, **self.side_results()}

    def side_results(self) -> dict[str, Any]:
        """What the run trained on per kind of the workload's side table, and its
        ``final_metrics`` (both only where the workload has them; call with the clock stopped)."""
        out: dict[str, Any] = {}
        if self._by_kind is not None:
            names = self.workload.kind_names
            out["backpropagated_by_kind"] = dict(zip(names, self._by_kind.tolist()))
            out["samples_by_kind"] = dict(zip(names, torch.bincount(
                self.workload.sample_kinds, minlength=len(names)).tolist()))
            if self.kept_by_kind is not None:
                out["kept_by_kind"] = self.kept_by_kind
        if self.workload.final_metrics is not None:
            self.model.eval()
            out["final_metrics"] = self.workload.final_metrics(self.model)
            self.model.train()
        return out


def train(workload: Workload, method: str, config: RunConfig) -> dict[str, Any]:
    """Train one model of ``workload`` with ``method`` and report time, counts and quality.

    Returns a dict: ``method, seed, wall_clock_s`` (training wall-clock, evaluation excluded),
    ``samples_forwarded, samples_scored, samples_backpropagated, steps``, ``epochs_done``
    (fractional), ``params``, ``final_<quality>``, ``best_<quality>`` (max, or min when lower is
    better) and ``curve``: ``(wall_clock_s, quality)`` per evaluation, and ``learned_fraction``:
    per epoch, the fraction of the samples read whose loss was below the workload's
    ``learned_loss`` (empty without one); ``stats``: per epoch, the selector's
    :meth:`~es_stream.ESSelector.stats` for that epoch (empty without a selector; steps 0 for
    selectors that keep none); ``reference_s``, ``reference_train_s``, ``reference_score_s``:
    what the reference model cost a method that reads one (already in ``wall_clock_s`` and the
    curve; 0 for the others). Raises ValueError naming the argument for an unknown method, ``b > B``, ``evals_per_epoch < 1`` or a budget outside
    ``(0, epochs]``.
    """
    from es_stream.progress import progress

    config.check(method)
    spec = methods.get(method)
    torch.manual_seed(config.seed)  # first: the model's initialisation depends on the seed alone
    model = workload.make_model().to(workload.device)
    with tempfile.TemporaryDirectory(prefix=f"es-stream-{workload.name}-{method}-") as tmp:
        manifests = os.path.join(config.run_dir or tmp, "manifests")
        shutil.rmtree(manifests, ignore_errors=True)  # epochs of an earlier run must not leak in
        ds = ESDataset(workload.corpus,
                       meta_batch_size=config.b if spec.batch_of_b else config.B,
                       decode=workload.decode, collate=workload.collate, shuffle=True,
                       seed=config.seed,
                       manifests=manifests if spec.prune else None)
        dl = es_stream.loader(ds, num_workers=config.workers)
        if spec.prune != "once":  # a selector's steps need the run's length up front
            config = resolve_budget(config, workload.corpus.num_samples, len(ds))
        bar = progress(total=config.epochs_run, desc=f"{method} seed {config.seed}", unit="epoch",
                       disable=not config.progress, dynamic_ncols=True, leave=False,
                       mininterval=1.0)
        run = _Run(workload, method, config, model, ds, manifests, bar)
        run.prune_once()
        if spec.prune == "once":  # the kept part's length is known now
            config = run.config = resolve_budget(config, workload.corpus.num_samples, len(ds))
            bar.total = config.epochs_run
        try:
            for epoch in range(config.epochs_run):
                run.epoch(epoch, dl)
                bar.update()
        finally:
            bar.close()
            del dl  # stop persistent workers before the manifest directory goes
        if spec.prune != "once":  # their store is the reference's (or random): not theirs
            save_scores(config.run_dir, run.pruner, run.selector)
    return run.result()
