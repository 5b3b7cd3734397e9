"""Ranks agree or stop: at the start of an epoch every rank of a ``torch.distributed`` run
compares what must be equal on all of them, and a difference raises on every rank, naming the
field and each rank's value.

Why: nothing else checks it. Two ranks with different seeds partition the epoch differently
(duplicating some samples, dropping others), two corpora that look alike are silently mixed,
and a different meta-batch size or corpus size gives the ranks different step counts, which
hangs at the next collective until its timeout. One all-gather of a few small values per epoch
turns each of these into an immediate, named error.

The gather is ``all_gather_object`` of a small dict of plain values (strings, numbers, None):
every rank calls it, so it completes whatever the values are — the comparison happens after,
on every rank alike, so all raise together and none waits on another. Large values (the list
of shards) are compared by digest (:func:`digest`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Mapping

import torch.distributed as dist

from .errors import RankMismatchError

__all__ = ["check_ranks_agree", "corpus_fields", "dataset_fields", "digest", "in_multi_rank_run"]

_ADVICE = ("every rank must run the same job: start them with the same arguments, corpus index, "
           "manifest directory and environment")
# ShardInfo fields that may differ between machines holding the same shard (a copy's mtime)
_LOCAL_ONLY = {"mtime_ns"}


def digest(value: Any) -> str:
    """A short, stable digest of a JSON-able ``value`` (16 hex digits), for comparing large
    values across ranks."""
    text = json.dumps(value, sort_keys=True, default=repr, separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def check_ranks_agree(fields: Mapping[str, Any], *, where: str = "", group: Any = None) -> None:
    """Raise :class:`~es_stream.errors.RankMismatchError` on every rank unless every rank passed
    the same ``fields`` (name -> plain value). A no-op without an initialised process group or
    with one rank. ``where`` (e.g. ``"at the start of epoch 3"``) goes into the message.

    The first field (in the order given) that differs is named, with each rank's value (ranks
    holding the same value grouped), e.g. ``ranks disagree on seed at the start of epoch 0:
    rank 0 has 7, rank 1 has 8``.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    world = dist.get_world_size(group)
    if world < 2:
        return
    mine = {str(k): _plain(v) for k, v in fields.items()}
    gathered: list[dict[str, Any] | None] = [None] * world
    dist.all_gather_object(gathered, mine, group=group)
    names = list(mine)
    for other in gathered:
        names += [k for k in other if k not in names]
    missing = object()
    for name in names:
        values = [g.get(name, missing) for g in gathered]
        if all(v == values[0] for v in values[1:]):
            continue
        by_value: dict[str, list[int]] = {}
        for rank, value in enumerate(values):
            shown = "no such field" if value is missing else repr(value)
            by_value.setdefault(shown, []).append(rank)
        held = ", ".join(f"rank{'s' if len(r) > 1 else ''} {_ranks(r)} {'have' if len(r) > 1 else 'has'} {v}"
                         for v, r in by_value.items())
        at = f" {where}" if where else ""
        raise RankMismatchError(f"ranks disagree on {name}{at}: {held}; {_ADVICE}")


def _ranks(ranks: list[int]) -> str:
    return ", ".join(map(str, ranks)) if len(ranks) <= 4 else f"{ranks[0]}..{ranks[-1]} ({len(ranks)})"


def dataset_fields(dataset: Any, epoch: int) -> dict[str, Any]:
    """What every rank's ``ESDataset`` must agree on for ``epoch``: the corpus (fingerprint,
    sample count and the identity of its shards: names, counts, sizes and any content check the
    index records, not mtimes, which differ between copies), seed, meta-batch size, shuffle and
    drop_last, the world size it partitions for, the epoch, and the run that wrote its manifests
    (None without), and that the rank the dataset partitions for is the process's own
    (``dataset_rank_is_process_rank``)."""
    # a field, not a local raise: a rank that raised alone would leave the others waiting
    own_rank = not (dist.is_available() and dist.is_initialized()) or dataset.rank == dist.get_rank()
    return {
        "dataset_rank_is_process_rank": bool(own_rank),
        **corpus_fields(dataset.corpus),
        "seed": int(dataset.seed),
        "meta_batch_size": int(dataset.meta_batch_size),
        "world_size": int(dataset.world_size),
        "shuffle": bool(dataset.shuffle),
        "drop_last": bool(dataset.drop_last),
        "epoch": int(epoch),
        "manifest_run_id": manifest_run(getattr(dataset, "manifests", None)),
    }


def corpus_fields(corpus: Any) -> dict[str, Any]:
    """The part of :func:`dataset_fields` that names the corpus: its fingerprint, sample count
    and a digest of its shards' identities (mtimes left out: they differ between copies)."""
    shards = [{k: v for k, v in dataclasses.asdict(s).items() if k not in _LOCAL_ONLY}
              if dataclasses.is_dataclass(s) else repr(s) for s in corpus.shards]
    return {"corpus_fingerprint": corpus.fingerprint, "num_samples": int(corpus.num_samples),
            "shards": digest(shards)}


def manifest_run(manifests: Any) -> str | None:
    """The run id recorded in a manifest directory (None without a directory or a record)."""
    from .errors import ManifestError
    from .manifest_run import run_id

    if manifests is None:
        return None
    try:
        return run_id(manifests)
    except ManifestError as exc:  # compared, not raised here: a rank raising alone hangs the rest
        return f"unreadable run record: {exc}"


def in_multi_rank_run() -> bool:
    """Whether this process is one of several ranks of an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
