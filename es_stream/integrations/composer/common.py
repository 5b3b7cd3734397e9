"""What the Composer algorithms share: the per-sample loss, where the scores go in a
checkpoint, the training dataset and model behind Composer's wrappers, and the manifest
directory a per-epoch pruner writes."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

import torch
from composer.core import State, TimeUnit

from ..._check import int_at_least
from ...corpus import Corpus
from ...store import ScoreStore, metadata_path

__all__ = ["LossFn", "ScoreCheckpoint", "agreed_manifests", "causal_lm_sample_loss",
           "check_dataset_ranks", "per_sample_losses", "refresh_dataloader_len", "train_dataset",
           "unwrap_model"]

#: ``(outputs, batch) -> one loss per sample``
LossFn = Callable[[Any, Any], torch.Tensor]


class ScoreCheckpoint:
    """Where the scores go in a checkpoint: inside it as a tensor (``store_path=None``, an
    in-memory store), or as the path of a snapshot written beside a memory-mapped store.

    Args:
        store_path: ``None``, or the ``.npy`` file of a memory-mapped store; snapshots are
            ``<store_path>.step-<step>.npy``.
        keep_snapshots: how many of the newest snapshots to keep.
        device: device of an in-memory store.
    """

    def __init__(self, store_path: str | os.PathLike | None = None, keep_snapshots: int = 2,
                 device: torch.device | str | None = None) -> None:
        keep_snapshots = int_at_least(keep_snapshots, 1, "keep_snapshots")
        self.store_path = None if store_path is None else os.path.abspath(os.fspath(store_path))
        self.keep_snapshots, self.device = keep_snapshots, device

    def open_store(self, num_samples: int) -> ScoreStore:
        if self.store_path is None:
            return ScoreStore(num_samples, device=self.device)
        return ScoreStore.open(self.store_path, num_samples)

    def save(self, store: ScoreStore, step: int) -> dict[str, Any]:
        """``{"scores": tensor}`` or ``{"scores_path": snapshot}``."""
        if self.store_path is None:
            return {"scores": torch.from_numpy(store.to_numpy())}
        path = f"{self.store_path}.step-{step:012d}.npy"
        store.save(path)
        directory, base = os.path.split(self.store_path)
        old = sorted(name for name in os.listdir(directory)
                     if name.startswith(base + ".step-") and name.endswith(".npy"))
        for name in old[:-self.keep_snapshots]:
            os.unlink(os.path.join(directory, name))
            with contextlib.suppress(FileNotFoundError):  # its metadata goes with it
                os.unlink(metadata_path(os.path.join(directory, name)))
        return {"scores_path": path}

    def restore(self, store: ScoreStore, state: dict[str, Any]) -> None:
        """Put the scores :meth:`save` described back into ``store``."""
        if "scores" in state:
            store.load_state_dict({"num_samples": store.num_samples, "scores": state["scores"]})
            return
        path = state["scores_path"]
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: the score snapshot this checkpoint names is gone "
                                    "(raise keep_snapshots= to at least the number of checkpoints "
                                    "Composer keeps); ES cannot resume exactly without it")
        store.restore(path)


def train_dataset(state: State) -> Any:
    """The training DataLoader's dataset (None when the loader has none)."""
    return getattr(state.train_dataloader, "dataset", None)


def unwrap_model(state: State) -> Any:
    """The ComposerModel itself, out of a DistributedDataParallel wrapper."""
    model = state.model
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def per_sample_losses(model: Any, outputs: Any, batch: Any, size: int, loss_fn: LossFn | None,
                      who: str, what: str) -> torch.Tensor:
    """One float loss per sample of ``batch`` (``size`` samples): ``loss_fn(outputs, batch)``, or
    the model's own ``loss(outputs, batch, reduction="none")``. Runs in the caller's grad and
    precision context. ``who`` (the algorithm) and ``what`` (meta-batch, microbatch) name the
    caller in the errors."""
    if loss_fn is not None:
        losses = loss_fn(outputs, batch)
    else:
        try:
            losses = model.loss(outputs, batch, reduction="none")
        except TypeError as exc:
            raise TypeError(f"{who}: {type(model).__name__}.loss does not take reduction='none'; "
                            "pass loss_fn=(outputs, batch) -> per-sample losses "
                            "(causal_lm_sample_loss for language models)") from exc
    if not isinstance(losses, torch.Tensor) or tuple(losses.shape) != (size,):
        shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
        raise ValueError(f"{who}: the loss gave {shape} for a {what} of {size} samples; it must "
                         f"give one loss per sample ([B]) — pass loss_fn= (see the {who} docs "
                         "on losses)")
    return losses.float()


def agreed_manifests(state: State, dataset: Any, corpus: Corpus | None,
                     manifests: str | os.PathLike | None, who: str) -> str:
    """The manifest directory a per-epoch pruner writes, checked against the run: an epoch
    ``max_duration``, a corpus, and the same directory as the training dataset reads."""
    if state.max_duration is None or state.max_duration.unit != TimeUnit.EPOCH:
        raise ValueError(f"{who} prunes per epoch: give the Trainer an epoch max_duration "
                         f"(e.g. '10ep'), got {state.max_duration}")
    if corpus is None:
        raise ValueError(f"{who} needs the corpus the manifests describe: train on an "
                         "ESStreamingDataset or pass corpus=")
    read_by = getattr(dataset, "manifests", None)
    manifests = manifests or read_by
    if manifests is None:
        raise ValueError(f"{who} needs a manifest directory: pass manifests= here and the same "
                         "to ESStreamingDataset(manifests=...)")
    manifests = os.fspath(manifests)
    if read_by is None or os.path.abspath(read_by) != os.path.abspath(manifests):
        raise ValueError(f"{who} writes manifests to {manifests!r} but the training dataset reads "
                         f"{read_by!r}: pruning would never apply; give "
                         "ESStreamingDataset(manifests=...) the same directory")
    return manifests


def check_dataset_ranks(state: State) -> None:
    """At an epoch's start: the ranks' training datasets agree (see
    ``ESStreamingDataset.check_ranks``), or every rank raises ``RankMismatchError``."""
    dataset = train_dataset(state)
    if state.dataloader is state.train_dataloader and hasattr(dataset, "check_ranks"):
        dataset.check_ranks(int(state.timestamp.epoch))


def refresh_dataloader_len(state: State) -> None:
    """Make Composer re-read ``len(dataloader)`` when the training dataset prunes per epoch."""
    # The trainer reads len(dataloader) once; a pruned epoch has fewer batches than the
    # first, an annealing epoch after it more. -1 makes Composer read the length again,
    # which ESStreamingDataset gives for the epoch about to run.
    dataset = train_dataset(state)
    if state.dataloader is state.train_dataloader and getattr(dataset, "manifests", None) \
            and hasattr(dataset, "epoch_length"):
        state.dataloader_len = -1


def causal_lm_sample_loss(outputs: Any, batch: Any, *, labels_key: str = "labels",
                          ignore_index: int = -100) -> torch.Tensor:
    """Per-sample loss of a causal language model: each sample's **mean** next-token cross
    entropy over its target tokens (labels other than ``ignore_index``).

    ``outputs`` holds the logits ``[B, T, V]`` (a tensor, ``outputs.logits`` or
    ``outputs["logits"]``, as Hugging Face models return); ``batch[labels_key]`` holds the
    labels ``[B, T]`` aligned with the inputs, shifted here by one position (the Hugging Face
    convention). A sample with no target token gets loss 0. Use it as
    ``EvolvedSampling(..., loss_fn=causal_lm_sample_loss)``: a Hugging Face model's own loss is
    already averaged over the batch.
    """
    logits = outputs if isinstance(outputs, torch.Tensor) else (
        outputs["logits"] if isinstance(outputs, dict) else getattr(outputs, "logits", None))
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise ValueError("causal_lm_sample_loss: outputs must be logits [B, T, V] or carry them as "
                         f".logits / ['logits'], got {type(outputs).__name__}")
    labels = batch[labels_key]
    logits, labels = logits[:, :-1].float(), labels[:, 1:].to(logits.device)
    mask = labels != ignore_index
    tokens = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).clamp_min(0), reduction="none")
    tokens = tokens.view(labels.shape) * mask
    return tokens.sum(1) / mask.sum(1).clamp_min(1)

