"""Selectors: from a meta-batch's per-sample losses, pick the b samples to back-propagate.

All selectors share one interface, ``select(ids, losses) -> LongTensor[b]`` (indices into the
meta-batch, on ``losses.device``), and draw without replacement by Gumbel-top-k: the top b of
``log w_i + Gumbel(0, 1)`` are exactly a successive draw without replacement with probability
proportional to ``w``, computed with no data-dependent shapes and no host synchronisation.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch

from .feedback import FeedbackChannel
from .store import ScoreStore, as_index, positive_int


def _integer(value: Any, argument: str) -> int:
    """``value`` as a Python int (numpy integers too), else a TypeError naming ``argument``."""
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{argument} must be an integer, got {value!r}") from None


class Selector:
    """Base class: validation, the random generator, and the step counter.

    Args:
        batch_size: b, samples to select from each meta-batch.
        seed: seed of the selector's own generator (independent of torch's global one).
    """

    def __init__(self, batch_size: int, seed: int = 0) -> None:
        self.batch_size = positive_int(batch_size, "batch_size (b)", "an integer >= 1")
        self.seed = _integer(seed, "seed")
        self.step = 0
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

    def _validate(self, ids: Any, losses: torch.Tensor) -> torch.Tensor | None:
        """Check a meta-batch; returns ``ids`` as a tensor (numpy arrays and sequences of ints
        are accepted wherever tensors are)."""
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
        if self.batch_size > n:
            raise ValueError(f"batch_size b={self.batch_size} exceeds the meta-batch size B={n}: "
                             "use ESDataset(drop_last=True), or train on the whole meta-batch "
                             "when len(meta_batch) <= b")
        if losses.device.type == "cpu" and not bool(torch.isfinite(losses).all()):
            bad = int((~torch.isfinite(losses)).nonzero()[0])
            which = f" (sample id {int(ids[bad])})" if ids is not None else ""
            raise ValueError(f"losses: non-finite value {float(losses[bad])} at position {bad}"
                             f"{which}; fix the loss (NaN usually means divergence), "
                             "it cannot be a sampling weight")
        return ids

    def _top_k(self, log_weights: torch.Tensor) -> torch.Tensor:
        """Gumbel-top-k: b indices drawn without replacement with p proportional to exp(log w)."""
        exp = torch.empty_like(log_weights, dtype=torch.float32).exponential_(
            generator=self._generator(log_weights.device))
        keys = log_weights.float() - exp.log()  # log w + Gumbel(0,1), as -log(Exp(1)) is Gumbel
        return keys.topk(self.batch_size, sorted=False).indices

    # ------------------------------------------------------------ interface
    def select(self, ids: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        """Indices (into the meta-batch) of the b samples to back-propagate."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Step and generator states; a restored selector makes the same selections."""
        gens = {k: g.get_state() for k, g in self._generators.items()}
        gens.update({k: v for k, v in self._pending_state.items() if k not in gens})
        return {"step": self.step, "seed": self.seed, "generators": gens}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.seed = int(state["seed"])
        self._generators.clear()
        self._pending_state = dict(state["generators"])


class UniformSelector(Selector):
    """b samples uniformly at random without replacement — the random-selection control
    (forward on B, back-propagate a uniform b)."""

    def select(self, ids: torch.Tensor | None, losses: torch.Tensor) -> torch.Tensor:
        self._validate(ids, losses)
        self.step += 1
        self.last_weights = None
        return self._top_k(torch.zeros_like(losses, dtype=torch.float32))


class LossSelector(Selector):
    """p proportional to the current loss (Loshchilov & Hutter 2015, "Online batch selection";
    ES with beta1 = 0 in Cheng et al. 2025). ``floor`` keeps zero losses reachable."""

    def __init__(self, batch_size: int, floor: float = 1e-8, seed: int = 0) -> None:
        super().__init__(batch_size, seed)
        if not floor > 0:
            raise ValueError(f"floor must be > 0, got {floor}")
        self.floor = floor

    def select(self, ids: torch.Tensor | None, losses: torch.Tensor) -> torch.Tensor:
        self._validate(ids, losses)
        self.step += 1
        return self._top_k(losses.detach().float().clamp_min(self.floor).log())


class TopKSelector(Selector):
    """The b largest losses, deterministically (hard-example mining; e.g. Shrivastava et al.
    2016, OHEM)."""

    def select(self, ids: torch.Tensor | None, losses: torch.Tensor) -> torch.Tensor:
        self._validate(ids, losses)
        self.step += 1
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
    both; their lengths are ours to choose, default 0). With ``reweight=True``,
    :attr:`last_weights` holds ``1 / (B p_i)`` for the selected samples (ours; the paper uses
    the plain mean).

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
                 floor: float = 1e-8, uniform_mix: float = 0.0, reweight: bool = False,
                 seed: int = 0, store: ScoreStore | None = None,
                 device: torch.device | str | None = None, feedback: str = "auto",
                 max_pending: int = 16, fingerprint: str | None = None) -> None:
        super().__init__(batch_size, seed)
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
        self._channels: dict[torch.device, FeedbackChannel] = {}
        self._nonfinite: torch.Tensor | None = None

    def channel(self, device: torch.device | str) -> FeedbackChannel | None:
        """The feedback channel that serves losses on ``device`` (None: direct access)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        direct = self.feedback == "sync" or (
            self.feedback == "auto" and device == self.store.device) or self.store.device.type != "cpu"
        if direct:
            return None
        if device not in self._channels:
            self._channels[device] = FeedbackChannel(self.store, device, self.max_pending)
        return self._channels[device]

    def prefetch(self, ids: torch.Tensor, device: torch.device | str) -> None:
        """Start moving the scores of the next meta-batch's (host) ``ids`` to ``device``, where
        its losses will be; a no-op when no channel is needed."""
        channel = self.channel(device)
        if channel is not None:
            channel.prefetch(as_index(ids))

    def flush(self) -> None:
        """Commit every in-flight score update to the store (waits for the device)."""
        for channel in self._channels.values():
            channel.flush()

    def is_uniform_step(self, step: int | None = None) -> bool:
        """Whether ``step`` (default: the next one) falls in burn-in or annealing."""
        step = self.step if step is None else step
        if self.total_steps is None:
            return False
        return step < self.burn_in * self.total_steps or step >= (1 - self.anneal) * self.total_steps

    def update(self, ids: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        """Apply the ES rule to the meta-batch's scores; return the sampling weights ``w``."""
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
        w = self.beta1 * s + (1.0 - self.beta1) * l
        new_scores = self.beta2 * s + (1.0 - self.beta2) * l
        if channel is None:
            self.store.scatter(ids, new_scores, checked=True)
        else:
            channel.commit(ids, new_scores)
        if l.device.type != "cpu":  # remember, without syncing, whether any loss was bad
            bad = (~torch.isfinite(l)).any()
            self._nonfinite = bad if self._nonfinite is None else self._nonfinite | bad
        return w

    def select(self, ids: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        ids = self._validate(ids, losses)
        w = self.update(ids, losses)
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
        chosen = self._top_k(log_p)
        self.last_weights = (1.0 / (n * log_p[chosen].exp())) if self.reweight else None
        return chosen

    def check_finite(self) -> None:
        """Raise if any loss given on a GPU since the last check was NaN or infinite (syncs)."""
        if self._nonfinite is not None:
            bad, self._nonfinite = bool(self._nonfinite), None
            if bad:
                raise ValueError("losses: a non-finite loss reached ESSelector.select on the GPU "
                                 "since the last check; fix the loss (NaN usually means divergence)")

    def state_dict(self, with_store: bool = True) -> dict[str, Any]:
        """Step, generators, the ids updated since the last rank merge and (``with_store``) a
        copy of the scores. For a large store pass ``with_store=False`` and save the store
        beside the checkpoint (:class:`es_stream.Checkpointer` does both)."""
        self.flush()
        state = super().state_dict()
        state["updated_ids"] = self.store.update_log_state()
        if with_store:
            state["store"] = self.store.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore step and generators, the update log, and the scores when the state holds
        them."""
        super().load_state_dict(state)
        self.flush()  # in-flight updates must not land on top of the restored scores
        if "store" in state:
            self.store.load_state_dict(state["store"])
        if "updated_ids" in state:
            self.store.load_update_log_state(state["updated_ids"])
