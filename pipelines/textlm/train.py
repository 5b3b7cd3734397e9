"""Train a small byte-level language model on the text corpus with standard batches or with
loss-based selection (Evolved Sampling and its baselines).

The method set, the selectors and the order of operations are those of
:mod:`pipelines.mnist1d.train` (``METHODS``, ``make_selector``, ``BATCH_OF_B`` are imported from
there): ``uniform`` and ``infobatch`` read meta-batches of b and train on all of each; the others
read meta-batches of B, score them with a no-grad forward, let the selector pick b, and take a
forward + backward + step on those b. ``eswp`` and ``infobatch`` prune at epoch ends through
Parquet manifests. The per-sample loss is the mean next-byte cross-entropy over the sequence
(nats); quality is held-out **bits per byte** (lower is better).

Differences from the MNIST-1D loop, all for a recurrent model on text: gradients are clipped to
norm 1; the held-out set can be evaluated several times per epoch (``evals_per_epoch``) for a
finer quality-against-time curve; and the model can run on a GPU (``device``).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import es_stream
from es_stream import Corpus, ESDataset

from ..common import make_pruner, save_scores
from ..mnist1d.train import BATCH_OF_B, METHODS, make_selector
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


def train(method: str, corpus: Corpus, heldout: torch.Tensor, epochs: int, b: int = 32,
          B: int = 64, lr: float = 3e-3, seed: int = 0, workers: int = 0, progress: bool = True,
          es_options: dict[str, Any] | None = None, eswp_ratio: float = 0.3,
          infobatch_ratio: float = 0.5, prune_anneal: float = 0.125, prune_burn_in_epochs: int = 1,
          run_dir: str | None = None, budget_epochs: float | None = None,
          evals_per_epoch: int = 1, arch: str = "gru", hidden: int = 192, embed: int = 48,
          layers: int = 1, clip: float = 1.0, device: str = "cpu") -> dict[str, Any]:
    """Train one language model with ``method`` and report time, counts and held-out bits/byte.

    Adam with a cosine learning-rate schedule over the run's progress in epochs (as in
    :func:`pipelines.mnist1d.train.train`), so every method ends at lr 0. With ``budget_epochs``
    (a fraction allowed, e.g. 3.4), the schedule spans that many epochs and the run stops there,
    mid-epoch: the budget-matched control (``epochs`` must then be ``ceil(budget_epochs)``, which
    is what ES's burn-in/anneal step counts are computed from). The timer covers the training
    loop, loader waits and manifest writing, and is paused while the held-out set is evaluated
    (``evals_per_epoch`` times per epoch, the last at the epoch's end).

    Returns a dict like the MNIST-1D pipeline's, with ``final_bpb``, ``best_bpb`` (minimum) and
    ``curve``: ``(wall_clock_s, heldout_bpb)`` per evaluation, plus ``epochs_done`` (fractional).
    """
    from tqdm.auto import tqdm

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if not 1 <= b <= B:
        raise ValueError(f"need 1 <= b <= B, got b={b}, B={B}")
    if evals_per_epoch < 1:
        raise ValueError(f"evals_per_epoch must be >= 1, got {evals_per_epoch}")
    horizon = float(epochs if budget_epochs is None else budget_epochs)
    if not 0 < horizon <= epochs:
        raise ValueError(f"budget_epochs must be in (0, epochs={epochs}], got {budget_epochs}")
    dev = torch.device(device)
    torch.manual_seed(seed)
    model = make_model(arch, hidden, embed, layers).to(dev)
    seq_len = heldout.shape[1]
    with tempfile.TemporaryDirectory(prefix=f"es-stream-textlm-{method}-") as tmp:
        manifests = os.path.join(run_dir or tmp, "manifests")
        shutil.rmtree(manifests, ignore_errors=True)  # epochs of an earlier run must not leak in
        prunes = method in ("eswp", "infobatch")
        ds = ESDataset(corpus, meta_batch_size=b if method in BATCH_OF_B else B,
                       decode=Decode(seq_len), collate=Collate(seq_len), shuffle=True, seed=seed,
                       manifests=manifests if prunes else None)
        dl = es_stream.loader(ds, num_workers=workers)
        options = dict(es_options or {})
        if dev.type == "cuda" and method in ("es", "eswp"):
            options.setdefault("device", dev)
        # ES's burn-in/anneal fractions count steps of unpruned epochs (an upper bound for eswp)
        selector = make_selector(method, corpus, b, seed, epochs * len(ds), **options)
        pruner = make_pruner(method, corpus, selector, manifests, eswp_ratio=eswp_ratio,
                             infobatch_ratio=infobatch_ratio, prune_anneal=prune_anneal,
                             prune_burn_in_epochs=prune_burn_in_epochs, seed=seed)
        opt = torch.optim.Adam(model.parameters(), lr=lr)

        forwarded = backpropagated = steps = 0
        elapsed = 0.0
        progress_epochs = 0.0
        curve: list[tuple[float, float]] = []
        bar = tqdm(total=math.ceil(horizon), desc=f"{method} seed {seed}", unit="epoch",
                   disable=not progress, dynamic_ncols=True, leave=False, mininterval=1.0)

        def evaluate() -> None:
            model.eval()
            bpb = bits_per_byte(model, heldout, device=dev)
            model.train()
            curve.append((elapsed, bpb))
            bar.set_postfix(bpb=f"{bpb:.3f}", s=f"{elapsed:.1f}")

        try:
            for epoch in range(math.ceil(horizon)):
                start = time.perf_counter()
                ds.set_epoch(epoch)
                per_epoch = len(ds)
                # evaluation points inside this epoch (step counts after which to evaluate)
                marks = {math.ceil(per_epoch * k / evals_per_epoch) for k in range(1, evals_per_epoch)}
                # a budget ending inside this epoch: the meta-batches to take from it
                stop = math.ceil((horizon - epoch) * per_epoch) if epoch + 1 > horizon else None
                i = 0
                for i, mb in enumerate(dl, start=1):
                    progress_epochs = epoch + (i - 1) / per_epoch
                    for group in opt.param_groups:
                        group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * progress_epochs / horizon))
                    x = mb.data.to(dev, non_blocking=True)
                    forwarded += len(x)
                    if selector is not None and len(x) > b:
                        with torch.no_grad():
                            losses = sequence_losses(model, x)
                        chosen = selector.select(mb.ids.to(dev), losses)
                        x = x[chosen]
                    # else: a batch of b, or a tail meta-batch of at most b: train on all of it
                    if method == "infobatch":
                        losses = sequence_losses(model, x)
                        pruner.store.scatter(mb.ids, losses.detach().cpu())
                        weights = mb.weights.to(dev) if mb.weights is not None else None
                        loss = (losses * weights).mean() if weights is not None else losses.mean()
                    else:
                        loss = sequence_losses(model, x).mean()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if clip:
                        nn.utils.clip_grad_norm_(model.parameters(), clip)
                    opt.step()
                    backpropagated += len(x)
                    steps += 1
                    if stop is not None and i >= stop:
                        break
                    if i in marks:
                        if dev.type == "cuda":
                            torch.cuda.synchronize(dev)
                        elapsed += time.perf_counter() - start
                        evaluate()  # timer paused
                        start = time.perf_counter()
                progress_epochs = epoch + i / per_epoch
                if pruner is not None and epoch + 1 < math.ceil(horizon):
                    pruner.on_epoch_end(epoch, epochs)  # no decision for after the run
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                elapsed += time.perf_counter() - start
                evaluate()  # timer paused
                bar.update()
        finally:
            bar.close()
            del dl  # stop persistent workers before the manifest directory goes
        save_scores(run_dir, pruner, selector)
    bpbs = [q for _, q in curve]
    return {"method": method, "seed": seed, "wall_clock_s": elapsed,
            "samples_forwarded": forwarded, "samples_backpropagated": backpropagated,
            "steps": steps, "epochs_done": progress_epochs,
            "params": sum(p.numel() for p in model.parameters()),
            "final_bpb": bpbs[-1] if bpbs else float("nan"),
            "best_bpb": min(bpbs, default=float("nan")), "curve": curve}
