"""Real text as a sharded es-stream corpus of fixed-length byte sequences, built offline and cached.

**Source.** The Python standard library's own files on this machine (the directory of
``os.__file__``): every ``*.py``, ``*.rst`` and ``*.txt`` under it, ``site-packages`` and
``__pycache__`` left out (what is installed there differs from machine to machine), read as raw
bytes in sorted path order. That is about 32 MB for CPython 3.11 (sources, their tests, the
pydoc topics, a few docs). ``min_bytes`` (default 20 MB) makes a build refuse a smaller
collection; ``max_bytes`` keeps only the sorted prefix up to that many bytes (tests use it).

**Split by file, not by sequence.** The collected files are permuted with ``data_seed``; files are
taken for the held-out split in that order until it holds ``heldout_fraction`` of the bytes, and
the rest go to train, so no held-out byte is ever trained on (not even a neighbouring window of the
same file).

**Sequences.** Each split's files are concatenated (in the permuted order) and cut into
non-overlapping windows of ``seq_len`` bytes; the last partial window is dropped. A model reads
bytes 0..L-2 of a window and predicts bytes 1..L-1.

**Shards.** ``webdataset.ShardWriter`` writes each split as tar shards of ``shard_sequences``
samples ``{"__key__": "%09d", "bin": <seq_len bytes>}``; because the files were permuted before
sharding, each train shard holds whole files from all over the library. The train split is
indexed as a :class:`es_stream.Corpus`; :func:`build` returns the corpus of the first ``k`` train
shards for a training budget (``train_bytes``), indexed once per ``k``. The held-out split is read
back once through ``es_stream`` and cached as ``heldout.npy`` (evaluation needs no streaming).

Layout of one build ``<root>/textlm-<fingerprint>/``::

    meta.json             source, Python version, file list digest, split sizes, seq_len, ...
    files.json            {"train": [[path, bytes], ...], "heldout": [...]}: each split's files
                          (relative to the source) in the order they were concatenated
    train/train-*.tar     train shards
    heldout/heldout-*.tar held-out shards
    train-k<K>.parquet    the Corpus index of the first K train shards
    heldout.npy           uint8 [held-out sequences, seq_len]

A build is written to a temporary directory and renamed when complete, so an interrupted build is
never reused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from es_stream import Corpus, ESDataset, loader

SUFFIXES = (".py", ".rst", ".txt")
SKIP_DIRS = ("site-packages", "__pycache__")
MB = 1 << 20


def stdlib_dir() -> Path:
    """The standard library directory of the running interpreter (``os.__file__``'s)."""
    return Path(os.__file__).resolve().parent


def collect(source: str | os.PathLike | None = None, max_bytes: int | None = None,
            suffixes: tuple[str, ...] = SUFFIXES) -> list[tuple[str, int]]:
    """The files of ``source`` (default the stdlib) to use, as ``(relative path, size)`` in
    sorted path order; with ``max_bytes``, the sorted prefix whose sizes add up to at most that
    (at least one file). Empty files are skipped; symlinks are not followed."""
    root = Path(source) if source is not None else stdlib_dir()
    if not root.is_dir():
        raise FileNotFoundError(f"text source {root} is not a directory")
    found: list[tuple[str, int]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
        for name in filenames:
            path = Path(dirpath) / name
            if name.endswith(suffixes) and path.is_file() and not path.is_symlink():
                size = path.stat().st_size
                if size:
                    found.append((path.relative_to(root).as_posix(), size))
    found.sort()
    if max_bytes is not None:
        kept, total = [], 0
        for rel, size in found:
            if kept and total + size > max_bytes:
                break
            kept.append((rel, size))
            total += size
        found = kept
    return found


def split_files(files: list[tuple[str, int]], heldout_fraction: float,
                seed: int) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """``(train, heldout)``: the files permuted with ``seed``, the first ones held out until they
    hold ``heldout_fraction`` of the bytes (at least one file each when there are two or more)."""
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    order = np.random.default_rng(seed).permutation(len(files))
    permuted = [files[i] for i in order]
    want = heldout_fraction * sum(s for _, s in files)
    heldout, total = [], 0
    for f in permuted:
        if total >= want or len(heldout) == len(permuted) - 1:
            break
        heldout.append(f)
        total += f[1]
    return permuted[len(heldout):], heldout


def _write_split(source: Path, files: list[tuple[str, int]], seq_len: int, shard_sequences: int,
                 directory: Path, prefix: str) -> int:
    """Cut the concatenated files into windows of ``seq_len`` and write them as tar shards;
    returns the number of sequences."""
    import webdataset as wds

    directory.mkdir(parents=True, exist_ok=True)
    count, pending = 0, bytearray()
    with wds.ShardWriter(str(directory / f"{prefix}-%06d.tar"), maxcount=shard_sequences,
                         verbose=0) as writer:
        for rel, _ in files:
            pending += (source / rel).read_bytes()
            whole = len(pending) // seq_len * seq_len
            for off in range(0, whole, seq_len):
                writer.write({"__key__": f"{count:09d}", "bin": bytes(pending[off:off + seq_len])})
                count += 1
            del pending[:whole]
    return count


def build_key(source: Path, files: list[tuple[str, int]], seq_len: int, heldout_fraction: float,
              seed: int, shard_sequences: int) -> str:
    """A digest of everything a build depends on (the file list with sizes, not the contents:
    the contents digest is computed while building and kept in meta.json)."""
    h = hashlib.sha256(json.dumps([str(source), files, seq_len, heldout_fraction, seed,
                                   shard_sequences]).encode())
    return h.hexdigest()[:12]


@dataclass
class TextLM:
    """A built text corpus.

    Attributes:
        corpus: the training corpus (the first ``train_shards`` train shards), ids 0..n-1.
        heldout: uint8 tensor [sequences, seq_len], every held-out sequence.
        seq_len: bytes per sequence.
        train_shards: train shards in ``corpus``, of ``total_train_shards``.
        meta: the build's meta.json (source, Python version, sizes, digest).
        directory: where the build lives.
    """

    corpus: Corpus
    heldout: torch.Tensor
    seq_len: int
    train_shards: int
    total_train_shards: int
    meta: dict[str, Any]
    directory: Path

    @property
    def train_bytes(self) -> int:
        return self.corpus.num_samples * self.seq_len


def _read_all(corpus: Corpus, seq_len: int) -> np.ndarray:
    """Every sequence of ``corpus``, ordered by id, read through es-stream."""
    ds = ESDataset(corpus, meta_batch_size=4096, decode=Decode(seq_len), collate=Collate(seq_len),
                   shuffle=False)
    out = np.zeros((corpus.num_samples, seq_len), dtype=np.uint8)
    seen = 0
    for mb in loader(ds, num_workers=0):
        out[mb.ids.numpy()] = mb.data.numpy()
        seen += len(mb.ids)
    if seen != corpus.num_samples:
        raise RuntimeError(f"read {seen} of {corpus.num_samples} held-out sequences")
    return out


def _shards(directory: Path) -> list[str]:
    return sorted(str(p) for p in directory.glob("*.tar"))


def _index(path: Path, shards: list[str]) -> Corpus:
    """Load the saved index of ``shards``, or index them (again) when it is missing, stale or
    names other files (it stores absolute paths; the build may have been moved)."""
    try:
        corpus = Corpus.load(path)
        if [corpus.local_path(i) for i in range(corpus.num_shards)] == shards:
            return corpus
    except Exception:  # missing, stale, or written by an older es-stream: rebuild it below
        pass
    corpus = Corpus.from_webdataset(shards)
    corpus.save(path)
    return corpus


def build(root: str | os.PathLike, *, source: str | os.PathLike | None = None,
          min_bytes: int = 20 * MB, max_bytes: int | None = None, seq_len: int = 128,
          heldout_fraction: float = 0.05, seed: int = 0, shard_sequences: int = 2048,
          train_bytes: int | None = None, log: Any = print) -> TextLM:
    """Build (or reuse) the text corpus under ``root`` and return it.

    Args:
        root: parent directory of the cache.
        source: directory to collect text from (default: the running Python's stdlib).
        min_bytes: refuse a collection smaller than this (default 20 MB).
        max_bytes: keep only the sorted prefix of files up to this many bytes.
        seq_len: bytes per sequence (sample).
        heldout_fraction: fraction of the bytes held out, whole files.
        seed: the file permutation (split and shard contents).
        shard_sequences: sequences per tar shard.
        train_bytes: train on the first ``ceil(train_bytes / (seq_len * shard_sequences))``
            train shards (at least 1); None: every train shard.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    src = Path(source).resolve() if source is not None else stdlib_dir()
    files = collect(src, max_bytes)
    total = sum(s for _, s in files)
    if total < min_bytes:
        raise ValueError(f"{src}: collected {total / MB:.1f} MB of text in {len(files)} files, "
                         f"less than the required {min_bytes / MB:.1f} MB")
    directory = Path(root) / f"textlm-{build_key(src, files, seq_len, heldout_fraction, seed, shard_sequences)}"
    if not (directory / "meta.json").exists():
        train_files, heldout_files = split_files(files, heldout_fraction, seed)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".textlm-", dir=directory.parent))
        try:
            digest = hashlib.sha256()
            for rel, _ in files:
                digest.update(rel.encode() + b"\0" + (src / rel).read_bytes())
            n_train = _write_split(src, train_files, seq_len, shard_sequences, tmp / "train", "train")
            n_held = _write_split(src, heldout_files, seq_len, shard_sequences, tmp / "heldout",
                                  "heldout")
            if n_train == 0 or n_held == 0:
                raise ValueError(f"too little text for seq_len {seq_len}: {n_train} train and "
                                 f"{n_held} held-out sequences")
            held = _read_all(Corpus.from_webdataset(_shards(tmp / "heldout")), seq_len)
            np.save(tmp / "heldout.npy", held)
            (tmp / "files.json").write_text(json.dumps(
                {"train": train_files, "heldout": heldout_files}, indent=0))
            meta = {"source": str(src), "python": sys.version.split()[0], "files": len(files),
                    "bytes": total, "sha256": digest.hexdigest(), "seq_len": seq_len,
                    "heldout_fraction": heldout_fraction, "seed": seed,
                    "shard_sequences": shard_sequences,
                    "train_files": len(train_files), "heldout_files": len(heldout_files),
                    "train_bytes": sum(s for _, s in train_files),
                    "heldout_bytes": sum(s for _, s in heldout_files),
                    "train_sequences": n_train, "heldout_sequences": n_held}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            if directory.exists():  # an interrupted earlier build (no meta.json): replace it
                shutil.rmtree(directory)
            os.replace(tmp, directory)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log(f"textlm: wrote {n_train} train / {n_held} held-out sequences of {seq_len} B from "
            f"{len(files)} files ({total / MB:.1f} MB) to {directory}")
    meta = json.loads((directory / "meta.json").read_text())
    shards = _shards(directory / "train")
    k = len(shards) if train_bytes is None else max(1, min(len(shards), math.ceil(
        train_bytes / (seq_len * shard_sequences))))
    corpus = _index(directory / f"train-k{k}.parquet", shards[:k])
    held = torch.from_numpy(np.load(directory / "heldout.npy"))
    return TextLM(corpus=corpus, heldout=held, seq_len=seq_len, train_shards=k,
                  total_train_shards=len(shards), meta=meta, directory=directory)


class Decode:
    """A tar sample -> its ``seq_len`` bytes (refuses any other length)."""

    def __init__(self, seq_len: int) -> None:
        self.seq_len = seq_len

    def __call__(self, sample: dict[str, Any]) -> bytes:
        raw = sample.get("bin")
        if not isinstance(raw, bytes) or len(raw) != self.seq_len:
            got = len(raw) if isinstance(raw, bytes) else type(raw).__name__
            raise ValueError(f"sample {sample.get('__key__')!r}: expected {self.seq_len} bytes "
                             f"in 'bin', got {got}")
        return raw


class Collate:
    """Sequences (bytes) -> uint8 tensor [n, seq_len] (a class, so workers can pickle it)."""

    def __init__(self, seq_len: int) -> None:
        self.seq_len = seq_len

    def __call__(self, samples: list[bytes]) -> torch.Tensor:
        buf = bytearray(b"".join(samples))
        return torch.frombuffer(buf, dtype=torch.uint8).view(len(samples), self.seq_len)


def reference_corpus(data: TextLM, sequences: int) -> Corpus:
    """A held-out slice of the training distribution for a reference model
    (``pipelines.reference``): the train shards right after the ``data.train_shards`` that
    ``data.corpus`` trains on, enough whole shards for ``sequences`` sequences. The same text
    source and split as the training corpus (train-split files, so never the evaluation set),
    and not one of its sequences. ValueError, naming the sizes, when the build has too few train
    shards left (lower ``--train-mb`` or the reference's held-out size)."""
    if sequences < 1:
        raise ValueError(f"reference held-out size must be >= 1 sequence, got {sequences}")
    shards = _shards(data.directory / "train")
    need = math.ceil(sequences / int(data.meta["shard_sequences"]))
    first = data.train_shards
    if first + need > len(shards):
        raise ValueError(f"{data.directory}: a reference held-out slice of {sequences} sequences "
                         f"needs {need} train shard(s) beyond the {first} trained on, but the "
                         f"build has {len(shards) - first} left of {len(shards)}; lower the "
                         "training size (--train-mb) or the reference's (--reference-heldout)")
    return _index(data.directory / f"reference-k{first}-m{need}.parquet", shards[first:first + need])
