"""Reference models for the reference-score methods of the loop (``rho``, ``rho_es``, the bands;
``docs/REFERENCE.md``): a small model trained once on a held-out part of the training
distribution, then one scoring pass over the training corpus into a memory-mapped score store.

**Protocol (RHO-LOSS's).** The held-out part comes from the same generator and the same label
noise as the training corpus, and no clean label is used:

* MNIST-1D (:func:`mnist1d_reference`): ``heldout`` extra samples from ``make_dataset``
  generated with another seed (``data_seed``; the templates and transformations are the same,
  so the distribution is, and no sample is a training or test sample), the same symmetric
  label-noise rate applied by the same :func:`~pipelines.mnist1d.data.add_label_noise`. The
  reference is a narrower :class:`~pipelines.mnist1d.train.CNN1D` (``width``).
* textlm (:func:`textlm_reference`): the train-split shards after those trained on
  (:func:`pipelines.textlm.data.reference_corpus`), never the evaluation text; the reference is
  a GRU of hidden size ``width``.

The reference trains with uniform batches through the shared loop (:func:`pipelines.loop.train`),
then :func:`es_stream.score_corpus` scores every training sample with the workload's own
per-sample loss (what ``es-stream score`` runs), through a :class:`es_stream.Scorer` whose
``name`` identifies this cached reference.

**Cache.** ``<root>/<workload>-ref-<key>/`` with ``model.pt``, ``train.json`` (the reference's
training wall-clock and quality), ``scores.npy`` (+ its metadata: scorer, corpus, complete) and
``meta.json``; ``key`` digests the :class:`ReferenceConfig`, what the workload names about its
data, and both corpora's fingerprints. Every file is written atomically, ``meta.json`` last, so a
directory with ``meta.json`` is complete and is reused as it is (no retraining, no rescoring); a
run killed while scoring keeps the trained model and resumes the scoring pass.

**Cost.** ``train_s`` (training wall-clock, evaluation excluded) and ``score_s`` (the scoring
pass), and their CPU seconds ``train_cpu_s`` and ``score_cpu_s``, are in ``meta.json`` and in the returned :class:`pipelines.loop.Reference`; the loop adds
their sum to the wall-clock of every method that reads the reference — each run pays it in full,
as a single run of the method would — and reports it on its own (``reference_s``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from es_stream.atomic import atomic_write

from .loop import CapturingFactory, Reference, RunConfig, Workload, cpu_seconds, train

#: bumped when what a cached reference means changes, so an old cache is not reused
CACHE_VERSION = 2  # 2: meta.json carries the CPU seconds of training and scoring
#: the reference settings per workload when a flag is not given (see ReferenceConfig)
DEFAULTS: dict[str, dict[str, Any]] = {
    "mnist1d": {"heldout": 10000, "width": 16, "epochs": 10, "b": 64, "lr": 3e-3},
    "textlm": {"heldout": 4096, "width": 64, "epochs": 2, "b": 32, "lr": 3e-3},
    # webtext: the clean seed set (pipelines.webtext.train.seed_set), 256 KiB of text
    "webtext": {"heldout": 2048, "width": 64, "epochs": 2, "b": 32, "lr": 3e-3},
}
#: MNIST-1D test samples generated with the held-out split (unused: the reference is evaluated
#: on the target's test set, for the record only)
_HELDOUT_TEST = 10


@dataclass(frozen=True)
class ReferenceConfig:
    """What determines a reference model besides the workload's data (part of its cache key).

    ``heldout``: samples it trains on (MNIST-1D: generated; textlm: sequences, rounded up to
    whole shards). ``width``: MNIST-1D CNN width (the target's is 32) / textlm GRU hidden size
    (the target's is 192). ``epochs``, ``b``, ``lr``: its uniform training (Adam, cosine).
    ``seed``: its initialisation and data order. ``data_seed``: MNIST-1D's generation seed of
    the held-out split (must differ from the corpus's, 42 by default).
    """

    heldout: int
    width: int
    epochs: int
    b: int = 64
    lr: float = 3e-3
    seed: int = 0
    data_seed: int = 1042

    def __post_init__(self) -> None:
        for name in ("heldout", "width", "epochs", "b"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"reference {name} must be an integer >= 1, got {value!r} "
                                 f"(--reference-{name})")
        if not self.lr > 0:
            raise ValueError(f"reference lr must be > 0, got {self.lr!r} (--reference-lr)")

    @classmethod
    def for_workload(cls, workload: str, **given: Any) -> "ReferenceConfig":
        """The config of ``workload`` (``mnist1d`` or ``textlm``): :data:`DEFAULTS` with the
        ``given`` settings that are not None."""
        if workload not in DEFAULTS:
            raise ValueError(f"no reference model for workload {workload!r}; "
                             f"known: {', '.join(DEFAULTS)}")
        return cls(**{**DEFAULTS[workload], **{k: v for k, v in given.items() if v is not None}})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def cache_key(identity: dict[str, Any], config: ReferenceConfig, target: Workload,
              heldout: Workload) -> str:
    """The digest naming a cached reference (see the module docstring)."""
    blob = json.dumps({"version": CACHE_VERSION, "identity": identity, "config": config.to_dict(),
                       "corpus": target.corpus.fingerprint,
                       "heldout": heldout.corpus.fingerprint}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with atomic_write(path) as tmp:
        Path(tmp).write_text(json.dumps(data, indent=1))


def _fit(directory: Path, heldout: Workload, config: ReferenceConfig,
         progress: bool) -> tuple[nn.Module, dict[str, Any]]:
    """The reference model: trained on ``heldout`` (uniform batches of b through the loop) and
    saved, or loaded when an earlier call trained it and was killed while scoring."""
    model_path, train_path = directory / "model.pt", directory / "train.json"
    if train_path.exists():
        model = heldout.make_model()
        model.load_state_dict(torch.load(model_path, map_location="cpu", weights_only=True))
        return model, json.loads(train_path.read_text())
    capture = CapturingFactory(heldout.make_model)
    r = train(dataclasses.replace(heldout, make_model=capture), "uniform",
              RunConfig(config.epochs, b=config.b, B=config.b, lr=config.lr, seed=config.seed,
                        progress=progress))
    with atomic_write(model_path) as tmp:
        torch.save(capture.model.state_dict(), tmp)
    trained = {"train_s": r["wall_clock_s"], "train_cpu_s": r["cpu_s"], "quality": heldout.quality,
               "final": r[f"final_{heldout.quality}"], "params": r["params"],
               "heldout_samples": heldout.corpus.num_samples}
    _write_json(train_path, trained)  # after model.pt: train.json means the model is there
    return capture.model, trained


def reference_scores(root: str | os.PathLike, identity: dict[str, Any], target: Workload,
                     heldout: Workload, config: ReferenceConfig, *, progress: bool = False,
                     log: Callable[[str], None] = print) -> tuple[Reference, dict[str, Any]]:
    """The reference of ``config``: a model made by ``heldout.make_model`` and trained on
    ``heldout.corpus``, and its losses on every sample of ``target.corpus`` (``target.losses``
    with ``target``'s decode, collate and device) in a memory-mapped store; built under ``root``
    unless cached there (see the module docstring). ``identity``: what the workload names about
    its data (in the key and meta.json). Returns the loop's :class:`Reference` and meta.json."""
    from es_stream import Scorer, score_corpus

    key = cache_key(identity, config, target, heldout)
    directory = Path(root) / f"{target.name}-ref-{key}"
    meta_path, store = directory / "meta.json", directory / "scores.npy"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        return Reference(str(store), meta["train_s"], meta["score_s"], meta["scorer"],
                         meta.get("train_cpu_s"), meta.get("score_cpu_s")), meta
    directory.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model, trained = _fit(directory, heldout, config, progress)
    model = model.to(target.device).eval()
    name = f"pipelines.reference:{target.name}-ref-{key}"
    scorer = Scorer(score_fn=functools.partial(target.losses, model), model=model,
                    decode=target.decode, collate=target.collate,
                    device=None if target.device == "cpu" else target.device, name=name)
    cpu0 = cpu_seconds()
    result = score_corpus(target.corpus, scorer, store, meta_batch_size=1024, num_workers=0,
                          progress=progress)
    score_cpu_s = cpu_seconds() - cpu0
    meta = {"key": key, "scorer": name, "store": str(store.resolve()),
            "config": config.to_dict(), "identity": identity, **trained,
            "score_s": result.seconds, "score_cpu_s": score_cpu_s, "scored_samples": target.corpus.num_samples,
            "total_s": time.perf_counter() - t0}
    _write_json(meta_path, meta)
    log(f"reference for {target.name}: trained on {trained['heldout_samples']} held-out samples "
        f"({trained['params']} params, {config.epochs} epochs) in {trained['train_s']:.1f} s, "
        f"{trained['quality']} {trained['final']:.4f}; scored {target.corpus.num_samples} "
        f"training samples in {result.seconds:.1f} s; cached in {directory}")
    return Reference(str(store), trained["train_s"], result.seconds, name,
                     trained["train_cpu_s"], score_cpu_s), meta


def mnist1d_reference(data_root: str | os.PathLike, root: str | os.PathLike, data: Any,
                      noise: float, data_seed: int, config: ReferenceConfig, *,
                      progress: bool = False,
                      log: Callable[[str], None] = print) -> tuple[Reference, dict[str, Any]]:
    """The MNIST-1D reference for the built corpus ``data`` (a
    :class:`~pipelines.mnist1d.data.MNIST1D` generated with ``data_seed`` at label noise
    ``noise``): trained on ``config.heldout`` samples generated with ``config.data_seed`` and
    the same noise (built under ``data_root``), cached under ``root``."""
    from .mnist1d.data import build
    from .mnist1d.train import CNN1D, workload

    if config.data_seed == data_seed:
        raise ValueError(f"reference data_seed {config.data_seed} is the corpus's generation seed: "
                         "the held-out split would repeat the training samples; give another "
                         "(--reference-seed)")
    held = build(data_root, config.heldout, _HELDOUT_TEST, noise, config.data_seed, "wds")
    target = workload(data.corpus, data.test_x, data.test_y)
    heldout = workload(held.corpus, data.test_x, data.test_y,
                       make_model=functools.partial(CNN1D, width=config.width))
    identity = {"workload": "mnist1d", "noise": noise, "data_seed": data_seed,
                "heldout_build": held.directory.name}
    return reference_scores(root, identity, target, heldout, config, progress=progress, log=log)


def textlm_reference(root: str | os.PathLike, data: Any, evaluation: torch.Tensor, target: Workload,
                     config: ReferenceConfig, *, progress: bool = False,
                     log: Callable[[str], None] = print) -> tuple[Reference, dict[str, Any]]:
    """The byte-LM reference for the training workload ``target`` on the built text ``data`` (a
    :class:`~pipelines.textlm.data.TextLM`): a GRU of hidden size ``config.width`` trained on
    the train shards after those ``target`` trains on (``config.heldout`` sequences, whole
    shards), evaluated on ``evaluation`` (the held-out sequences ``target`` is evaluated on) for
    the record only; cached under ``root``."""
    from .textlm.data import reference_corpus
    from .textlm.train import workload

    held_corpus = reference_corpus(data, config.heldout)
    heldout = workload(held_corpus, evaluation, "gru", config.width,
                       device=target.device)
    identity = {"workload": "textlm", "build": data.directory.name,
                "train_shards": data.train_shards}
    return reference_scores(root, identity, target, heldout, config, progress=progress, log=log)


__all__ = ["CACHE_VERSION", "DEFAULTS", "ReferenceConfig", "cache_key", "mnist1d_reference",
           "reference_scores", "textlm_reference"]
