"""`Pruner`: at each epoch end, turn the score store into the next epoch's shard manifests."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch.distributed as dist

from ._version import __version__
from .corpus import Corpus
from .distributed import merge_rank_scores
from .metrics import LogFn, check_log_fn, emit
from .manifest import (WRITE_ID, clear_success, epoch_writer, mark_success, read_epoch, shard_file,
                       write_shard)
from .manifest_run import check_run, claim_run, run_record
from .policy import CHUNK, Decision, Policy
from .schedule import schedule_warning, why_kept_all
from .store import ScoreStore

# shard files written at once: pyarrow's encoding and each file's fsync release the GIL, so
# writers overlap the decision and each other (1e9 samples: minutes of parquet and fsync)
WRITERS = min(4, os.cpu_count() or 1)

log = logging.getLogger(__name__)

SCORE_SAMPLE = 1 << 20  # scores sampled for the summary's quantiles (exact up to this corpus size)


class Pruner:
    """Writes ``policy``'s decision for epoch ``e + 1`` when epoch ``e`` ends.

    Under ``torch.distributed`` every rank calls :meth:`on_epoch_end`: the ranks first merge
    the scores each updated this epoch (:func:`es_stream.merge_rank_scores`), so all hold the
    same store; then rank 0 alone decides and writes, and every rank waits at a barrier until
    the manifests are complete, so all ranks read the same decision.

    Args:
        corpus: the corpus the scores index.
        store: the :class:`ScoreStore` (e.g. ``selector.store``).
        policy: an :class:`ESWPPolicy` or :class:`InfoBatchPolicy`.
        out_dir: the manifest directory (``ESDataset(..., manifests=out_dir)`` reads it).
        decay: optional pull of pruned samples' scores toward the corpus mean score
            (``s <- (1 - decay) s + decay * mean``, applied once the manifests are written, the
            manifests recording the scores before it); 0 (default) leaves them as they were.
        overwrite: let this run replace the manifests another run wrote in ``out_dir`` (see
            below); default False refuses them.
        epochs: the run's length in epochs, when known: a schedule that prunes no epoch of it
            (burn-in and annealing tail cover every epoch) is warned about here, at
            construction, rather than after the first epoch.

    **One run per directory.** ``out_dir`` records the run that writes it (``_run.json``: its
    id, a digest of :meth:`state_dict`, and those settings; every shard file carries the id as
    ``run_id``). A Pruner of another run — another corpus, policy, ratio, seed, schedule or
    decay — is refused at construction with a :class:`ManifestError` naming the directory and
    each setting that differs, unless ``overwrite=True``, which deletes the other run's epoch
    directories (manifests only) at this run's first write. A resumed run has the same settings,
    so it continues in its own directory.

    **Schedules that prune nothing.** At each epoch end the log (logger ``es_stream.pruner``)
    says why an epoch keeps every sample (no decision yet, burn-in, annealing tail), and a
    :class:`UserWarning` (also logged) says when the schedule prunes no epoch of the run at all
    (:func:`es_stream.schedule.schedule_warning`). No manifest is written for an epoch past the
    run (``on_epoch_end(epochs - 1, epochs)`` writes nothing).

    The store is bound to the corpus (:meth:`ScoreStore.bind`): a store that belongs to another
    corpus is refused. Each decision's summary is returned by :meth:`write`, logged by it
    (logger ``es_stream.pruner``, INFO), given to ``log_fn`` (keys prefixed ``es/prune/``, step:
    the epoch decided) and kept in :attr:`last_summary`: ``{"epoch", "samples", "kept",
    "pruned", "rescaled", "never_scored", "score_p10", "score_p50", "score_p90"}``, where
    ``rescaled`` counts kept samples whose loss weight is not 1, ``never_scored`` samples kept
    because they were never scored (see :class:`ScoreStore`), and the quantiles are those of the
    scored samples' scores the decision read (NaN if none; exact up to ``SCORE_SAMPLE`` = 2^20
    samples, above it of every ``ceil(n / 2^20)``-th id: a fixed, evenly spread sample, read
    from the chunks the decision reads anyway).

    ``log_fn``: optional ``(metrics: dict[str, float], step: int) -> None``, e.g.
    ``lambda m, step: [writer.add_scalar(k, v, step) for k, v in m.items()]`` (TensorBoard) or
    ``lambda m, step: wandb.log(m)`` (W&B; its own step, as the epoch is not the run's step).
    """

    def __init__(self, corpus: Corpus, store: ScoreStore, policy: Policy,
                 out_dir: str | os.PathLike, decay: float = 0.0,
                 log_fn: LogFn | None = None, *, overwrite: bool = False,
                 epochs: int | None = None) -> None:
        if not isinstance(corpus, Corpus):
            raise TypeError(f"corpus must be an es_stream.Corpus, got {type(corpus).__name__}")
        if not isinstance(store, ScoreStore):
            raise TypeError(f"store must be an es_stream.ScoreStore, got {type(store).__name__}")
        if not isinstance(policy, Policy):
            raise TypeError(f"policy must be an ESWPPolicy or InfoBatchPolicy, got "
                            f"{type(policy).__name__}")
        if store.num_samples != corpus.num_samples:
            raise ValueError(f"store holds {store.num_samples} scores, corpus has "
                             f"{corpus.num_samples} samples: a store of another corpus?")
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        store.bind(corpus.fingerprint)  # refuses a store of another corpus of the same size
        self.corpus, self.store, self.policy = corpus, store, policy
        self.out_dir = os.fspath(out_dir)
        self.decay = decay
        self.log_fn = check_log_fn(log_fn)
        self.last_summary: dict[str, float] | None = None
        if not isinstance(overwrite, bool):
            raise TypeError(f"overwrite must be True or False, got {overwrite!r}")
        self.overwrite = overwrite
        self.run = run_record(self.state_dict())
        check_run(self.out_dir, self.run, overwrite)  # another run's manifests: refused up front
        self._claimed = False
        self._warned: set[int] = set()  # run lengths already warned about
        if epochs is not None:
            self._warn_schedule(epochs)

    def state_dict(self) -> dict[str, Any]:
        """What decides the manifests. A pruner keeps no other state: each epoch's decision is
        a pure function of the scores, the policy's seed and the epoch, so a resumed run
        rewrites exactly what an uninterrupted one wrote — provided it prunes the same way,
        which :meth:`load_state_dict` checks."""
        return {"corpus_fingerprint": self.corpus.fingerprint, "decay": self.decay,
                "anneal": repr(self.policy.anneal),
                "burn_in_epochs": str(self.policy.burn_in_epochs), **self.policy.describe()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Refuse to resume with another corpus, policy, ratio, seed, schedule or decay."""
        mine = self.state_dict()
        for key in sorted(set(mine) | set(state)):
            if state.get(key) != mine.get(key):
                raise ValueError(f"cannot resume: the checkpoint's pruner has {key}="
                                 f"{state.get(key)!r}, this one {key}={mine.get(key)!r}; build the "
                                 "Pruner as in the run that wrote the checkpoint")

    def on_epoch_end(self, epoch: int, total_epochs: int) -> str | None:
        """Write the manifests for epoch ``epoch + 1``; returns their directory, or None after
        the run's last epoch (``epoch + 1 >= total_epochs``), for which nothing is written:
        that epoch never runs. (The ranks still merge their scores, so every rank's store
        holds the same final scores.)"""
        target = epoch + 1
        distributed = dist.is_available() and dist.is_initialized()
        if distributed:
            merge_rank_scores(self.store)
        self._warn_schedule(total_epochs)
        if target >= total_epochs:
            log.info("epoch %d was the run's last (of %d): no manifest is written for epoch %d",
                     epoch, total_epochs, target)
            return None
        mean = self._mean() if self.decay > 0 else 0.0  # of the scores the decision sees
        if not distributed or dist.get_rank() == 0:
            self.write(target, total_epochs)  # logs its summary
        if distributed:
            dist.barrier()
        if self.decay > 0:  # every rank, from the written decision, so stores stay equal
            self._decay_pruned(target, mean)
        return os.path.join(self.out_dir, f"epoch={target:05d}")

    def _warn_schedule(self, total_epochs: int) -> None:
        """Warn (once per run length) when the schedule prunes no epoch of the run."""
        if total_epochs in self._warned:
            return
        self._warned.add(total_epochs)
        message = schedule_warning(self.policy, total_epochs)
        if message is not None:
            log.warning("%s", message)
            warnings.warn(message, UserWarning, stacklevel=3)

    def _mean(self) -> float:
        n, read = self.store.num_samples, self.store.read_range
        return sum(float(read(a, min(a + CHUNK, n)).astype(np.float64).sum())
                   for a in range(0, n, CHUNK)) / n

    def _decay_pruned(self, epoch: int, mean: float) -> None:
        keep = read_epoch(self.out_dir, epoch, self.corpus.fingerprint, self.corpus.shard_counts)
        if keep is None:
            return
        n, kept = self.store.num_samples, keep.kept_ids
        for a in range(0, n, CHUNK):
            b = min(a + CHUNK, n)
            pruned = np.ones(b - a, dtype=bool)
            pruned[kept[np.searchsorted(kept, a):np.searchsorted(kept, b)] - a] = False
            if pruned.any():
                values = self.store.read_range(a, b)
                values[pruned] = (1 - self.decay) * values[pruned] + self.decay * mean
                self.store.write_range(a, values, where=pruned)  # the rest stay as they are

    def write(self, epoch: int, total_epochs: int) -> dict[str, float]:
        """Decide epoch ``epoch`` from the current scores and write its manifests; returns the
        decision's summary (see the class docstring), also kept in :attr:`last_summary`,
        logged and given to ``log_fn``.

        Works chunk by chunk (see :mod:`es_stream.policy`): a shard's file is written as soon as
        the chunks covering it are decided, so memory stays bounded for any corpus size.
        Holds the epoch's writer lock throughout (:func:`es_stream.manifest.epoch_writer`): a
        second writer of the same epoch raises :class:`ManifestError` before touching anything.
        Every file carries the write id (:meth:`write_id`), ``_SUCCESS`` last of all.
        """
        if not self._claimed:  # this run's directory from now on (see the class docs)
            claim_run(self.out_dir, self.run, self.overwrite)
            self._claimed = True
        with epoch_writer(self.out_dir, epoch):
            write_id = self.write_id(epoch, total_epochs)
            summary = self._write_locked(epoch, total_epochs, write_id)
            mark_success(self.out_dir, epoch, write_id)
        self.last_summary = summary
        self._log(summary, why_kept_all(self.policy, epoch, total_epochs, first_epoch=0))
        return summary

    def _log(self, summary: dict[str, float], kept_all: str | None = None) -> None:
        log.info("epoch %d: kept %d of %d samples (%d pruned, %d rescaled, %d never scored and "
                 "kept); scores p10/p50/p90 %.6g/%.6g/%.6g%s", summary["epoch"], summary["kept"],
                 summary["samples"], summary["pruned"], summary["rescaled"],
                 summary["never_scored"], summary["score_p10"], summary["score_p50"],
                 summary["score_p90"], "" if kept_all is None else f"; nothing pruned: {kept_all}")
        emit(summary, int(summary["epoch"]), self.log_fn, None, "es/prune/")

    def write_id(self, epoch: int, total_epochs: int) -> str:
        """The id of the decision for ``epoch``: a digest of everything that decides it (corpus,
        policy and its schedule, epoch, total epochs, es-stream version, every stored score,
        the never-scored sentinel included). Content, not a random id, so that rewriting an
        epoch with the same inputs (a rerun after a crash) writes byte-identical files, while
        two different decisions never share an id. One extra pass over the store, a chunk at a
        time."""
        n, reader = self.store.num_samples, self.store.range_reader()
        # decay acts on the store after the manifests are written: it does not decide them
        decides = {k: v for k, v in self.state_dict().items() if k != "decay"}
        header = {**decides, "epoch": epoch, "total_epochs": total_epochs,
                  "es_stream_version": __version__}
        h = hashlib.blake2b(digest_size=16)
        h.update(json.dumps(header, sort_keys=True, default=repr).encode())
        for a in range(0, n, CHUNK):
            b = min(a + CHUNK, n)
            h.update(np.ascontiguousarray(reader.scores(a, b), np.float32).tobytes())
            h.update(np.packbits(reader.scored(a, b)).tobytes())
        return h.hexdigest()

    def _write_locked(self, epoch: int, total_epochs: int, write_id: str) -> dict[str, float]:
        reader = self.store.range_reader()  # scores and never-scored masks, one read per chunk
        n, read = self.store.num_samples, reader.scores
        summary: dict[str, float] = {"epoch": int(epoch), "samples": n, "kept": 0, "pruned": 0,
                                     "rescaled": 0, "never_scored": 0}
        stride = max(1, math.ceil(n / SCORE_SAMPLE))
        sampled: list[np.ndarray] = []
        meta = {"corpus_fingerprint": self.corpus.fingerprint, "epoch": str(epoch),
                "es_stream_version": __version__, **self.policy.describe(), WRITE_ID: write_id,
                "run_id": self.run["run_id"]}
        clear_success(self.out_dir, epoch)
        starts = self.corpus.shard_starts
        shard, buf_start = 0, 0
        buf_keep, buf_weight = np.empty(0, bool), np.empty(0, np.float32)
        # at most 2 x WRITERS shards in flight: memory stays bounded; the first error raises
        pending: deque[Future] = deque()
        with ThreadPoolExecutor(WRITERS, thread_name_prefix="es-manifest") as pool:
            for d in self.policy.decide(read, n, epoch, total_epochs, scored=reader.scored,
                                        source=self.store.describe()):
                _count(summary, d)
                buf_keep = np.concatenate([buf_keep, d.keep])  # new arrays: the slices handed
                buf_weight = np.concatenate([buf_weight, d.weight])  # to writers never change
                end = buf_start + len(buf_keep)
                while shard < self.corpus.num_shards and starts[shard + 1] <= end:
                    a, b = int(starts[shard]), int(starts[shard + 1])
                    scores = read(a, b)
                    sampled.append(_scored_sample(scores, reader.scored(a, b), a, stride))
                    pending.append(pool.submit(
                        write_shard, shard_file(self.out_dir, epoch, shard), a,
                        buf_keep[a - buf_start:b - buf_start], scores,
                        buf_weight[a - buf_start:b - buf_start],
                        {**meta, "shard": self.corpus.shards[shard].name}))
                    while len(pending) > 2 * WRITERS:
                        pending.popleft().result()
                    shard += 1
                done = int(starts[shard]) - buf_start
                buf_keep, buf_weight, buf_start = buf_keep[done:], buf_weight[done:], buf_start + done
            while pending:  # every shard file is in place before _SUCCESS is written
                pending.popleft().result()
        summary.update(_score_quantiles(sampled))
        return summary


def _scored_sample(scores: np.ndarray, scored: np.ndarray, start: int, stride: int) -> np.ndarray:
    """The scores of the scored samples among ids ``start ..`` that are multiples of
    ``stride`` (all of them at stride 1)."""
    first = -start % stride
    return scores[first::stride][scored[first::stride]]


def _score_quantiles(sampled: list[np.ndarray]) -> dict[str, float]:
    values = np.concatenate(sampled) if sampled else np.empty(0, np.float32)
    if values.size == 0:
        return {"score_p10": math.nan, "score_p50": math.nan, "score_p90": math.nan}
    p10, p50, p90 = np.quantile(values.astype(np.float64), [0.1, 0.5, 0.9])
    return {"score_p10": float(p10), "score_p50": float(p50), "score_p90": float(p90)}


def _count(summary: dict[str, int], d: Decision) -> None:
    kept = int(d.keep.sum())
    summary["kept"] += kept
    summary["pruned"] += len(d.keep) - kept
    summary["rescaled"] += int((d.keep & (d.weight != 1)).sum())
    summary["never_scored"] += d.never_scored
