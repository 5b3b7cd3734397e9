"""Train a small 1D CNN on the MNIST-1D corpus with standard batches or with loss-based
selection (Evolved Sampling and its baselines), on CPU.

Every method reads the same stream (``ESDataset`` + ``es_stream.loader``), so loader overhead is
the same for all: ``uniform`` asks for meta-batches of b and trains on all of each; the others
ask for meta-batches of B, score them with a no-grad forward (per-sample losses), let a selector
pick b, and take a forward + backward + step on those b. ``random`` is the control for the
selection itself: it pays for the scoring forward, then picks b uniformly.

Two methods also prune the set at epoch ends through Parquet manifests (``es_stream.Pruner``):
``eswp`` is ES plus :class:`ESWPPolicy` on the selector's scores; ``infobatch`` trains uniform
batches of b, keeps each sample's last loss as its score, prunes with
:class:`InfoBatchPolicy` and weights the kept low-loss samples by ``MetaBatch.weights``.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

import es_stream
from es_stream import (Corpus, ESDataset, ESSelector, LossSelector, SelectiveBackpropSelector,
                       Selector, TopKSelector, UniformSelector)

from ..common import make_pruner, save_scores
from .data import SEQ_LEN, Collate, DecodeWDS

METHODS = ("uniform", "es", "eswp", "infobatch", "loss", "selective_backprop", "topk", "random")
BATCH_OF_B = ("uniform", "infobatch")  # methods that train on every sample of a meta-batch of b


class CNN1D(nn.Module):
    """Two conv blocks (1 -> 32 -> 64 channels, kernel 5, ReLU, max-pool 2) and a two-layer
    head: about 52k parameters. No BatchNorm or dropout, so the scoring forward gives the same
    losses whether the model is in train or eval mode."""

    def __init__(self, length: int = SEQ_LEN, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(1, 32, 5, padding=2), nn.ReLU(), nn.MaxPool1d(2),
            nn.Conv1d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool1d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * (length // 4), 64), nn.ReLU(),
                                  nn.Linear(64, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def make_selector(method: str, corpus: Corpus, b: int, seed: int, total_steps: int,
                  **es_options: Any) -> Selector | None:
    """The selector of ``method`` (None for ``uniform``). ``es_options`` go to
    :class:`ESSelector` (beta1, beta2, burn_in, anneal, ...)."""
    if method in BATCH_OF_B:
        return None
    if method in ("es", "eswp"):
        return ESSelector(corpus.num_samples, b, seed=seed, total_steps=total_steps, **es_options)
    factories: dict[str, Callable[[], Selector]] = {
        "loss": lambda: LossSelector(b, seed=seed),
        "selective_backprop": lambda: SelectiveBackpropSelector(b, seed=seed),
        "topk": lambda: TopKSelector(b, seed=seed),
        "random": lambda: UniformSelector(b, seed=seed),
    }
    if method not in factories:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    return factories[method]()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 4096) -> float:
    """Top-1 accuracy over an in-memory set."""
    correct = 0
    for i in range(0, len(y), batch):
        correct += int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
    return correct / len(y)


def train(method: str, corpus: Corpus, test_x: torch.Tensor, test_y: torch.Tensor, epochs: int,
          b: int = 64, B: int = 128, lr: float = 3e-3, seed: int = 0, workers: int = 2,
          progress: bool = True, es_options: dict[str, Any] | None = None,
          eswp_ratio: float = 0.3, infobatch_ratio: float = 0.5, prune_anneal: float = 0.125,
          prune_burn_in_epochs: int = 1, run_dir: str | None = None,
          budget_epochs: float | None = None) -> dict[str, Any]:
    """Train one model with ``method`` for ``epochs`` epochs and report time, counts, accuracy.

    Adam with a cosine learning-rate schedule over the run's progress in epochs (epoch plus the
    fraction of its steps done), so every method ends at lr 0 whatever its steps per epoch —
    pruned epochs have fewer. The timer covers the training loop, loader waits and manifest
    writing included, and is paused while the test set is evaluated after each epoch.

    ``eswp_ratio`` / ``infobatch_ratio`` are the pruning ratios of ``eswp`` / ``infobatch``;
    ``prune_anneal`` the fraction of final epochs left unpruned; ``prune_burn_in_epochs`` the
    unpruned first epochs of ``eswp``. With ``run_dir``, the run's manifests are kept in
    ``run_dir/manifests`` (replaced, not merged) and its final scores in ``run_dir/scores.npy``
    (for ``es-stream inspect/prune``); without it they go to a temporary directory.
    ``budget_epochs`` (for budget-matched controls) cuts the run to that many epochs, a fraction
    allowed (at most ``epochs``; the last epoch stops part-way): the cosine schedule then spans
    ``budget_epochs`` instead of ``epochs``, so the cut run still ends at lr 0.

    Returns a dict: ``method, seed, wall_clock_s, samples_forwarded`` (samples of the stream
    passed through the model, once per epoch: fewer for the pruning methods),
    ``samples_backpropagated`` (samples in the loss that was back-propagated; the selection
    methods re-forward these with gradients), ``steps``, ``final_acc``, ``best_acc`` and
    ``curve``: one ``(wall_clock_s, test_acc)`` per epoch.
    """
    from tqdm.auto import tqdm

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if not 1 <= b <= B:
        raise ValueError(f"need 1 <= b <= B, got b={b}, B={B}")
    horizon = float(epochs if budget_epochs is None else budget_epochs)
    if not 0 < horizon <= epochs:
        raise ValueError(f"budget_epochs must be in (0, epochs={epochs}], got {budget_epochs}")
    torch.manual_seed(seed)
    model = CNN1D(length=test_x.shape[-1])
    with tempfile.TemporaryDirectory(prefix=f"es-stream-{method}-") as tmp:
        manifests = os.path.join(run_dir or tmp, "manifests")
        shutil.rmtree(manifests, ignore_errors=True)  # epochs of an earlier run must not leak in
        prunes = method in ("eswp", "infobatch")
        ds = ESDataset(corpus, meta_batch_size=b if method in BATCH_OF_B else B,
                       decode=DecodeWDS() if corpus.format == "wds" else None,
                       collate=Collate(corpus.format), shuffle=True, seed=seed,
                       manifests=manifests if prunes else None)
        dl = es_stream.loader(ds, num_workers=workers)
        # ES's burn-in/anneal fractions count steps of unpruned epochs (an upper bound for eswp)
        selector = make_selector(method, corpus, b, seed, epochs * len(ds), **(es_options or {}))
        pruner = make_pruner(method, corpus, selector, manifests, eswp_ratio=eswp_ratio,
                             infobatch_ratio=infobatch_ratio, prune_anneal=prune_anneal,
                             prune_burn_in_epochs=prune_burn_in_epochs, seed=seed)
        opt = torch.optim.Adam(model.parameters(), lr=lr)

        forwarded = backpropagated = steps = 0
        elapsed = 0.0
        curve: list[tuple[float, float]] = []
        bar = tqdm(total=math.ceil(horizon), desc=f"{method} seed {seed}", unit="epoch", disable=not progress,
                   dynamic_ncols=True, leave=False, mininterval=1.0)
        try:
            for epoch in range(math.ceil(horizon)):
                start = time.perf_counter()
                ds.set_epoch(epoch)
                per_epoch = len(ds)
                # a budget ending inside this epoch: the meta-batches to take from it
                stop = math.ceil((horizon - epoch) * per_epoch) if epoch + 1 > horizon else None
                for i, mb in enumerate(dl):
                    for group in opt.param_groups:
                        group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * (epoch + i / per_epoch) / horizon))
                    x, y = mb.data
                    forwarded += len(y)
                    if selector is not None and len(y) > b:
                        with torch.no_grad():
                            losses = F.cross_entropy(model(x), y, reduction="none")
                        chosen = selector.select(mb.ids, losses)
                        x, y = x[chosen], y[chosen]
                    # else: a batch of b, or a tail meta-batch of at most b: train on all of it
                    if method == "infobatch":
                        losses = F.cross_entropy(model(x), y, reduction="none")
                        pruner.store.scatter(mb.ids, losses.detach())
                        loss = (losses * mb.weights).mean() if mb.weights is not None else losses.mean()
                    else:
                        loss = F.cross_entropy(model(x), y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    backpropagated += len(y)
                    steps += 1
                    if stop is not None and i + 1 >= stop:
                        break
                if pruner is not None and epoch + 1 < epochs:  # no decision for after the run
                    pruner.on_epoch_end(epoch, epochs)
                elapsed += time.perf_counter() - start
                acc = accuracy(model, test_x, test_y)  # timer paused
                curve.append((elapsed, acc))
                bar.update()
                bar.set_postfix(acc=f"{acc:.3f}", s=f"{elapsed:.1f}")
        finally:
            bar.close()
            del dl  # stop persistent workers before the manifest directory goes
        save_scores(run_dir, pruner, selector)
    return {"method": method, "seed": seed, "wall_clock_s": elapsed,
            "samples_forwarded": forwarded, "samples_backpropagated": backpropagated,
            "steps": steps, "final_acc": curve[-1][1] if curve else float("nan"),
            "best_acc": max((a for _, a in curve), default=float("nan")), "curve": curve}
