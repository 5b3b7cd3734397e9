"""Pre-training for the MNIST-1D fine-tuning regime: a :class:`~pipelines.mnist1d.train.CNN1D`
trained on a *source* distribution, cached on disk, from which every method and seed then
fine-tunes on the target corpus.

**Source.** An MNIST-1D set generated with its own seed (``source_seed``, so no target sample
is ever pre-trained on) and restricted to part of the classes (``classes``, default 0-4): the
pre-trained model knows half the task, and a target sample of those classes is mostly learned
before fine-tuning starts, the others are not. ``classes`` of all ten gives the other flavour,
the same task on other samples.

**Training.** Uniform batches through the shared loop (:func:`pipelines.loop.train`), seed
``seed``, ``epochs`` epochs, Adam ``lr`` with the loop's cosine schedule.

**Cache.** ``<root>/cnn1d-<key>/`` with ``model.pt`` (the state dict) and ``meta.json`` (the
configuration, the pre-training wall-clock and its source test accuracy), ``key`` a digest of
:class:`PretrainConfig`: built once and reused by every method and seed (its cost is reported
once, never counted in a method's wall-clock). Both files are written atomically, ``meta.json``
after ``model.pt``, so a directory with ``meta.json`` is complete.

**Fine-tuning.** :class:`Pretrained` is a model factory for the workload
(:func:`pipelines.mnist1d.train.workload`): it builds the CNN and loads every weight, the
classification head included (the label space is the same ten classes), so the run's seed only
changes the data order and the selection, not the starting point.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from es_stream.atomic import atomic_write

from ..loop import CapturingFactory
from .data import SEQ_LEN, build, check_classes
from .train import CNN1D, LEARNED_LOSS, accuracy, workload

#: bumped when what a cached model means changes, so an old cache is not reused
CACHE_VERSION = 1


@dataclass(frozen=True)
class PretrainConfig:
    """What determines a pre-trained model (its cache key).

    ``source_train`` / ``source_test`` are the sizes generated before ``classes`` filters them.
    """

    source_seed: int = 7
    source_train: int = 20000
    source_test: int = 5000
    classes: tuple[int, ...] = (0, 1, 2, 3, 4)
    epochs: int = 10
    b: int = 64
    lr: float = 3e-3
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(check_classes(self.classes) or ()))
        if self.epochs < 1 or self.b < 1 or self.source_train < 1 or self.source_test < 1:
            raise ValueError(f"pre-training needs epochs, b, source_train and source_test >= 1, "
                             f"got {self.epochs}, {self.b}, {self.source_train}, "
                             f"{self.source_test}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PretrainConfig":
        """The config of a JSON dict (``classes`` a list), unknown keys refused by name."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown pre-training setting(s) {unknown}; known: {sorted(names)}")
        return cls(**{**d, "classes": tuple(d.get("classes", cls.classes))})

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (run keys, meta.json): ``classes`` as a list."""
        return {**dataclasses.asdict(self), "classes": list(self.classes)}

    def key(self) -> str:
        blob = json.dumps({"version": CACHE_VERSION, "model": "CNN1D", "length": SEQ_LEN,
                           **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


class Pretrained:
    """Model factory: a :class:`CNN1D` with the weights of ``path`` (a state dict). A class, not
    a closure, so it pickles; the loop calls it right after ``torch.manual_seed``, so the fresh
    initialisation it overwrites costs the seed nothing."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = str(path)

    def __call__(self) -> nn.Module:
        model = CNN1D()
        model.load_state_dict(torch.load(self.path, map_location="cpu", weights_only=True))
        return model


def cache_dir(root: str | os.PathLike, config: PretrainConfig) -> Path:
    """Where the model of ``config`` is cached under ``root``."""
    return Path(root) / f"cnn1d-{config.key()}"


def pretrain(root: str | os.PathLike, data_root: str | os.PathLike, config: PretrainConfig,
             progress: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The pre-trained model of ``config``: built (source data under ``data_root``, model
    under ``root``) unless cached. Returns its meta.json: ``config``, ``path`` (of model.pt),
    ``pretrain_s`` (training wall-clock, evaluation excluded), ``total_s`` (with building the
    source data), ``source_acc`` (on the source test split) and ``source_train_samples``."""
    from ..loop import RunConfig, train

    directory = cache_dir(root, config)
    meta_path = directory / "meta.json"
    if meta_path.exists():
        return json.loads(meta_path.read_text())
    t0 = time.perf_counter()
    source = build(data_root, config.source_train, config.source_test, 0.0, config.source_seed,
                   "wds", classes=config.classes)
    capture = CapturingFactory(CNN1D)
    w = workload(source.corpus, source.test_x, source.test_y, make_model=capture)
    result = train(w, "uniform", RunConfig(config.epochs, b=config.b, B=config.b, lr=config.lr,
                                           seed=config.seed, progress=progress))
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_write(directory / "model.pt") as tmp:
        torch.save(capture.model.state_dict(), tmp)
    meta = {"config": config.to_dict(), "key": config.key(),
            "path": str((directory / "model.pt").resolve()),
            "pretrain_s": result["wall_clock_s"], "total_s": time.perf_counter() - t0,
            "source_acc": result["final_acc"], "source_train_samples": source.corpus.num_samples,
            "source_dir": str(source.directory)}
    with atomic_write(meta_path) as tmp:
        Path(tmp).write_text(json.dumps(meta, indent=1))
    log(f"pre-trained CNN1D on {source.corpus.num_samples} source samples (classes "
        f"{list(config.classes)}, seed {config.source_seed}) for {config.epochs} epochs in "
        f"{result['wall_clock_s']:.1f} s: source test accuracy {result['final_acc']:.4f}; "
        f"cached in {directory}")
    return meta


@torch.no_grad()
def start_diagnostics(model: nn.Module, x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor,
                      test_x: torch.Tensor, test_y: torch.Tensor, batch: int = 4096) -> dict[str, float]:
    """What a model knows of the target before fine-tuning: over the target train set
    ``(x, y)``, the fraction it classifies correctly (``correct``) and the fraction whose loss is
    below ln 2 (``learned``, the loop's ``learned_fraction`` criterion); and its test accuracy
    (``test_acc``: the quality a fine-tuning run starts from)."""
    model.eval()
    x = torch.as_tensor(x, dtype=torch.float32)
    y = torch.as_tensor(y, dtype=torch.int64)
    if x.dim() == 2:
        x = x.unsqueeze(1)
    correct = learned = 0
    for i in range(0, len(y), batch):
        logits = model(x[i:i + batch])
        correct += int((logits.argmax(1) == y[i:i + batch]).sum())
        learned += int((F.cross_entropy(logits, y[i:i + batch], reduction="none")
                        < LEARNED_LOSS).sum())
    n = max(len(y), 1)
    return {"correct": correct / n, "learned": learned / n,
            "test_acc": accuracy(model, test_x, test_y), "learned_loss": LEARNED_LOSS,
            "samples": len(y)}


__all__ = ["PretrainConfig", "Pretrained", "pretrain", "start_diagnostics", "cache_dir",
           "CACHE_VERSION"]
