"""Which epochs of a run a pruning policy prunes, and why the others keep everything.

Pure functions of a policy's schedule (``ratio``, ``burn_in_epochs``, ``anneal``) and the run's
length, so a run can say before it starts that its schedule leaves nothing to prune — e.g.
InfoBatch with ``ratio=0.5`` and the default ``anneal=0.125`` over 2 epochs: epoch 0 has no
decision yet (nothing is scored before it), and epoch 1 is the annealing tail.

A decision made at the end of epoch ``e`` is for epoch ``e + 1`` (:meth:`Pruner.on_epoch_end`),
so the first epoch such a run can prune is 1 (``first_epoch``); a decision written before
training (``es-stream prune``, a band or threshold policy) can prune from epoch 0.
"""

from __future__ import annotations

import math

from .policy import Policy

__all__ = ["first_decided_epoch", "pruned_epochs", "schedule_warning", "why_kept_all"]


def first_decided_epoch(policy: Policy) -> int:
    """The first epoch a decision can be written for: 0 for a decision made once before
    training (``applies_to: all``) or by a policy that reads no score (``reads_scores =
    False``: RS2), else 1 (made at the end of epoch 0)."""
    if (policy.describe().get("applies_to") == "all"
            or getattr(policy, "reads_scores", True) is False):
        return 0  # decided once; or a policy that reads no score (RS2) can decide epoch 0
    return 1


def pruned_epochs(policy: Policy, total_epochs: int, first_epoch: int | None = None) -> list[int]:
    """The epochs of a ``total_epochs``-epoch run in which ``policy`` prunes, ascending: from
    ``first_epoch`` (default :func:`first_decided_epoch`) to the last epoch, those its schedule
    does not keep whole (burn-in, annealing tail, ``ratio=0``)."""
    if isinstance(total_epochs, bool) or not isinstance(total_epochs, int) or total_epochs < 0:
        raise ValueError(f"total_epochs must be an integer >= 0, got {total_epochs!r}")
    first = first_decided_epoch(policy) if first_epoch is None else first_epoch
    return [e for e in range(max(0, first), total_epochs) if policy.prunes(e, total_epochs)]


def why_kept_all(policy: Policy, epoch: int, total_epochs: int,
                 first_epoch: int | None = None) -> str | None:
    """Why ``policy`` keeps every sample in ``epoch`` of a ``total_epochs``-epoch run, in
    words; None when it prunes that epoch."""
    first = first_decided_epoch(policy) if first_epoch is None else first_epoch
    if epoch >= total_epochs:
        return f"epoch {epoch} is past the run's last epoch ({total_epochs - 1})"
    if epoch < first:
        return (f"epoch {epoch} has no decision: the first is made at the end of epoch "
                f"{first - 1}, from the losses that epoch scored")
    if policy.prunes(epoch, total_epochs):
        return None
    if policy.ratio == 0:
        return "ratio=0 prunes nothing"
    if epoch < policy.burn_in_epochs:
        return f"epoch {epoch} is burn-in (burn_in_epochs={policy.burn_in_epochs})"
    tail = math.ceil(policy.anneal * total_epochs)
    return (f"epoch {epoch} is in the annealing tail: anneal={policy.anneal} keeps the last "
            f"ceil({policy.anneal} x {total_epochs}) = {tail} epoch(s) whole")


def schedule_warning(policy: Policy, total_epochs: int,
                     first_epoch: int | None = None) -> str | None:
    """A sentence saying that ``policy``'s schedule prunes no epoch of a ``total_epochs``-epoch
    run, and why, epoch by epoch; None when it prunes at least one."""
    if pruned_epochs(policy, total_epochs, first_epoch):
        return None
    reasons = "; ".join(why_kept_all(policy, e, total_epochs, first_epoch) or ""
                        for e in range(total_epochs)) or "the run has no epoch"
    name = type(policy).__name__
    return (f"{name}({', '.join(f'{k}={v}' for k, v in _schedule(policy).items())}) prunes no "
            f"epoch of this {total_epochs}-epoch run, so every sample is trained on every "
            f"epoch: {reasons}. Train for more epochs, or lower anneal/burn_in_epochs "
            "(anneal=0 prunes every epoch after the first)")


def _schedule(policy: Policy) -> dict[str, object]:
    return {"ratio": policy.ratio, "anneal": policy.anneal,
            "burn_in_epochs": policy.burn_in_epochs}
