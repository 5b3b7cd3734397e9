"""The web-like stream as a workload of the shared loop (:mod:`pipelines.loop`): the byte LM of
:mod:`pipelines.textlm` trained on the training split of a :mod:`pipelines.webtext.corpus`
build, evaluated on clean held-out text (bits per byte, the quality every method is compared
on), with the held-out bits per byte of every other kind reported beside it once training ends
(``final_metrics``: ``bpb_<kind>``).

The side table of kinds goes to the loop as ``Workload.sample_kinds`` (codes into
:data:`~pipelines.webtext.corpus.KINDS`, ``clean`` first): for reporting what each method trained
on and kept, and for the oracle filter; no other method reads it.

**The clean seed set** (:func:`seed_set`): the reference models of the reference methods train
on a small curated set, the way quality classifiers are trained: consecutive windows of the
train files' text that the corpus did not use (it takes its clean windows and HTML bodies from
the start of that text; the seed windows come right after them), so a seed window is neither a
training sample nor held-out text. ``validation`` more windows after those are the clean text
the reference filter's bound is read from (:func:`webtext_reference`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from es_stream import Corpus

from ..loop import Reference, Workload
from ..textlm.train import LN2, bits_per_byte, eval_subset, sequence_losses
from ..textlm.train import workload as textlm_workload
from .corpus import KINDS, Mixture, WebText, _concat, _needs, build


#: the named mixtures of the benchmark: ``default`` (:class:`Mixture`'s defaults, 40% clean) and
#: ``dupes``, the second mixture, fixed before any result on it was seen: half the clean share,
#: duplicates at 45% (exact 25%, up to 8 copies a document; near 20%), less markup and templates
MIXTURES = {
    "default": Mixture(),
    "dupes": Mixture(clean=0.20, html=0.10, binary=0.05, base64=0.05, exact_dup=0.25,
                     near_dup=0.20, template=0.10, random=0.05, max_copies=8),
}


def mixture(name: str) -> Mixture:
    """The named mixture (:data:`MIXTURES`); ValueError naming the choices."""
    try:
        return MIXTURES[name]
    except KeyError:
        raise ValueError(f"unknown webtext mixture {name!r}; choose from "
                         f"{', '.join(MIXTURES)}") from None


def kind_codes(data: WebText) -> torch.Tensor:
    """Each training sample's kind as an int64 code into :data:`KINDS` (``clean`` is 0)."""
    kinds = data.labels()["kind"]
    lookup = {k: i for i, k in enumerate(KINDS)}
    return torch.as_tensor(np.fromiter((lookup[k] for k in kinds), np.int64, len(kinds)))


class KindMetrics:
    """``final_metrics`` of the workload: held-out bits per byte of each kind (``bpb_<kind>``,
    ``clean`` included), on at most ``per_kind`` samples of each."""

    def __init__(self, data: WebText, clean: torch.Tensor, per_kind: int, device: str) -> None:
        self.sets = {"clean": clean, **{k: v[:per_kind] for k, v in data.heldout_kinds.items()}}
        self.device = device

    def __call__(self, model: nn.Module) -> dict[str, float]:
        return {f"bpb_{k}": bits_per_byte(model, v, device=self.device)
                for k, v in self.sets.items() if len(v)}


def workload(data: WebText, eval_sequences: int = 1024, per_kind: int = 128, arch: str = "gru",
             hidden: int = 64, embed: int = 32, layers: int = 1,
             device: str = "cpu") -> Workload:
    """The byte LM (:func:`pipelines.textlm.train.workload`) on ``data``'s training corpus,
    quality = clean held-out bits per byte on ``eval_sequences`` evenly spaced clean held-out
    sequences, the per-kind held-out bits per byte as ``final_metrics``."""
    clean = eval_subset(data.heldout, eval_sequences or None)
    base = textlm_workload(data.corpus, clean, arch, hidden, embed, layers, device=device)
    return dataclasses.replace(base, name="webtext", sample_kinds=kind_codes(data),
                               kind_names=KINDS,
                               final_metrics=KindMetrics(data, clean, per_kind, device))


@dataclass
class SeedSet:
    """The clean seed set: ``corpus`` (training windows, WebDataset shards) and ``validation``
    (uint8 ``[m, seq_len]``), both from train-split text the web corpus does not use."""

    corpus: Corpus
    validation: torch.Tensor
    directory: Path


def seed_set(data: WebText, sequences: int, validation: int = 512,
             spread: bool = False) -> SeedSet:
    """The clean seed set of ``data`` (see the module docstring), cached beside the build as
    ``<build>-seed-<sequences>-<validation>[-spread]/``. ``spread``: windows evenly spaced
    over all the unused train text (many files, every kind of text the stdlib holds) instead
    of consecutive ones (the few files right after the corpus's text). ValueError naming the
    sizes when the unused text is too short."""
    import webdataset as wds

    L = data.seq_len
    directory = data.directory.parent / (f"{data.directory.name}-seed-{sequences}-{validation}"
                                         + ("-spread" if spread else ""))
    if not (directory / "meta.json").exists():
        files = json.loads((data.directory / "files.json").read_text())["train"]
        text = _concat(Path(data.meta["source"]), files)
        mixture = Mixture(**data.meta["mixture"])
        used, _ = _needs(mixture.counts(data.meta["samples"]), L, data.meta["edits_per_near_dup"])
        need = (sequences + validation) * L
        if used + need > len(text):
            raise ValueError(f"a seed set of {sequences} + {validation} windows of {L} B needs "
                             f"{need} B of unused train text; {data.directory} leaves "
                             f"{len(text) - used} B (build fewer samples or a smaller seed set)")
        count = sequences + validation
        step = (len(text) - used) // count // L * L if spread else L
        windows = [text[used + i * step:used + i * step + L] for i in range(count)]
        if spread:   # validation windows evenly among them, so both span all the text
            val = set(np.linspace(0, count - 1, validation).round().astype(int).tolist())
            windows = ([w for i, w in enumerate(windows) if i not in val]
                       + [w for i, w in enumerate(windows) if i in val])
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".webtext-seed-", dir=directory.parent))
        try:
            (tmp / "train").mkdir()
            with wds.ShardWriter(str(tmp / "train" / "seed-%06d.tar"), maxcount=1 << 30,
                                 verbose=0, mtime=0) as writer:
                for i, w in enumerate(windows[:sequences]):
                    writer.write({"__key__": f"{i:09d}", "bin": w})
            np.save(tmp / "validation.npy",
                    np.frombuffer(b"".join(windows[sequences:]), np.uint8).reshape(validation, L))
            (tmp / "meta.json").write_text(json.dumps({
                "build": data.directory.name, "offset": used, "sequences": sequences,
                "validation": validation, "seq_len": L}, indent=1))
            if directory.exists():
                shutil.rmtree(directory)
            os.replace(tmp, directory)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    shards = sorted(str(p) for p in (directory / "train").glob("*.tar"))
    from ..textlm.data import _index

    return SeedSet(_index(directory / "train.parquet", shards),
                   torch.from_numpy(np.load(directory / "validation.npy")), directory)


@torch.no_grad()
def _clean_losses(model: nn.Module, seqs: torch.Tensor, device: str) -> list[float]:
    model.eval()
    out = []
    for i in range(0, len(seqs), 256):
        out += sequence_losses(model, seqs[i:i + 256].to(device)).float().cpu().tolist()
    return out


def webtext_reference(root: str | os.PathLike, data: WebText, target: Workload, config: Any, *,
                      validation: int = 512, spread: bool = False, progress: bool = False,
                      log: Callable[[str], None] = print) -> tuple[Reference, dict[str, Any]]:
    """The reference of the web-like stream: a GRU of hidden size ``config.width`` trained on
    the clean seed set (``config.heldout`` windows, :func:`seed_set`) through the loop, its
    losses on every training sample of ``target`` scored into a store
    (:func:`pipelines.reference.reference_scores`), and its losses on ``validation`` clean
    windows (``Reference.clean_losses``, the reference filter's bound), whose forward is added
    to the scoring seconds; ``spread``: the seed set of :func:`seed_set`'s ``spread``. Cached
    under ``root``."""
    from ..loop import cpu_seconds
    from ..reference import reference_scores
    from ..textlm.train import make_model

    seeds = seed_set(data, config.heldout, validation, spread)
    heldout = textlm_workload(seeds.corpus, target.evaluate.keywords["seqs"], "gru", config.width,
                              device=target.device)
    identity = {"workload": "webtext", "build": data.directory.name,
                "seed_set": seeds.directory.name}
    ref, meta = reference_scores(root, identity, target, heldout, config, progress=progress,
                                 log=log)
    clean_path = Path(meta["store"]).parent / "clean.json"
    if not clean_path.exists():
        model = make_model("gru", config.width)
        model.load_state_dict(torch.load(Path(meta["store"]).parent / "model.pt",
                                         map_location="cpu", weights_only=True))
        model = model.to(target.device)
        t0, c0 = time.perf_counter(), cpu_seconds()
        losses = _clean_losses(model, seeds.validation, target.device)
        clean = {"losses": losses, "s": time.perf_counter() - t0, "cpu_s": cpu_seconds() - c0}
        tmp = clean_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(clean))
        os.replace(tmp, clean_path)
    clean = json.loads(clean_path.read_text())
    ref = dataclasses.replace(ref, score_s=ref.score_s + clean["s"],
                              score_cpu_s=(ref.score_cpu_s or ref.score_s) + clean["cpu_s"],
                              clean_losses=tuple(clean["losses"]))
    return ref, {**meta, "clean_validation_bpb": float(np.mean(clean["losses"])) / LN2}


__all__ = ["MIXTURES", "KindMetrics", "mixture", "SeedSet", "build", "kind_codes", "seed_set", "webtext_reference",
           "workload"]
