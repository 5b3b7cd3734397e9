"""Reducible-loss selection (RHO-LOSS; Mindermann et al., ICML 2022; ``docs/REFERENCE.md``):
from a meta-batch of B, back-propagate the b samples whose training loss most exceeds a
reference model's loss on them, ``reducible_i = loss_i - reference_i``."""

from __future__ import annotations

from typing import Any

import torch

from .reference_policy import refuse_never_scored
from .metrics import LogFn
from .reference_scoring import require_complete
from .selector import ESSelector, Selector, deprecated_with_store, feedback_channel
from .store import ScoreStore, as_index

__all__ = ["ReducibleLossSelector"]


class ReducibleLossSelector(Selector):
    """Pick b of B by reducible loss ``loss - reference[ids]``, with ``reference`` a
    :class:`ScoreStore` of reference-model losses (``es-stream score``).

    Rules:

    * ``"topk"`` (RHO-LOSS as published): the b largest reducible losses, deterministically.
    * ``"es"``: Evolved Sampling's rule (:class:`ESSelector`: decoupled EMA scores, Gumbel-top-k
      draw without replacement) applied to the reducible loss instead of the loss. It is an
      ESSelector fed reducible losses (composition: ``es_kwargs`` — ``beta1``, ``beta2``,
      ``burn_in``, ``anneal``, ``total_steps``, ``floor``, ``uniform_mix``, ``reweight``,
      ``store``, ``device`` — go to it); its own store (:attr:`store`) holds the EMA of the
      reducible loss. Reducible losses may be negative: sampling weights below ``floor`` are
      raised to it, as in ESSelector.

    Same interface, state and GPU behaviour as :class:`ESSelector`: ``select(ids, losses)``
    returns indices into the meta-batch on ``losses.device``; the reference scores are gathered
    on the reference store's device, or, for a host (e.g. memory-mapped) reference and GPU
    losses, through a :class:`FeedbackChannel` (pinned, non-blocking; call :meth:`prefetch` with
    the ids when the loader yields the meta-batch): no host synchronisation per step.

    The reference must be complete and every sample scored (checked once here, one pass over the
    store; a :class:`~es_stream.ScoreError` names the store and the first missing id). With
    ``fingerprint`` (the corpus's ``Corpus.fingerprint``) a reference of another corpus is
    refused (:meth:`ScoreStore.bind`).

    **Stats** (:meth:`stats`, :meth:`log_stats`, ``log_fn``: as :class:`ESSelector`): the
    scores are the reducible losses ranked (``"topk"``; its ``never_scored_fraction`` is 0, the
    reference being complete) or the ES rule's sampling weights of them (``"es"``, whose
    ESSelector keeps the stats).
    """

    def __init__(self, reference: ScoreStore, batch_size: int, rule: str = "topk", *,
                 fingerprint: str | None = None, seed: int = 0, feedback: str = "auto",
                 max_pending: int = 16, log_fn: LogFn | None = None,
                 **es_kwargs: Any) -> None:
        super().__init__(batch_size, seed, log_fn)
        if not isinstance(reference, ScoreStore):
            raise TypeError(f"reference must be an es_stream.ScoreStore of reference losses "
                            f"(es-stream score), got {type(reference).__name__}")
        if rule not in ("topk", "es"):
            raise ValueError(f"rule must be 'topk' (RHO-LOSS) or 'es' (the ES rule on the "
                             f"reducible loss), got {rule!r}")
        if rule == "topk" and es_kwargs:
            raise TypeError(f"rule='topk' takes no ES arguments, got {sorted(es_kwargs)}; "
                            "use rule='es' for them")
        if fingerprint is not None:
            reference.bind(fingerprint)  # refuses a reference of another corpus
        require_complete(reference, "ReducibleLossSelector")
        refuse_never_scored(reference.scored_range, reference.num_samples,
                            reference.describe(), "they have no reference loss: score the whole "
                            "corpus first (es-stream score)")
        self.reference, self.rule, self.feedback = reference, rule, feedback
        self.max_pending = max_pending
        self.es: ESSelector | None = None
        if rule == "es":
            self.es = ESSelector(reference.num_samples, batch_size, seed=seed, feedback=feedback,
                                 max_pending=max_pending, fingerprint=fingerprint, **es_kwargs)
            self.metrics = self.es.metrics  # one record of the steps, kept where they happen

    @property
    def num_samples(self) -> int:
        return self.reference.num_samples

    @property
    def store(self) -> ScoreStore | None:
        """The ES scores of the reducible loss (rule ``"es"``); None for ``"topk"``."""
        return None if self.es is None else self.es.store

    # ------------------------------------------------------------- reference reads
    def prefetch(self, ids: Any, device: torch.device | str) -> None:
        """Start moving the reference scores (and, for ``"es"``, the ES scores) of the next
        meta-batch's host ``ids`` to ``device``."""
        ids = as_index(ids)
        channel = feedback_channel(self.reference, device, self.feedback, self.max_pending)
        if channel is not None:
            channel.prefetch(ids)
        if self.es is not None:
            self.es.prefetch(ids, device)

    def reducible(self, ids: Any, losses: torch.Tensor) -> torch.Tensor:
        """``losses - reference[ids]`` on ``losses.device`` (float32, detached)."""
        ids = as_index(ids)
        self.reference.check_ids(ids)
        l = losses.detach().float()
        channel = feedback_channel(self.reference, l.device, self.feedback, self.max_pending)
        if channel is None:
            ref = self.reference.gather(ids, checked=True).to(l.device, non_blocking=True)
        else:
            ref = channel.fetch(ids)
        return l - ref

    # ------------------------------------------------------------- selection
    def select(self, ids: Any, losses: torch.Tensor) -> torch.Tensor:
        """Indices (into the meta-batch) of the b samples to back-propagate."""
        ids = self._validate(ids, losses)
        if ids is None:
            raise ValueError("ids: ReducibleLossSelector needs the meta-batch's sample ids "
                             "(MetaBatch.ids) to look up the reference losses")
        r = self.reducible(ids, losses)
        self.step += 1
        if self.es is None:
            self.last_weights = None
            self.metrics.observe(samples=r.numel(), selected=self.batch_size, uniform=False,
                                 scores=r)
            return r.topk(self.batch_size, sorted=False).indices
        self.es.batch_size = self.batch_size
        chosen = self.es.select(ids, r)
        self.last_weights = self.es.last_weights
        return chosen

    def flush(self) -> None:
        """Commit the ES scores' in-flight updates (rule ``"es"``)."""
        if self.es is not None:
            self.es.flush()

    def check_finite(self) -> None:
        """As :meth:`ESSelector.check_finite` (rule ``"es"``; a no-op for ``"topk"``)."""
        if self.es is not None:
            self.es.check_finite()

    # ------------------------------------------------------------- state
    def state_dict(self, **deprecated: Any) -> dict[str, Any]:
        """Step, rule, the reference's corpus and, for ``"es"``, the ESSelector's state under
        ``"es"``. No scores: neither the reference (it does not change) nor the ES store (the
        store's own state, saved beside by :class:`es_stream.TrainingState` /
        :class:`es_stream.Checkpointer`; ``with_store=True``, deprecated, still adds it)."""
        with_store = deprecated_with_store(type(self).__name__, deprecated)
        state = super().state_dict()
        state.update(rule=self.rule, reference_fingerprint=self.reference.fingerprint,
                     reference_scorer=(self.reference.reference or {}).get("scorer"))
        if self.es is not None:
            state["es"] = self.es.state_dict()
            if with_store:
                state["es"]["store"] = self.es.store.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; refuses one of another rule or reference."""
        mine = {"rule": self.rule, "reference_fingerprint": self.reference.fingerprint,
                "reference_scorer": (self.reference.reference or {}).get("scorer")}
        for key, value in mine.items():
            if key in state and state[key] != value:
                raise ValueError(f"cannot resume: the state has {key}={state[key]!r}, this "
                                 f"selector {key}={value!r}; build it as in the run that saved it")
        super().load_state_dict(state)
        if self.es is not None and "es" in state:
            self.es.load_state_dict(state["es"])
