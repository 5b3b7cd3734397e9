"""Selectors: from a meta-batch's per-sample losses, pick the b samples to back-propagate.

All selectors share one interface, ``select(ids, losses) -> LongTensor[b]`` (indices into the
meta-batch, on ``losses.device``), with no data-dependent shapes and no host synchronisation.
The random ones (:class:`UniformSelector`, :class:`LossSelector`,
:class:`SelectiveBackpropSelector`, :class:`ESSelector`) draw without replacement by
Gumbel-top-k: the top b of ``log w_i + Gumbel(0, 1)`` are exactly a successive draw without
replacement with probability proportional to ``w``. :class:`TopKSelector` (and
``ReducibleLossSelector(rule="topk")``) take the b largest, deterministically.
:meth:`Selector.select_with_weights` returns the selection with its loss weights.

**State.** ``state_dict()`` takes no argument and never holds the score store: the store is
state of its own (:meth:`ScoreStore.state_dict`), saved once, beside the selector's, by
:class:`es_stream.TrainingState` and :class:`es_stream.Checkpointer`.

:class:`BatchSchedule` gives b per step as a function of training progress (selection annealed
to the whole meta-batch, or the reverse), for a loop that varies b with ``select(..., b=)``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from ._check import integer
from .device_channel import FeedbackChannel
from .metrics import LogFn, SelectionStats, check_log_fn, emit
from .store import ScoreStore, as_index, positive_int


class Selector:
    """Base class: validation, the random generator, the step counter and the stats.

    **Stats.** :meth:`stats` reports what the selector did since it was built or since
    :meth:`reset_stats` (see :class:`es_stream.metrics.SelectionStats` for the keys and how the
    quantiles are kept: on the device, no per-step synchronisation; :meth:`stats` syncs once).
    :meth:`log_stats` (call it at each epoch end) logs them at INFO on the ``es_stream`` logger,
    hands them to ``log_fn`` with keys prefixed ``es/`` and resets. The stats travel in
    :meth:`state_dict`, so a resumed run reports what an uninterrupted one would.
    Every selector takes ``log_fn``;
    ``log_fn=lambda m, step: [writer.add_scalar(k, v, step) for k, v in m.items()]``
    (TensorBoard) or ``log_fn=wandb.log`` (W&B) plug in as one line.

    Args:
        batch_size: b, samples to select from each meta-batch.
        seed: seed of the selector's own generator (independent of torch's global one).
        log_fn: optional ``(metrics: dict[str, float], step: int) -> None`` that
            :meth:`log_stats` calls.
    """

    def __init__(self, batch_size: int, seed: int = 0, log_fn: LogFn | None = None) -> None:
        self.batch_size = positive_int(batch_size, "batch_size (b)", "an integer >= 1")
        self.seed = integer(seed, "seed")
        self.step = 0
        self.log_fn = check_log_fn(log_fn)
        self.metrics = SelectionStats(seed=self.seed)
        self._generators: dict[str, torch.Generator] = {}
        self._pending_state: dict[str, torch.Tensor] = {}
        self.last_weights: torch.Tensor | None = None

    # -------------------------------------------------------------- helpers
    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        gen = self._generators.get(key)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            if key in self._pending_state:
                gen.set_state(self._pending_state.pop(key))
            self._generators[key] = gen
        return gen

    def _validate(self, ids: Any, losses: torch.Tensor,
                  k: int | None = None) -> torch.Tensor | None:
        """Check a meta-batch (and ``k``, the number to select; default ``batch_size``); returns
        ``ids`` as a tensor (numpy arrays and sequences of ints are accepted wherever tensors
        are)."""
        if ids is not None:
            ids = as_index(ids)
        if not isinstance(losses, torch.Tensor) or losses.dim() != 1:
            shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise ValueError(f"losses must be a 1-D tensor of per-sample losses "
                             f"(reduction='none'), got {shape}")
        if ids is not None and (ids.dim() != 1 or ids.numel() != losses.numel()):
            raise ValueError(f"ids has shape {tuple(ids.shape)} but losses has {losses.numel()} "
                             "elements: pass one id per loss, in the same order")
        n = losses.numel()
        k = self.batch_size if k is None else k
        if n == 0:
            raise ValueError("the meta-batch is empty (every sample of it was lost to "
                             "on_error='skip': see mb.lost_ids): skip it with "
                             "`if len(mb) == 0: continue` before computing losses")
        if k > n:
            raise ValueError(f"batch_size b={k} exceeds the meta-batch size B={n}: "
                             "use ESDataset(drop_last=True), or train on the whole meta-batch "
                             "when len(meta_batch) <= b")
        if losses.device.type == "cpu" and not bool(torch.isfinite(losses).all()):
            bad = int((~torch.isfinite(losses)).nonzero()[0])
            which = f" (sample id {int(ids[bad])})" if ids is not None else ""
            raise ValueError(f"losses: non-finite value {float(losses[bad])} at position {bad}"
                             f"{which}; fix the loss (NaN usually means divergence), "
                             "it cannot be a sampling weight")
        return ids

    def _keys(self, log_weights: torch.Tensor) -> torch.Tensor:
        """``log w + Gumbel(0, 1)`` per sample, from the selector's generator."""
        exp = torch.empty_like(log_weights, dtype=torch.float32).exponential_(
            generator=self._generator(log_weights.device))
        return log_weights.float() - exp.log()  # -log(Exp(1)) is Gumbel(0, 1)

    def _top_k(self, log_weights: torch.Tensor) -> torch.Tensor:
        """Gumbel-top-k: b indices drawn without replacement with p proportional to exp(log w)."""
        return self._keys(log_weights).topk(self.batch_size, sorted=False).indices

    def _observe(self, losses: torch.Tensor, uniform: bool = False) -> None:
        """Stats of a loss-ranking selector's step: b of the meta-batch, ranked by its losses,
        no loss weights, no store (so nothing is never scored)."""
        self.metrics.observe(samples=losses.numel(), selected=self.batch_size, uniform=uniform,
                             scores=losses.detach())

    # ------------------------------------------------------------ interface
    def select(self, ids: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        """Indices (into the meta-batch) of the b samples to back-propagate."""
        raise NotImplementedError

    def select_with_weights(self, ids: Any, losses: torch.Tensor, **kwargs: Any
                            ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`select` (``kwargs`` go to it), and the loss weight of each selected sample
        in the order of the indices (None: train on the plain mean). The weights are also left
        in :attr:`last_weights` until the next call."""
        chosen = self.select(ids, losses, **kwargs)
        return chosen, self.last_weights

    def stats(self) -> dict[str, float]:
        """What the selector did since it was built or last :meth:`reset_stats` (see
        :class:`es_stream.metrics.SelectionStats`); synchronises with the device once."""
        return self.metrics.compute()

    def reset_stats(self) -> None:
        """Start a new stats period (e.g. an epoch)."""
        self.metrics.reset()

    def log_stats(self, step: int | None = None, reset: bool = True) -> dict[str, float]:
        """:meth:`stats`, logged at INFO (logger ``es_stream``) and given to ``log_fn`` (keys
        prefixed ``es/``, at ``step``, default the selector's step); then, with ``reset``,
        :meth:`reset_stats`. Returns the stats (unprefixed)."""
        stats = self.stats()
        step = self.step if step is None else step
        emit(stats, step, self.log_fn, f"{type(self).__name__} step {step}", "es/")
        if reset:
            self.reset_stats()
        return stats

    def state_dict(self) -> dict[str, Any]:
        """Step, generator states and stats; a restored selector makes the same selections
        and reports the same stats (given the same scores: the store is restored apart)."""
        gens = {k: g.get_state() for k, g in self._generators.items()}
        gens.update({k: v for k, v in self._pending_state.items() if k not in gens})
        return {"step": self.step, "seed": self.seed, "generators": gens,
                "stats": self.metrics.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.seed = int(state["seed"])
        self._generators.clear()
        self._pending_state = dict(state["generators"])
        if "stats" in state:  # (states saved before the stats existed have none)
            self.metrics.load_state_dict(state["stats"])


class UniformSelector(Selector):
    """b samples uniformly at random without replacement — the random-selection control
    (forward on B, back-propagate a uniform b)."""

    def select(self, ids: torch.Tensor | None, losses: torch.Tensor) -> torch.Tensor:
        self._validate(ids, losses)
        self.step += 1
        self.last_weights = None
        self._observe(losses, uniform=True)  # the losses it was given, though it ignores them
        return self._top_k(torch.zeros_like(losses, dtype=torch.float32))


class LossSelector(Selector):
    """p proportional to the current loss (Loshchilov & Hutter 2015, "Online batch selection";
    ES with beta1 = 0 in Cheng et al. 2025). ``floor`` keeps zero losses reachable."""

    def __init__(self, batch_size: int, floor: float = 1e-8, seed: int = 0,
                 log_fn: LogFn | None = None) -> None:
        super().__init__(batch_size, seed, log_fn)
        if not floor > 0:
            raise ValueError(f"floor must be > 0, got {floor}")
        self.floor = floor

    def select(self, ids: torch.Tensor | None, losses: torch.Tensor) -> torch.Tensor:
        self._validate(ids, losses)
        self.step += 1
        self._observe(losses)
        return self._top_k(losses.detach().float().clamp_min(self.floor).log())


class TopKSelector(Selector):
    """The b largest losses, deterministically (hard-example mining; e.g. Shrivastava et al.
    2016, OHEM)."""

    def select(self, ids: torch.Tensor | None, losses: torch.Tensor) -> torch.Tensor:
        self._validate(ids, losses)
        self.step += 1
        self._observe(losses)
        return losses.detach().topk(self.batch_size, sorted=False).indices


class SelectiveBackpropSelector(Selector):
    """Selective backprop (Jiang et al. 2019, "Accelerating Deep Learning by Focusing on the
    Biggest Losers"), with the rule of Composer's ``SelectiveBackprop``
    (``composer.algorithms.selective_backprop.select_using_loss``): rank the losses, take each
    sample's percentile ``(rank + 0.5) / B``, and draw b without replacement with
    ``p ∝ percentile ** (1 / keep - 1)`` where ``keep = b / B``."""

    def select(self, ids: torch.Tensor | None, losses: torch.Tensor) -> torch.Tensor:
        self._validate(ids, losses)
        self.step += 1
        self._observe(losses)
        n = losses.numel()
        keep = self.batch_size / n
        rank = torch.empty_like(losses, dtype=torch.long)
        rank[losses.detach().argsort()] = torch.arange(n, device=losses.device)
        percentile = (rank.float() + 0.5) / n
        return self._top_k((1.0 / keep - 1.0) * percentile.log())


class ESSelector(Selector):
    """Evolved Sampling (Cheng, Li, Bian 2025, arXiv 2509.23461): the decoupled-EMA rule.

    For each sample i of the meta-batch, with score ``s`` kept per sample (initially 1/n)::

        w_i = beta1 * s_i + (1 - beta1) * l_i      # sampling weight
        s_i = beta2 * s_i + (1 - beta2) * l_i      # score, written back to the store

    then b of the B samples are drawn without replacement with ``p ∝ max(w, floor)``
    (mixed with uniform: ``p = (1 - uniform_mix) p + uniform_mix / B``; ours, off by default).
    During burn-in (the first ``burn_in * total_steps`` steps) and annealing (the last
    ``anneal * total_steps``) selection is uniform while scores still update (the paper mentions
    both; their lengths are ours to choose, default 0).

    **Importance weights** (``reweight``; ours, the paper trains on the plain mean). After each
    :meth:`select`, :attr:`last_weights` holds (and :meth:`select_with_weights` returns) one
    loss weight per selected sample (a tensor on
    the losses' device, in the order of the returned indices; None without ``reweight``), such
    that ``mean(weights * losses[chosen])`` estimates the meta-batch's mean loss:

    * ``"unbiased"``: ``w_i = b / (B q_i)`` with ``q_i = 1 - exp(-p_i exp(-kappa))``, the
      inclusion probability of sample i *given* ``kappa``, the (b+1)-th largest Gumbel key of
      the draw (Horvitz-Thompson with the conditional inclusion probability: Duffield, Lund and
      Thorup's priority sampling; Kool, van Hoof and Welling 2019, "Estimating gradients for
      discrete random variables by sampling without replacement"). Given the others' keys,
      sample i is drawn iff its key beats the b-th largest of theirs, which is then ``kappa``,
      so ``E[1{i drawn} / q_i] = 1`` exactly: **unbiased for the without-replacement draw**.
      (The unconditional inclusion probabilities of successive sampling have no closed form;
      this needs none.) Costs a top-(b+1) instead of a top-b, no host synchronisation.
    * ``"approx"`` (or ``True``, the earlier flag): ``w_i = 1 / (B p_i)``, the
      with-replacement approximation; unbiased only when b << B (it ignores that a drawn
      sample cannot be drawn again, so it over-weights low-p samples' share: see
      tests/test_variants.py).

    On uniform steps (burn-in, annealing) both give weight 1, the exact ``b / (B * b/B)``.

    **Fresh scores** (``fresh_steps=k``; ours): a sample whose score this selector updated
    within the last ``k`` steps is *fresh*: :meth:`stale` tells the caller which rows of a
    meta-batch need the scoring forward; the others may be left out of it and passed to
    :meth:`select` with ``forwarded`` False, where their stored score stands in for their loss
    (so ``w_i = s_i``, and their score and update step stay as they were: they turn stale ``k``
    steps after their last real update). A sample is seen once per epoch, so ``k`` of about
    one epoch of steps skips the scoring forward for about half of the samples of each epoch
    after the first. Memory: one int32 step per sample on the host (4 bytes/sample, allocated
    only when ``k > 0``). :meth:`stale` and the update bookkeeping want host ids (as the loader
    yields them): device ids cost a copy to the host, one synchronisation per step.

    **Variable b**: ``select(..., b=k)`` draws k instead of ``batch_size`` (see
    :class:`BatchSchedule`); :meth:`record` scores samples that were trained without a
    selection (e.g. when ``b == B``) from their training losses, with no scoring forward.

    Args:
        num_samples: n, corpus size (ids are in [0, n)).
        batch_size: b.
        store: a :class:`ScoreStore` to use (default: a new one on ``device``, CPU if None).
        feedback: how a host store meets losses on another device. ``"auto"`` (default): through
            a :class:`FeedbackChannel` (pinned staging, non-blocking copies, commits on CUDA
            events) when the losses' device differs from the store's, directly otherwise;
            ``"sync"``: always directly (blocking copies); ``"async"``: always through a channel
            (also on CPU, where it gives the same results as ``"sync"``).
        max_pending: uncommitted updates a channel may hold (see :class:`FeedbackChannel`).
        fingerprint: the corpus's ``Corpus.fingerprint``, if known: the store is bound to it
            (:meth:`ScoreStore.bind`), so a store of another corpus is refused and saved
            scores record their corpus.

    A store that fits on the GPU is best kept there (``device="cuda"``): no host traffic at all.
    For a host store (e.g. memory-mapped, 1e9 samples) call :meth:`prefetch` with the ids as
    soon as the loader yields a meta-batch, so its scores travel while the forward runs.

    ``select`` makes no host-device synchronisation when losses and store are on the GPU: ids
    are range-checked on the CPU, where the loader delivers them; non-finite losses on CUDA
    cannot be checked without a sync, so there they are caught by :meth:`check_finite`
    whenever the caller chooses to sync (the pipelines do it at evaluation time).
    """

    def __init__(self, num_samples: int, batch_size: int, beta1: float = 0.2, beta2: float = 0.8,
                 burn_in: float = 0.0, anneal: float = 0.0, total_steps: int | None = None,
                 floor: float = 1e-8, uniform_mix: float = 0.0, reweight: bool | str = False,
                 seed: int = 0, store: ScoreStore | None = None,
                 device: torch.device | str | None = None, feedback: str = "auto",
                 max_pending: int = 16, fingerprint: str | None = None,
                 fresh_steps: int = 0, log_fn: LogFn | None = None) -> None:
        super().__init__(batch_size, seed, log_fn)
        num_samples = positive_int(num_samples, "num_samples")
        for name, beta in (("beta1", beta1), ("beta2", beta2)):
            if not 0.0 <= beta <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {beta}")
        for name, frac in (("burn_in", burn_in), ("anneal", anneal), ("uniform_mix", uniform_mix)):
            if not 0.0 <= frac <= 1.0:
                raise ValueError(f"{name} must be a fraction in [0, 1], got {frac}")
        if burn_in + anneal > 1.0:
            raise ValueError(f"burn_in + anneal must be <= 1, got {burn_in} + {anneal}")
        if total_steps is not None:
            total_steps = positive_int(total_steps, "total_steps")
        if (burn_in > 0 or anneal > 0) and total_steps is None:
            raise ValueError("total_steps (a positive int) is needed when burn_in or anneal > 0, "
                             f"got {total_steps!r}")
        if not floor > 0:
            raise ValueError(f"floor must be > 0, got {floor}")
        if feedback not in ("auto", "sync", "async"):
            raise ValueError(f"feedback must be 'auto', 'sync' or 'async', got {feedback!r}")
        max_pending = positive_int(max_pending, "max_pending", "an integer >= 1")
        reweight = _reweight_mode(reweight)
        fresh_steps = integer(fresh_steps, "fresh_steps")
        if fresh_steps < 0:
            raise ValueError(f"fresh_steps must be >= 0 (0: every sample is forwarded), "
                             f"got {fresh_steps}")
        if store is not None and not isinstance(store, ScoreStore):
            raise TypeError(f"store must be an es_stream.ScoreStore, got {type(store).__name__}")
        if store is not None and store.num_samples != num_samples:
            raise ValueError(f"store holds {store.num_samples} scores but num_samples={num_samples}")
        self.num_samples = num_samples
        self.beta1, self.beta2 = float(beta1), float(beta2)
        self.burn_in, self.anneal, self.total_steps = burn_in, anneal, total_steps
        self.floor, self.uniform_mix, self.reweight = floor, uniform_mix, reweight
        self.store = store if store is not None else ScoreStore(num_samples, device=device)
        if fingerprint is not None:
            self.store.bind(fingerprint)  # refuses a store of another corpus
        self.feedback, self.max_pending = feedback, max_pending
        self._nonfinite: torch.Tensor | None = None
        self.fresh_steps = fresh_steps
        # step of each sample's last real update (-1: none), on the host: see "Fresh scores"
        self._last_update = (torch.full((num_samples,), -1, dtype=torch.int32)
                             if fresh_steps else None)
        # which rows of the last update()'s meta-batch had never been scored (for the stats)
        self.last_never_scored: torch.Tensor | None = None

    def channel(self, device: torch.device | str) -> FeedbackChannel | None:
        """The feedback channel that serves losses on ``device`` (None: direct access); the
        store's own (:meth:`ScoreStore.channel`), shared with every other user of the store."""
        return feedback_channel(self.store, device, self.feedback, self.max_pending)

    def prefetch(self, ids: torch.Tensor, device: torch.device | str) -> None:
        """Start moving the scores of the next meta-batch's (host) ``ids`` to ``device``, where
        its losses will be; a no-op when no channel is needed."""
        channel = self.channel(device)
        if channel is not None:
            channel.prefetch(as_index(ids))

    def flush(self) -> None:
        """Commit every in-flight score update to the store (waits for the device)."""
        self.store.commit_in_flight()

    def is_uniform_step(self, step: int | None = None) -> bool:
        """Whether ``step`` (default: the next one) falls in burn-in or annealing."""
        step = self.step if step is None else step
        if self.total_steps is None:
            return False
        return step < self.burn_in * self.total_steps or step >= (1 - self.anneal) * self.total_steps

    def update(self, ids: torch.Tensor, losses: torch.Tensor,
               forwarded: torch.Tensor | None = None) -> torch.Tensor:
        """Apply the ES rule to the meta-batch's scores; return the sampling weights ``w``.
        With ``forwarded`` (a boolean mask), rows where it is False take their stored score as
        their loss and keep their score (see "Fresh scores")."""
        ids = as_index(ids)
        self.store.check_ids(ids)
        if ids.device.type == "cpu" and ids.numel() != torch.unique(ids).numel():
            raise ValueError("ids: a meta-batch repeats a sample id; each id may appear once")
        l = losses.detach().float()
        channel = self.channel(l.device)
        if channel is None:
            s = self.store.gather(ids, checked=True).to(l.device, non_blocking=True)
        else:
            s = channel.fetch(ids)
        # never scored reads as exactly the initial 1/n (see ScoreStore); a device comparison
        self.last_never_scored = s == self.store.initial
        fwd = None
        if forwarded is not None:
            fwd = torch.as_tensor(forwarded, dtype=torch.bool).to(l.device, non_blocking=True)
            l = torch.where(fwd, l, s)
        w = self.beta1 * s + (1.0 - self.beta1) * l
        new_scores = self.beta2 * s + (1.0 - self.beta2) * l
        if fwd is not None:  # exactly the stored score (beta2 s + (1 - beta2) s may round)
            new_scores = torch.where(fwd, new_scores, s)
        self._mark_updated(ids, forwarded)
        if channel is None:
            self.store.scatter(ids, new_scores, checked=True)
        else:
            channel.commit(ids, new_scores)
        if l.device.type != "cpu":  # remember, without syncing, whether any loss was bad
            bad = (~torch.isfinite(l)).any()
            self._nonfinite = bad if self._nonfinite is None else self._nonfinite | bad
        return w

    def select(self, ids: torch.Tensor, losses: torch.Tensor, *, b: int | None = None,
               forwarded: torch.Tensor | None = None) -> torch.Tensor:
        """Update the meta-batch's scores and draw ``b`` (default ``batch_size``) of it; the
        indices, on the losses' device. ``forwarded``: see "Fresh scores" (rows where it is
        False: ``losses`` there is ignored)."""
        k = self.batch_size if b is None else positive_int(b, "b", "an integer >= 1")
        ids = self._validate(ids, losses, k)
        w = self.update(ids, losses, forwarded)
        uniform = self.is_uniform_step()
        self.step += 1
        n = w.numel()
        if uniform:
            log_p = torch.full_like(w, -math.log(n))
        else:
            p = w.clamp_min(self.floor)
            p = p / p.sum()
            if self.uniform_mix > 0:
                p = (1.0 - self.uniform_mix) * p + self.uniform_mix / n
            log_p = p.log()
        chosen = self._draw(log_p, k, uniform)
        self.metrics.observe(samples=n, selected=k, uniform=uniform, scores=w,
                             weights=self.last_weights, never_scored=self.last_never_scored)
        return chosen

    def _draw(self, log_p: torch.Tensor, k: int, uniform: bool) -> torch.Tensor:
        """k of the meta-batch with ``p = exp(log_p)``; sets :attr:`last_weights`."""
        n = log_p.numel()
        if self.reweight != "unbiased":
            chosen = self._keys(log_p).topk(k, sorted=False).indices
            self.last_weights = (1.0 / (n * log_p[chosen].exp())) if self.reweight else None
            return chosen
        if k == n:  # everything is drawn: inclusion probability 1
            chosen = torch.arange(n, device=log_p.device)
            self.last_weights = torch.ones(n, device=log_p.device)
            return chosen
        top = self._keys(log_p).topk(k + 1)  # sorted: the last is kappa, the (b+1)-th key
        chosen, kappa = top.indices[:k], top.values[k]
        if uniform:
            self.last_weights = torch.ones(k, device=log_p.device)
        else:  # q_i = 1 - exp(-p_i e^-kappa) = P(key_i > kappa)
            q = -torch.expm1(-torch.exp(log_p[chosen] - kappa))
            self.last_weights = k / (n * q)
        return chosen

    def record(self, ids: torch.Tensor, losses: torch.Tensor) -> None:
        """Score samples trained *without* a selection (a meta-batch trained whole, e.g. at
        ``b == B``, or a loop that never selects) from their training ``losses`` (detached):
        the ES rule's update, no scoring forward. Counts as a step."""
        ids = self._validate(ids, losses, 0)
        w = self.update(ids, losses)
        self.step += 1
        self.last_weights = None
        self.metrics.observe(samples=w.numel(), selected=w.numel(), uniform=True, scores=w,
                             never_scored=self.last_never_scored)

    def stale(self, ids: Any) -> torch.Tensor:
        """Which rows of ``ids`` need a scoring forward: a boolean mask on the host, True for a
        sample whose score this selector has not updated within the last ``fresh_steps`` steps
        (all True when ``fresh_steps`` is 0). See "Fresh scores"."""
        ids = as_index(ids)
        if self._last_update is None:
            return torch.ones(ids.numel(), dtype=torch.bool)
        ids = ids.cpu()  # a synchronisation if they were on a device (see the class docstring)
        self.store.check_ids(ids)
        last = self._last_update[ids].long()
        return (last < 0) | (self.step - last > self.fresh_steps)

    def _mark_updated(self, ids: torch.Tensor, forwarded: torch.Tensor | None) -> None:
        if self._last_update is None:
            return
        rows = ids.cpu()
        if forwarded is not None:
            rows = rows[torch.as_tensor(forwarded, dtype=torch.bool).cpu()]
        self._last_update[rows] = self.step

    def check_finite(self) -> None:
        """Raise if any loss given on a GPU since the last check was NaN or infinite (syncs)."""
        if self._nonfinite is not None:
            bad, self._nonfinite = bool(self._nonfinite), None
            if bad:
                raise ValueError("losses: a non-finite loss reached ESSelector.select on the GPU "
                                 "since the last check; fix the loss (NaN usually means divergence)")

    def state_dict(self, **deprecated: Any) -> dict[str, Any]:
        """Step, generators, stats, the ids updated since the last rank merge and the fresh-score
        steps; never the scores (the store's own state, :meth:`ScoreStore.state_dict`, saved
        beside by :class:`es_stream.TrainingState` / :class:`es_stream.Checkpointer`).
        In-flight updates are committed first.

        ``with_store=True`` (deprecated) still adds a copy of the scores under ``"store"``;
        save ``self.store`` instead."""
        with_store = deprecated_with_store(type(self).__name__, deprecated)
        self.flush()
        state = super().state_dict()
        state["updated_ids"] = self.store.update_log_state()
        if self._last_update is not None:
            state["last_update"] = self._last_update.clone()
        if with_store:
            state["store"] = self.store.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore step and generators, the update log (and the scores when an older state holds
        them: states no longer do)."""
        super().load_state_dict(state)
        self.flush()  # in-flight updates must not land on top of the restored scores
        if "store" in state:
            self.store.load_state_dict(state["store"])
        if "updated_ids" in state:
            self.store.load_update_log_state(state["updated_ids"])
        if self._last_update is not None and "last_update" in state:
            self._last_update = torch.as_tensor(state["last_update"], dtype=torch.int32).clone()


def feedback_channel(store: ScoreStore, device: torch.device | str, feedback: str,
                     max_pending: int) -> FeedbackChannel | None:
    """The channel through which losses on ``device`` meet ``store`` (its own,
    :meth:`ScoreStore.channel`), or None for direct access: ``feedback="sync"``, a store on a
    device, or (``"auto"``) losses on the store's own device."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if feedback == "sync" or store.device.type != "cpu" or (
            feedback == "auto" and device == store.device):
        return None
    return store.channel(device, max_pending)


def deprecated_with_store(owner: str, deprecated: dict[str, Any]) -> bool:
    """The ``with_store`` a caller still passes to ``state_dict`` (False when absent), with a
    :class:`DeprecationWarning`; any other argument is a :class:`TypeError`."""
    unknown = sorted(set(deprecated) - {"with_store"})
    if unknown:
        raise TypeError(f"{owner}.state_dict() takes no arguments, got {unknown}")
    if "with_store" not in deprecated:
        return False
    warnings.warn(f"{owner}.state_dict(with_store=...) is deprecated: the state never holds the "
                  "score store now; call state_dict() and save the store on its own "
                  "(store.state_dict(), or es_stream.TrainingState / Checkpointer, which save it "
                  "once)", DeprecationWarning, stacklevel=3)
    return bool(deprecated["with_store"])


def _reweight_mode(reweight: Any) -> bool | str:
    """``reweight`` as False, ``"approx"`` or ``"unbiased"`` (True is ``"approx"``)."""
    if reweight is False or reweight is None:
        return False
    if reweight is True:
        return "approx"
    if reweight in ("approx", "unbiased"):
        return reweight
    raise ValueError(f"reweight must be False, 'unbiased' or 'approx' (True), got {reweight!r}")


# b schedules moved to their own module; importable from here as before
from .batch_schedule import BatchSchedule  # noqa: E402,F401
