"""Selection and pruning metrics: :class:`SelectionStats` (what a selector did since its last
reset, accumulated on the selector's device without per-step host synchronisation) and
:func:`emit`, the one place metrics leave es-stream: the ``es_stream`` logger at INFO and an
optional ``log_fn(metrics, step)`` hook.

``log_fn`` takes a ``dict[str, float]`` whose keys carry their namespace (``es/...`` for a
selector's stats, ``es/prune/...`` for a pruning decision) and an ``int`` step (the selector's
step; the epoch decided, for the pruner). No logging library is imported here; each plugs in as
one line::

    # TensorBoard (torch.utils.tensorboard.SummaryWriter or tensorboardX)
    log_fn = lambda metrics, step: [writer.add_scalar(k, v, step) for k, v in metrics.items()]
    # Weights & Biases: wandb.log(data, step) has this signature already
    log_fn = wandb.log
    # Weights & Biases, when ES's steps are not the run's steps (W&B refuses a step that goes back)
    log_fn = lambda metrics, step: wandb.log(metrics)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["LogFn", "SelectionStats", "emit"]

log = logging.getLogger("es_stream")

LogFn = Callable[[dict[str, float], int], None]

RESERVOIR = 4096  # values kept per quantity for the quantiles: ~32 KB of device memory each
PER_STEP = 256    # values of one meta-batch offered to a reservoir (evenly strided beyond it)


def _thin(values: torch.Tensor) -> torch.Tensor:
    """At most :data:`PER_STEP` of a step's values, every ``ceil(n / PER_STEP)``-th: a step's
    quantile sample costs O(PER_STEP) whatever B is (B = 4096: 178 -> ~60 us per step on CPU).
    The stride spans the whole meta-batch, whose order carries no score order (shuffled ids for
    scores; for weights, the selection's order), so the thinned values are a stratified sample."""
    n = values.numel()
    return values if n <= PER_STEP else values.reshape(-1)[::-(-n // PER_STEP)]


def check_log_fn(log_fn: Any) -> LogFn | None:
    """``log_fn`` if callable or None; a TypeError naming the argument otherwise."""
    if log_fn is not None and not callable(log_fn):
        raise TypeError(f"log_fn must be a callable (metrics: dict[str, float], step: int) -> None "
                        f"or None, got {type(log_fn).__name__}")
    return log_fn


def emit(metrics: dict[str, float], step: int, log_fn: LogFn | None, what: str | None,
         prefix: str) -> dict[str, float]:
    """Log ``metrics`` at INFO on the ``es_stream`` logger (``what`` says whose, e.g.
    ``"ESSelector step 120"``; None: the caller logs its own line) and hand them, keys prefixed
    by ``prefix``, to ``log_fn``. Returns the prefixed dict."""
    named = {f"{prefix}{k}": float(v) for k, v in metrics.items()}
    if what is not None and log.isEnabledFor(logging.INFO):
        log.info("%s: %s", what, ", ".join(f"{k}={v:.6g}" for k, v in metrics.items()))
    if log_fn is not None:
        log_fn(named, int(step))
    return named


class _Reservoir:
    """A uniform random sample, without replacement, of at most ``capacity`` of the values
    added so far (priority sampling: every value gets a uniform random key, the ``capacity``
    largest keys stay), kept on the values' device. Exact while fewer values than ``capacity``
    were added. Values are appended to a buffer of ``4 * capacity`` and cut back to the
    ``capacity`` largest keys only when it fills (one top-k every few steps, not one per step);
    shapes depend only on host-known counts: no synchronisation."""

    def __init__(self, capacity: int, seed: int) -> None:
        self.capacity, self.seed = capacity, seed
        self.seen = 0  # values added (host count)
        self.values: torch.Tensor | None = None  # the buffer; rows [0, fill) are in use
        self.keys: torch.Tensor | None = None
        self.fill = 0
        self._gen: torch.Generator | None = None
        self._gen_state: torch.Tensor | None = None

    def _generator(self, device: torch.device) -> torch.Generator:
        if self._gen is None or self._gen.device != device:
            self._gen = torch.Generator(device=device)
            self._gen.manual_seed(self.seed)
            if self._gen_state is not None:
                self._gen.set_state(self._gen_state)
                self._gen_state = None
        return self._gen

    def add(self, values: torch.Tensor) -> None:
        values = values.detach().reshape(-1).float()
        m = values.numel()
        if m == 0:
            return
        self.seen += m
        # own generator: the selector's draws are the same with or without the stats
        keys = torch.rand(m, device=values.device, generator=self._generator(values.device))
        size = 4 * self.capacity
        if self.values is None or self.values.device != values.device:
            old_v, old_k = self._used()
            self.values = torch.empty(size, device=values.device)
            self.keys = torch.empty(size, device=values.device)
            self.fill = 0
            if old_v is not None:
                self._put(old_v.to(values.device), old_k.to(values.device))
        if self.fill + m > size:  # full: keep the capacity largest keys of all, then append
            v, k = self._used()
            v, k = self._top(torch.cat([v, values]), torch.cat([k, keys]))
            self.fill = 0
            self._put(v, k)
            return
        self._put(values, keys)

    def _put(self, values: torch.Tensor, keys: torch.Tensor) -> None:
        if values.numel() > self.values.numel():
            values, keys = self._top(values, keys)
        end = self.fill + values.numel()
        self.values[self.fill:end] = values
        self.keys[self.fill:end] = keys
        self.fill = end

    def _top(self, values: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if values.numel() <= self.capacity:
            return values, keys
        top = keys.topk(self.capacity, sorted=False).indices
        return values[top], keys[top]

    def _used(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.values is None:
            return None, None
        return self.values[:self.fill], self.keys[:self.fill]

    def sample(self) -> torch.Tensor | None:
        """The values kept: the ``capacity`` with the largest keys (all, while fewer)."""
        v, k = self._used()
        if v is None or v.numel() == 0:
            return None
        return self._top(v, k)[0]

    def quantiles(self, qs: tuple[float, ...]) -> list[float]:
        sample = self.sample()
        if sample is None:
            return [math.nan] * len(qs)
        q = torch.tensor(qs, dtype=torch.float64, device=sample.device)
        return torch.quantile(sample.double(), q).tolist()  # the one sync

    def state_dict(self) -> dict[str, Any]:
        gen = self._gen.get_state() if self._gen is not None else self._gen_state
        v, k = self._used()
        return {"values": None if v is None else v.clone(), "keys": None if k is None else k.clone(),
                "seen": self.seen, "generator": gen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.values = self.keys = None
        self.fill, self.seen = 0, int(state.get("seen", 0))
        self._gen, self._gen_state = None, state["generator"]
        if state["values"] is not None:
            v, k = state["values"], state["keys"]
            self.values = torch.empty(4 * self.capacity, device=v.device)
            self.keys = torch.empty(4 * self.capacity, device=v.device)
            self._put(v, k)


def _median_with_ones(sample: torch.Tensor | None, seen: int, ones: int) -> float:
    """Median of ``seen`` values represented by ``sample`` and ``ones`` values equal to 1: the
    weighted median (each sampled value stands for ``seen / len(sample)`` values)."""
    if sample is None:
        return 1.0 if ones else math.nan
    values, order = torch.sort(torch.cat([sample.double(), sample.new_ones(1, dtype=torch.float64)]))
    mass = torch.cat([torch.full_like(sample, seen / sample.numel(), dtype=torch.float64),
                      torch.tensor([float(ones)], dtype=torch.float64, device=sample.device)])[order]
    cum = mass.cumsum(0)
    return float(values[int(torch.searchsorted(cum, cum[-1] / 2))])


class SelectionStats:
    """What a selector did since it was built or last :meth:`reset` (cumulative in between, like
    a torchmetrics metric's ``update``/``compute``/``reset``; the Composer algorithm and the
    training loop reset at each epoch end, so their stats are per epoch).

    :meth:`observe` is called once per meta-batch by the selector; it only queues device work
    (counts stay on the host, where they are known, sums and extremes on the device), so a step
    never waits on the GPU. :meth:`compute` reads everything back: that is the one
    synchronisation. Quantiles come from a uniform random sample of at most ``capacity`` values
    per quantity (a priority-sampling reservoir on the device, see :class:`_Reservoir`) of the
    values each step offers it (all of a meta-batch up to :data:`PER_STEP`, evenly strided
    beyond): exact while fewer values were seen, a sample of them after; min and max are exact.

    Keys of :meth:`compute` (NaN where nothing was observed):

    * ``steps``: meta-batches seen; ``uniform_steps``: those drawn uniformly (burn-in,
      annealing, or a meta-batch trained whole, e.g. ``ESSelector.record``);
    * ``samples_seen``: samples in those meta-batches (B each); ``samples_selected``: samples
      selected (b each); ``selected_fraction``: ``samples_selected / samples_seen``;
    * ``first_visit_fraction``: share of ``samples_seen`` (since the last reset) whose score had
      never been set when their meta-batch arrived — first visits (for an ES store: a score
      that read as the store's initial ``1/n``). It counts visits in the period, not the
      corpus: over an epoch of first visits it is 1, over the next 0, and over both together
      (stats never reset) 0.5, although every sample has been scored. Reset each epoch
      (``log_stats()`` does; ``EvolvedSampling`` does) to read it per epoch; how many samples
      of the corpus were never scored is the pruning summary's ``never_scored``.
      ``never_scored_fraction``: the same value under its earlier name, kept so existing
      dashboards and code keep working;
    * ``weight_min``, ``weight_p50``, ``weight_max``: the loss weights handed out with the
      selected samples (``last_weights``; 1 for each selected sample when there are none,
      counted on the host rather than stored; when both kinds occur, ``weight_p50`` is the
      weighted median of the weights' sample and the ones);
    * ``score_p10``, ``score_p50``, ``score_p90``: the scores the selection ranked, one per
      sample of each meta-batch (ES: the sampling weight ``w``; top-k rules: what they rank).
    """

    QUANTILES = (0.1, 0.5, 0.9)

    def __init__(self, capacity: int = RESERVOIR, seed: int = 0) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity, self.seed = capacity, seed
        self.reset()

    def reset(self) -> None:
        """Forget everything observed (start a new period, e.g. an epoch)."""
        self.steps = self.uniform_steps = self.samples = self.selected = 0
        self._never: torch.Tensor | int = 0  # a device count once observed on a device
        self._wmin: torch.Tensor | None = None
        self._wmax: torch.Tensor | None = None
        self._unit_weights = 0  # selected samples handed no weight (1 each): counted, not stored
        self._weights = _Reservoir(self.capacity, self.seed * 2 + 1)
        self._scores = _Reservoir(self.capacity, self.seed * 2 + 2)

    def observe(self, *, samples: int, selected: int, uniform: bool, scores: torch.Tensor,
                weights: torch.Tensor | None = None,
                never_scored: torch.Tensor | None = None) -> None:
        """One meta-batch of ``samples`` of which ``selected`` were chosen; ``scores``: what the
        selection ranked (one per sample); ``weights``: the loss weights handed out (None: all
        1); ``never_scored``: a boolean mask of samples never scored before (None: none)."""
        self.steps += 1
        self.uniform_steps += int(uniform)
        self.samples += int(samples)
        self.selected += int(selected)
        if never_scored is not None:
            self._never = self._never + never_scored.sum()
        if weights is None:
            self._unit_weights += int(selected)
        elif weights.numel():
            w = weights.detach().float()
            lo, hi = w.min(), w.max()
            self._wmin = lo if self._wmin is None else torch.minimum(self._wmin, lo.to(self._wmin.device))
            self._wmax = hi if self._wmax is None else torch.maximum(self._wmax, hi.to(self._wmax.device))
            self._weights.add(_thin(w))
        self._scores.add(_thin(scores))

    def compute(self) -> dict[str, float]:
        """The stats (see the class docstring); synchronises with the device once."""
        nan = math.nan
        never = float(self._never)
        out = {"steps": float(self.steps), "uniform_steps": float(self.uniform_steps),
               "samples_seen": float(self.samples), "samples_selected": float(self.selected),
               "selected_fraction": self.selected / self.samples if self.samples else nan,
               "first_visit_fraction": never / self.samples if self.samples else nan,
               "never_scored_fraction": never / self.samples if self.samples else nan,
               **self._weight_stats()}
        for q, v in zip(self.QUANTILES, self._scores.quantiles(self.QUANTILES)):
            out[f"score_p{round(q * 100)}"] = v
        return out

    def _weight_stats(self) -> dict[str, float]:
        lo = float(self._wmin) if self._wmin is not None else math.inf
        hi = float(self._wmax) if self._wmax is not None else -math.inf
        if self._unit_weights:
            lo, hi = min(lo, 1.0), max(hi, 1.0)
        if self._unit_weights == 0:
            p50 = self._weights.quantiles((0.5,))[0]
        else:  # some steps handed out no weights (1 each) among weighted ones
            p50 = _median_with_ones(self._weights.sample(), self._weights.seen, self._unit_weights)
        if math.isinf(lo):
            lo = hi = math.nan
        return {"weight_min": lo, "weight_p50": p50, "weight_max": hi}

    def state_dict(self) -> dict[str, Any]:
        """Everything observed, so a resumed run reports what an uninterrupted one would."""
        return {"steps": self.steps, "uniform_steps": self.uniform_steps, "samples": self.samples,
                "selected": self.selected, "never": self._never, "wmin": self._wmin,
                "wmax": self._wmax, "unit_weights": self._unit_weights,
                "weights": self._weights.state_dict(),
                "scores": self._scores.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("steps", "uniform_steps", "samples", "selected"):
            setattr(self, key, int(state[key]))
        self._never, self._wmin, self._wmax = state["never"], state["wmin"], state["wmax"]
        self._unit_weights = int(state.get("unit_weights", 0))
        self._weights.load_state_dict(state["weights"])
        self._scores.load_state_dict(state["scores"])
