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
    were added. Shapes depend only on host-known counts: no synchronisation."""

    def __init__(self, capacity: int, seed: int) -> None:
        self.capacity, self.seed = capacity, seed
        self.values: torch.Tensor | None = None
        self.keys: torch.Tensor | None = None
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
        if values.numel() == 0:
            return
        # own generator: the selector's draws are the same with or without the stats
        keys = torch.rand(values.numel(), device=values.device,
                          generator=self._generator(values.device))
        if self.values is not None:
            values = torch.cat([self.values.to(values.device), values])
            keys = torch.cat([self.keys.to(values.device), keys])
        if values.numel() > self.capacity:
            top = keys.topk(self.capacity, sorted=False).indices
            values, keys = values[top], keys[top]
        self.values, self.keys = values, keys

    def quantiles(self, qs: tuple[float, ...]) -> list[float]:
        if self.values is None:
            return [math.nan] * len(qs)
        q = torch.tensor(qs, dtype=torch.float64, device=self.values.device)
        return torch.quantile(self.values.double(), q).tolist()  # the one sync

    def state_dict(self) -> dict[str, Any]:
        gen = self._gen.get_state() if self._gen is not None else self._gen_state
        return {"values": self.values, "keys": self.keys, "generator": gen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.values, self.keys = state["values"], state["keys"]
        self._gen, self._gen_state = None, state["generator"]


class SelectionStats:
    """What a selector did since it was built or last :meth:`reset` (cumulative in between, like
    a torchmetrics metric's ``update``/``compute``/``reset``; the Composer algorithm and the
    training loop reset at each epoch end, so their stats are per epoch).

    :meth:`observe` is called once per meta-batch by the selector; it only queues device work
    (counts stay on the host, where they are known, sums and extremes on the device), so a step
    never waits on the GPU. :meth:`compute` reads everything back: that is the one
    synchronisation. Quantiles come from a uniform random sample of at most ``capacity`` values
    per quantity (a priority-sampling reservoir on the device, see :class:`_Reservoir`): exact
    while fewer values were seen, an unbiased sample of them after; min and max are exact.

    Keys of :meth:`compute` (NaN where nothing was observed):

    * ``steps``: meta-batches seen; ``uniform_steps``: those drawn uniformly (burn-in,
      annealing, or a meta-batch trained whole, e.g. ``ESSelector.record``);
    * ``samples_seen``: samples in those meta-batches (B each); ``samples_selected``: samples
      selected (b each); ``selected_fraction``: ``samples_selected / samples_seen``;
    * ``never_scored_fraction``: share of ``samples_seen`` whose score had never been set when their
      meta-batch arrived (for an ES store: a score that read as the store's initial ``1/n``);
    * ``weight_min``, ``weight_p50``, ``weight_max``: the loss weights handed out with the
      selected samples (``last_weights``; 1 for each selected sample when there are none);
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
        device = scores.device
        if never_scored is not None:
            self._never = self._never + never_scored.sum()
        w = (weights.detach().float() if weights is not None
             else torch.ones(int(selected), device=device))
        if w.numel():
            lo, hi = w.min(), w.max()
            self._wmin = lo if self._wmin is None else torch.minimum(self._wmin, lo.to(self._wmin.device))
            self._wmax = hi if self._wmax is None else torch.maximum(self._wmax, hi.to(self._wmax.device))
        self._weights.add(w)
        self._scores.add(scores)

    def compute(self) -> dict[str, float]:
        """The stats (see the class docstring); synchronises with the device once."""
        nan = math.nan
        never = float(self._never)
        out = {"steps": float(self.steps), "uniform_steps": float(self.uniform_steps),
               "samples_seen": float(self.samples), "samples_selected": float(self.selected),
               "selected_fraction": self.selected / self.samples if self.samples else nan,
               "never_scored_fraction": never / self.samples if self.samples else nan,
               "weight_min": float(self._wmin) if self._wmin is not None else nan,
               "weight_p50": self._weights.quantiles((0.5,))[0],
               "weight_max": float(self._wmax) if self._wmax is not None else nan}
        for q, v in zip(self.QUANTILES, self._scores.quantiles(self.QUANTILES)):
            out[f"score_p{round(q * 100)}"] = v
        return out

    def state_dict(self) -> dict[str, Any]:
        """Everything observed, so a resumed run reports what an uninterrupted one would."""
        return {"steps": self.steps, "uniform_steps": self.uniform_steps, "samples": self.samples,
                "selected": self.selected, "never": self._never, "wmin": self._wmin,
                "wmax": self._wmax, "weights": self._weights.state_dict(),
                "scores": self._scores.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("steps", "uniform_steps", "samples", "selected"):
            setattr(self, key, int(state[key]))
        self._never, self._wmin, self._wmax = state["never"], state["wmin"], state["wmax"]
        self._weights.load_state_dict(state["weights"])
        self._scores.load_state_dict(state["scores"])
