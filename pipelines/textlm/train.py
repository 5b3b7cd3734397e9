"""The byte-level language-model workload of the shared training loop (:mod:`pipelines.loop`):
a small GRU (or Transformer) trained on the text corpus with standard batches or with loss-based
selection (Evolved Sampling and its baselines).

The per-sample loss is the mean next-byte cross-entropy over the sequence (nats); quality is
held-out **bits per byte** (``bpb``, lower is better). For a recurrent model on text, gradients
are clipped to norm 1, the held-out set is usually evaluated several times per epoch
(``evals_per_epoch``) for a finer quality-against-time curve, and the model can run on a GPU
(``device``). A sequence counts as already learned (the loop's ``learned_fraction``) when the
model predicts it at under 1 bit per byte (mean loss below ln 2 nats). Every method, the schedule, the timer, the budget cut and the counts are the
loop's; :func:`workload` is what this pipeline supplies and :func:`train` runs it.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from es_stream import Corpus

from ..loop import RunConfig, Workload
from ..loop import train as train_loop
from .data import Collate, Decode

ARCHS = ("gru", "transformer")
LN2 = math.log(2.0)


class GRULM(nn.Module):
    """Byte embedding -> one GRU layer -> linear read-out over 256 bytes. Defaults (embedding 48,
    hidden 192): about 200k parameters."""

    def __init__(self, hidden: int = 192, embed: int = 48, layers: int = 1) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, embed)
        self.rnn = nn.GRU(embed, hidden, layers, batch_first=True)
        self.out = nn.Linear(hidden, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.rnn(self.embed(x))[0])


class TransformerLM(nn.Module):
    """A tiny causal Transformer (pre-norm, learned positions, no dropout). ``hidden`` is the
    model width; 2 layers of width 96: about 290k parameters."""

    def __init__(self, hidden: int = 96, layers: int = 2, heads: int = 4, max_len: int = 4096) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, hidden)
        self.pos = nn.Parameter(torch.zeros(max_len, hidden))
        nn.init.normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(hidden, heads, 4 * hidden, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        mask = torch.nn.Transformer.generate_square_subsequent_mask(n, device=x.device)
        h = self.blocks(self.embed(x) + self.pos[:n], mask=mask, is_causal=True)
        return self.out(self.norm(h))


def make_model(arch: str = "gru", hidden: int = 192, embed: int = 48, layers: int = 1) -> nn.Module:
    """The language model of ``arch`` (``gru``: ``hidden``, ``embed``, ``layers``;
    ``transformer``: width ``hidden``, ``layers``, 4 heads)."""
    if arch == "gru":
        return GRULM(hidden, embed, layers)
    if arch == "transformer":
        return TransformerLM(hidden, layers)
    raise ValueError(f"unknown arch {arch!r}; choose from {', '.join(ARCHS)}")


def sequence_losses(model: nn.Module, seqs: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean next-byte cross-entropy (nats): the model reads bytes 0..L-2 and predicts
    1..L-1. ``seqs``: uint8 or int64 [n, L]; returns float [n]."""
    seqs = seqs.long()
    logits = model(seqs[:, :-1])
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), seqs[:, 1:].reshape(-1),
                         reduction="none")
    return ce.view(len(seqs), -1).mean(1)


@torch.no_grad()
def bits_per_byte(model: nn.Module, seqs: torch.Tensor, batch: int = 256,
                  device: torch.device | str = "cpu") -> float:
    """Mean next-byte cross-entropy over every predicted byte of ``seqs``, in bits."""
    total, count = 0.0, 0
    for i in range(0, len(seqs), batch):
        chunk = seqs[i:i + batch].to(device)
        total += float(sequence_losses(model, chunk).sum()) * (chunk.shape[1] - 1)
        count += chunk.shape[0] * (chunk.shape[1] - 1)
    return total / count / LN2


def eval_subset(heldout: torch.Tensor, count: int | None) -> torch.Tensor:
    """``count`` held-out sequences evenly spaced over the whole held-out split (all if None or
    more than there are): the same set for every method and seed."""
    if count is None or count >= len(heldout):
        return heldout
    idx = torch.linspace(0, len(heldout) - 1, count).round().long()
    return heldout[idx]



def workload(corpus: Corpus, heldout: torch.Tensor, arch: str = "gru", hidden: int = 192,
             embed: int = 48, layers: int = 1, clip: float = 1.0,
             device: str = "cpu") -> Workload:
    """The byte-LM workload: the model of ``arch`` (:func:`make_model`) on ``corpus``, held-out
    bits per byte on ``heldout`` (uint8 ``[n, seq_len]``), gradients clipped to ``clip``."""
    seq_len = heldout.shape[1]
    return Workload(name="textlm", corpus=corpus,
                    make_model=functools.partial(make_model, arch, hidden, embed, layers),
                    losses=sequence_losses,
                    evaluate=functools.partial(bits_per_byte, seqs=heldout, device=device),
                    quality="bpb", higher_is_better=False, collate=Collate(seq_len),
                    decode=Decode(seq_len), clip=clip, device=device, learned_loss=LN2,
                    chance_loss=math.log(256))  # a uniform guess over byte values


def train(method: str, corpus: Corpus, heldout: torch.Tensor, epochs: int, b: int = 32,
          B: int = 64, workers: int = 0, arch: str = "gru", hidden: int = 192, embed: int = 48,
          layers: int = 1, clip: float = 1.0, device: str = "cpu",
          **options: Any) -> dict[str, Any]:
    """Train one language model with ``method`` through the shared loop
    (:func:`pipelines.loop.train`); the model arguments make the :func:`workload`, ``options``
    are the other fields of :class:`pipelines.loop.RunConfig` (lr, seed, progress, es_options,
    the pruning ratios, run_dir, budget_epochs, evals_per_epoch, ...).

    Returns the loop's dict: time, counts, ``epochs_done``, ``params``, ``final_bpb``,
    ``best_bpb`` (minimum) and ``curve``: ``(wall_clock_s, heldout_bpb)`` per evaluation.
    """
    return train_loop(workload(corpus, heldout, arch, hidden, embed, layers, clip, device),
                      method, RunConfig(epochs, b=b, B=B, workers=workers, **options))
