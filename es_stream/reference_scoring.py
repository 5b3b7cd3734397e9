"""Reference scores: one pass of a fixed (reference) model over the whole corpus, one loss per
sample, into a :class:`~es_stream.ScoreStore` (see ``docs/REFERENCE.md``).

:func:`score_corpus` (and ``es-stream score``) reads every sample exactly once through
:class:`~es_stream.ESDataset` and DataLoader workers; under ``torchrun`` each rank scores its
part and the parts are merged (:func:`es_stream.merge_rank_scores`). A memory-mapped store is
resumable: every ``checkpoint_every`` meta-batches the store is flushed and a small progress file
is written beside it, atomically; a killed run started again with the same arguments goes on from
there (what it scored after the last progress point is scored again, to the same values by a
deterministic model), so the finished store equals an uninterrupted run's.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from .atomic import atomic_write
from .corpus import Corpus
from .dataset import ESDataset, loader
from .distributed import merge_rank_scores, rank_and_world_size
from .errors import ScoreError
from .plan import worker_batch_range, worker_skips
from .reference_policy import refuse_never_scored
from .store import CHUNK, ScoreStore, metadata_path, positive_int

__all__ = ["Scorer", "ScoreResult", "load_scorer", "progress_path", "require_complete",
           "score_corpus"]

ScoreFn = Callable[[Any], torch.Tensor]


@dataclass
class Scorer:
    """A reference model and how it scores a batch: what a ``--model pkg.module:factory``
    factory returns (any object with these attributes will do).

    Attributes:
        score_fn: ``score_fn(batch) -> Tensor[B]``: one loss per sample of the collated
            meta-batch ``batch`` (already on ``device``), in the batch's order; lower means
            easier. Called under ``torch.inference_mode()``. For a language model use the mean
            token loss (``es_stream.integrations.composer.causal_lm_sample_loss``: per-sample
            perplexity's log). A factory may name it ``loss`` instead.
        model: the ``torch.nn.Module`` (put in ``eval()`` mode; its ``state_dict`` is hashed into
            the scorer's identity). Optional when ``score_fn`` needs none.
        decode: per-sample decode for :class:`ESDataset` (default webdataset's for tar shards).
        collate: list of decoded samples -> batch (default ``default_collate``).
        device: where batches go before ``score_fn`` (default: stay on the host).
        name: the scorer's identity recorded in the store (default: the factory path plus a
            hash of the model's weights).
    """

    score_fn: ScoreFn
    model: torch.nn.Module | None = None
    decode: Callable[[dict], Any] | None = None
    collate: Callable[[list], Any] | None = None
    device: torch.device | str | None = None
    name: str | None = None

    def identity(self, spec: str | None = None) -> str:
        """``name``, else ``<spec or score_fn's qualified name>@<hash of the weights>``."""
        if self.name:
            return str(self.name)
        base = spec or f"{getattr(self.score_fn, '__module__', '?')}." \
                       f"{getattr(self.score_fn, '__qualname__', type(self.score_fn).__name__)}"
        return base if self.model is None else f"{base}@{weights_hash(self.model)}"


@dataclass
class ScoreResult:
    """What :func:`score_corpus` did on this rank."""

    store: ScoreStore
    scorer: str
    scored: int            # samples this rank scored in this run
    resumed_batches: int   # meta-batches a previous run had already done (0: a fresh run)
    seconds: float
    already_complete: bool = False
    progress_file: str | None = field(default=None, repr=False)


def weights_hash(model: torch.nn.Module) -> str:
    """A short digest of a model's ``state_dict`` (names, dtypes, shapes and values)."""
    h = hashlib.blake2b(digest_size=8)
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def load_scorer(spec: str) -> tuple[Scorer, str]:
    """Import ``pkg.module:factory``, call the factory with no arguments and return its
    :class:`Scorer` (an object with ``score_fn`` or ``loss``, and optionally ``model``,
    ``decode``, ``collate``, ``device``, ``name``) with its identity.

    Raises ``ValueError`` for a malformed spec or a missing attribute, ``ImportError`` (naming
    the module) for a module that cannot be imported, ``TypeError`` for a factory that returns
    something else.
    """
    module_name, sep, attr = str(spec).partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--model {spec!r}: expected pkg.module:factory (a module path, a colon, "
                         "and a function of no arguments that returns the scorer)")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ImportError(f"--model {spec!r}: cannot import module {module_name!r} ({exc}); is it "
                          "on PYTHONPATH?") from exc
    factory: Any = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise ValueError(f"--model {spec!r}: module {module_name!r} has no attribute {attr!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise TypeError(f"--model {spec!r}: {attr!r} is a {type(factory).__name__}, not a factory "
                        "function")
    return as_scorer(factory(), spec), spec


def as_scorer(obj: Any, spec: str = "scorer") -> Scorer:
    """``obj`` (a :class:`Scorer` or any object with the same attributes) as a Scorer."""
    if isinstance(obj, Scorer):
        return obj
    fn = getattr(obj, "score_fn", None) or getattr(obj, "loss", None)
    if not callable(fn):
        raise TypeError(f"{spec}: returned a {type(obj).__name__}, expected an es_stream.Scorer (or "
                        "an object with a callable score_fn or loss: batch -> Tensor[B], and "
                        "optionally model, decode, collate, device, name)")
    return Scorer(score_fn=fn, model=getattr(obj, "model", None), decode=getattr(obj, "decode", None),
                  collate=getattr(obj, "collate", None), device=getattr(obj, "device", None),
                  name=getattr(obj, "name", None) or getattr(obj, "identity", None))


# ------------------------------------------------------------------ files
def progress_path(store_path: str | os.PathLike, rank: int = 0, world_size: int = 1) -> str:
    """The progress file beside a store being scored: ``scores.npy`` -> ``scores.progress.json``
    (``scores.progress-rank1-of-2.json`` under several ranks)."""
    base = metadata_path(store_path)[:-len(".meta.json")]
    return base + (".progress.json" if world_size == 1 else
                   f".progress-rank{rank}-of-{world_size}.json")


def _rank_path(path: str, rank: int) -> str:
    """Rank ``rank``'s working store (rank 0 scores into ``path`` itself)."""
    if rank == 0:
        return path
    stem = path[:-4] if path.endswith(".npy") else path
    return f"{stem}.rank{rank}.npy"


def _remove(*paths: str) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)


def require_complete(store: ScoreStore, what: str = "this command") -> None:
    """Refuse a reference store whose scoring pass did not finish (its metadata says so):
    a :class:`ScoreError` naming the store. Stores of training scores pass."""
    ref = store.reference
    if ref is not None and not ref.get("complete", False):
        raise ScoreError(f"{store.describe()}: an unfinished reference scoring pass (scorer "
                         f"{ref.get('scorer')!r}); {what} needs every sample scored — run the same "
                         "`es-stream score` command again to finish it")


# ------------------------------------------------------------------ the pass
def score_corpus(corpus: Corpus, score_fn: ScoreFn | Scorer, store: ScoreStore | str | os.PathLike,
                 *, meta_batch_size: int = 256, num_workers: int = 2,
                 decode: Callable[[dict], Any] | None = None,
                 collate: Callable[[list], Any] | None = None,
                 device: torch.device | str | None = None, scorer: str | None = None,
                 checkpoint_every: int = 100, progress: bool = True) -> ScoreResult:
    """Score every sample of ``corpus`` exactly once with ``score_fn`` into ``store``.

    Args:
        corpus: the indexed corpus.
        score_fn: ``batch -> Tensor[B]`` per-sample losses, or a :class:`Scorer` (whose
            ``decode``, ``collate``, ``device`` and identity are then the defaults).
        store: a path (a memory-mapped ``.npy`` store, allocated when created; resumable), or a
            :class:`ScoreStore` (resumable when memory-mapped).
        meta_batch_size: samples per forward.
        num_workers: DataLoader workers reading and decoding (a resume needs the same number).
        decode, collate: as for :class:`ESDataset`.
        device: where each batch goes before ``score_fn`` (None: stays on the host). On a GPU
            the losses reach a host store through a :class:`FeedbackChannel` (non-blocking
            copies committed on CUDA events): no host synchronisation per batch.
        scorer: the identity recorded in the store's metadata (default: the Scorer's).
        checkpoint_every: meta-batches between progress points (flush + progress file).
        progress: show a progress bar (samples/s and ETA) on rank 0, when stderr is a terminal
            (:mod:`es_stream.progress`'s rule: logs and pipes get no bar).

    Returns a :class:`ScoreResult`; its ``store`` holds every sample's score on every rank.

    The store records the corpus fingerprint and ``{"scorer": identity, "complete": bool}``
    (``ScoreStore.reference``, in ``scores.meta.json``). A store of another corpus, a store
    scored by another scorer, or an existing file that no scoring pass wrote, is refused with a
    :class:`ScoreError` naming it: nothing is overwritten that this function did not create. A
    store already complete for this scorer is returned as it is. A progress file that does not
    fit the arguments (another meta-batch size, worker count or world size) is refused, naming
    it; delete it and the store to start over.

    Under several ranks (``torch.distributed`` initialised, or ``RANK``/``WORLD_SIZE``), rank r
    scores its part of the corpus (:class:`ESDataset`'s partition) into ``path`` (rank 0) or a
    working file ``<stem>.rank<r>.npy``; at the end every rank receives every score and rank 0
    marks ``path`` complete; the working files are then removed (their stores stay mapped).
    """
    if isinstance(score_fn, Scorer) or not callable(score_fn):
        sc = as_scorer(score_fn)
        decode = decode if decode is not None else sc.decode
        collate = collate if collate is not None else sc.collate
        device = device if device is not None else sc.device
        scorer = scorer or sc.identity()
        model, fn = sc.model, sc.score_fn
    else:
        model, fn = None, score_fn
        scorer = scorer or Scorer(score_fn).identity()
    meta_batch_size = positive_int(meta_batch_size, "meta_batch_size")
    checkpoint_every = positive_int(checkpoint_every, "checkpoint_every")
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an integer >= 0, got {num_workers!r}")
    rank, world = rank_and_world_size()
    if world > 1 and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"WORLD_SIZE={world}: initialise torch.distributed (dist."
                           "init_process_group) before score_corpus, so the ranks can merge")
    start = time.perf_counter()

    done = _already_complete(corpus, store, scorer, rank, world)
    if done is not None:
        return ScoreResult(done, scorer, 0, 0, time.perf_counter() - start, already_complete=True)
    store = _open_store(corpus, store, scorer, rank)
    progress_file = None if store.path is None else progress_path(store.path, rank, world)
    ds = ESDataset(corpus, meta_batch_size, decode=decode, collate=collate, shuffle=False,
                   drop_last=False, on_error="raise")
    resumed = _resume(ds, progress_file, scorer, num_workers)
    dev = None if device is None else torch.device(device)
    if model is not None:
        model.eval()
    scored = _run(ds, store, fn, dev, num_workers, resumed, checkpoint_every, progress_file,
                  corpus, scorer, progress and rank == 0)
    _finish(corpus, store, scorer, rank, world, progress_file)
    return ScoreResult(store, scorer, scored, resumed, time.perf_counter() - start,
                       progress_file=progress_file)


def _already_complete(corpus: Corpus, store: Any, scorer: str, rank: int,
                      world: int) -> ScoreStore | None:
    """The finished store of this scorer at ``store`` (a path), opened; None otherwise. Under
    several ranks with a path, rank 0 alone looks (opening a file another rank may be creating
    could remove its temporary files) and tells the others."""
    if world > 1 and not isinstance(store, ScoreStore):
        flag = [_already_complete(corpus, store, scorer, 0, 1) is not None if rank == 0 else None]
        dist.broadcast_object_list(flag, src=0)
        if not flag[0]:
            return None
        return ScoreStore.open(os.fspath(store), corpus.num_samples, fingerprint=corpus.fingerprint)
    if isinstance(store, ScoreStore):
        if store.reference and store.reference.get("complete") and store.reference.get("scorer") == scorer:
            store.bind(corpus.fingerprint)
            return store
        return None
    path = os.fspath(store)
    if not os.path.exists(path):
        return None
    opened = ScoreStore.open(path, corpus.num_samples, fingerprint=corpus.fingerprint)
    ref = opened.reference
    if ref and ref.get("complete") and ref.get("scorer") == scorer:
        return opened
    return None


def _open_store(corpus: Corpus, store: Any, scorer: str, rank: int) -> ScoreStore:
    """This rank's store, claimed for ``scorer`` (refusing one of another scorer or corpus)."""
    if isinstance(store, ScoreStore):
        if store.num_samples != corpus.num_samples:
            raise ScoreError(f"{store.describe()}: holds {store.num_samples} scores, the corpus "
                             f"has {corpus.num_samples} samples: a store of another corpus")
        store.bind(corpus.fingerprint)
        existed = True
    else:
        path = _rank_path(os.fspath(store), rank)
        existed = os.path.exists(path)
        store = ScoreStore.open(path, corpus.num_samples, fingerprint=corpus.fingerprint)
    ref = store.reference
    if ref is not None and ref.get("scorer") != scorer:
        raise ScoreError(f"{store.describe()}: reference scores of scorer {ref.get('scorer')!r}, "
                         f"this run's scorer is {scorer!r}; give another output path (or delete "
                         "that store to replace it)")
    if ref is None and existed and store.path is not None:
        raise ScoreError(f"{store.describe()}: an existing score store that no `es-stream score` "
                         "pass wrote (its metadata records no reference scorer); it is not "
                         "overwritten — give a new output path")
    if ref is None:
        store.set_reference({"scorer": scorer, "complete": False})
    return store


def _resume(ds: ESDataset, progress_file: str | None, scorer: str, num_workers: int) -> int:
    """Load the progress file, if any, into ``ds``; the meta-batches already done."""
    if progress_file is None or not os.path.exists(progress_file):
        return 0
    try:
        with open(progress_file) as f:
            state = json.load(f)
        dataset_state = state["dataset"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ScoreError(f"{progress_file}: not a scoring progress file ({exc}); delete it (and "
                         "the store beside it) to score from the start") from exc
    if state.get("scorer") != scorer:
        raise ScoreError(f"{progress_file}: progress of scorer {state.get('scorer')!r}, this run's "
                         f"is {scorer!r}; resume with the same model, or delete it and the store")
    taken_with = int(dataset_state.get("num_workers", 0))
    if int(dataset_state.get("batches", 0)) and taken_with != max(num_workers, 1):
        raise ValueError(f"{progress_file}: the interrupted run read with num_workers="
                         f"{taken_with if taken_with > 1 else '0 or 1'} DataLoader workers, this "
                         f"one with {num_workers}; resume with the same number (--workers), or "
                         "delete this file and the store to start over")
    try:
        ds.load_state_dict(dataset_state)
    except ValueError as exc:
        raise ValueError(f"{progress_file}: {exc} (resume with the arguments of the interrupted "
                         "run, or delete this file and the store to start over)") from exc
    return int(dataset_state["batches"])


def _samples_done(ds: ESDataset, batches: int, num_workers: int) -> tuple[int, int]:
    """(samples in the first ``batches`` meta-batches the loader yields, samples in all)."""
    plan = ds.plan()
    sizes, total = plan.batch_sizes, int(plan.batch_sizes.sum())
    if batches == 0:
        return 0, total
    workers = max(num_workers, 1)
    skips = worker_skips(plan.num_batches, workers, batches)
    done = 0
    for w in range(workers):
        first, _ = worker_batch_range(plan.num_batches, workers, w)
        done += int(sizes[first:first + int(skips[w])].sum())
    return done, total


def _to_device(data: Any, device: torch.device | None) -> Any:
    if device is None:
        return data
    if isinstance(data, torch.Tensor):
        return data.to(device, non_blocking=True)
    if isinstance(data, dict):
        return {k: _to_device(v, device) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        moved = [_to_device(v, device) for v in data]
        return type(data)(*moved) if hasattr(data, "_fields") else type(data)(moved)
    return data


def _run(ds: ESDataset, store: ScoreStore, fn: ScoreFn, device: torch.device | None,
         num_workers: int, batches: int, checkpoint_every: int, progress_file: str | None,
         corpus: Corpus, scorer: str, show: bool) -> int:
    """The scoring loop; returns the samples scored."""
    from .progress import progress

    channel = None
    if device is not None and device.type == "cuda" and store.device.type == "cpu":
        channel = store.channel(device)
    done, total = _samples_done(ds, batches, num_workers)
    bar = progress(total=total, initial=done, unit="sample", unit_scale=True, disable=not show,
                   desc="scoring", smoothing=0.1)
    bad: torch.Tensor | None = None  # any non-finite loss on the device, checked at checkpoints
    scored = 0

    def checkpoint(k: int) -> None:
        nonlocal bad
        if channel is not None:
            channel.flush()  # the host store checks the values it receives
        if bad is not None:
            flag, bad = bool(bad), None  # a sync, once per checkpoint
            if flag:
                raise ScoreError(f"{store.describe()}: score_fn returned a NaN or infinite loss "
                                 f"between meta-batches {k - checkpoint_every} and {k}; fix the "
                                 "model or its loss")
        store.flush()
        if progress_file is not None:
            state = {"dataset": ds.state_at(k), "scorer": scorer,
                     "corpus_fingerprint": corpus.fingerprint, "store": store.path}
            with atomic_write(progress_file) as tmp:
                with open(tmp, "w") as f:
                    json.dump(state, f, indent=1, sort_keys=True)

    k = batches
    with torch.inference_mode():
        for mb in loader(ds, num_workers=num_workers, persistent_workers=False):
            k += 1
            n = len(mb)
            if n:
                losses = fn(_to_device(mb.data, device))
                if not isinstance(losses, torch.Tensor) or tuple(losses.shape) != (n,):
                    got = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
                    raise ValueError(f"score_fn gave {got} for a meta-batch of {n} samples; it "
                                     "must return one loss per sample, a Tensor[B] "
                                     "(reduction='none')")
                losses = losses.detach().float()
                if channel is not None:
                    channel.commit(mb.ids, losses)
                else:
                    store.scatter(mb.ids, losses)
                if losses.device.type != "cpu" and channel is None:
                    nonfinite = (~torch.isfinite(losses)).any()
                    bad = nonfinite if bad is None else bad | nonfinite
                scored += n
                bar.update(n)
            if k % checkpoint_every == 0:
                checkpoint(k)
    checkpoint(k)
    bar.close()
    return scored


def _finish(corpus: Corpus, store: ScoreStore, scorer: str, rank: int, world: int,
            progress_file: str | None) -> None:
    """Merge the ranks' parts, check that every sample is scored, mark the store complete."""
    if world > 1:
        # every id this rank scored (also those of a run before a resume), then the merge
        ids = np.concatenate([np.flatnonzero(store.scored_range(a, min(a + CHUNK, store.num_samples))) + a
                              for a in range(0, store.num_samples, CHUNK)])
        store.load_update_log_state(torch.from_numpy(ids.astype(np.int64)))
        merge_rank_scores(store)
        store.flush()
    refuse_never_scored(store.scored_range, store.num_samples, store.describe(),
                        advice="run the same command again")
    # every rank holds every score now; rank 0's file is the store the run leaves behind
    store.set_reference({"scorer": scorer, "complete": True})
    if world > 1:
        dist.barrier()  # rank 0 has marked the store complete: the working files can go
        if rank > 0 and store.path is not None:
            _remove(store.path, metadata_path(store.path))
    if progress_file is not None:
        _remove(progress_file)
