"""The MNIST-1D workload of the shared training loop (:mod:`pipelines.loop`): a small 1D CNN
trained on the MNIST-1D corpus with standard batches or with loss-based selection (Evolved
Sampling and its baselines), on CPU.

The per-sample loss is cross-entropy; quality is test-set top-1 accuracy (``acc``, higher is
better), evaluated once per epoch on the in-memory test split. No gradient clipping. A sample
counts as already learned (the loop's ``learned_fraction``) when its loss is below ln 2, i.e.
the model gives its label a probability above 1/2, so it is classified correctly. Every method,
the schedule, the timer, the budget cut and the counts are the loop's (see :mod:`pipelines.loop`);
:func:`workload` is what this pipeline supplies and :func:`train` runs it.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from es_stream import Corpus

from ..loop import RunConfig, Workload
from ..loop import train as train_loop
from .data import SEQ_LEN, Collate, DecodeWDS


class CNN1D(nn.Module):
    """Two conv blocks (1 -> 32 -> 64 channels, kernel 5, ReLU, max-pool 2) and a two-layer
    head: about 52k parameters. No BatchNorm or dropout, so the scoring forward gives the same
    losses whether the model is in train or eval mode. ``width`` scales the channels (``width``,
    ``2 * width``) and the head (``2 * width``): a smaller reference model (width 16: about 15k
    parameters); the default 32 is the model above, weight for weight."""

    def __init__(self, length: int = SEQ_LEN, classes: int = 10, width: int = 32) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        self.features = nn.Sequential(
            nn.Conv1d(1, width, 5, padding=2), nn.ReLU(), nn.MaxPool1d(2),
            nn.Conv1d(width, 2 * width, 5, padding=2), nn.ReLU(), nn.MaxPool1d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * (length // 4), 2 * width),
                                  nn.ReLU(), nn.Linear(2 * width, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 4096) -> float:
    """Top-1 accuracy over an in-memory set."""
    correct = 0
    for i in range(0, len(y), batch):
        correct += int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
    return correct / len(y)


def sample_losses(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Per-sample cross-entropy (float ``[n]``) of a collated batch ``(x, y)``."""
    x, y = data
    return F.cross_entropy(model(x), y, reduction="none")


#: the loss below which a sample counts as learned: p(label) > 1/2, so it is classified correctly
LEARNED_LOSS = math.log(2.0)


def workload(corpus: Corpus, test_x: torch.Tensor, test_y: torch.Tensor,
             make_model: Callable[[], nn.Module] | None = None) -> Workload:
    """The MNIST-1D workload: :class:`CNN1D` on ``corpus`` (either shard format), test accuracy
    on ``(test_x, test_y)``. ``make_model`` replaces the freshly initialised CNN (e.g. one that
    loads pre-trained weights, :class:`pipelines.mnist1d.pretrain.Pretrained`)."""
    return Workload(name="mnist1d", corpus=corpus,
                    make_model=make_model or functools.partial(CNN1D, length=test_x.shape[-1]),
                    losses=sample_losses,
                    evaluate=functools.partial(accuracy, x=test_x, y=test_y),
                    quality="acc", higher_is_better=True, collate=Collate(corpus.format),
                    decode=DecodeWDS() if corpus.format == "wds" else None,
                    learned_loss=LEARNED_LOSS, chance_loss=math.log(10))


def train(method: str, corpus: Corpus, test_x: torch.Tensor, test_y: torch.Tensor, epochs: int,
          b: int = 64, B: int = 128, workers: int = 2, **options: Any) -> dict[str, Any]:
    """Train one model with ``method`` for ``epochs`` epochs through the shared loop
    (:func:`pipelines.loop.train`); ``options`` are the other fields of
    :class:`pipelines.loop.RunConfig` (lr, seed, progress, es_options, the pruning ratios,
    run_dir, budget_epochs, ...).

    Returns the loop's dict: time, counts, ``final_acc``, ``best_acc`` and ``curve``: one
    ``(wall_clock_s, test_acc)`` per epoch.
    """
    return train_loop(workload(corpus, test_x, test_y), method,
                      RunConfig(epochs, b=b, B=B, workers=workers, **options))
