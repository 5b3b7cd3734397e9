"""MNIST-1D as a sharded es-stream corpus, built offline and cached.

The samples come from ``mnist1d.data.make_dataset`` (procedural generation; the package's
download helpers are never called). The train split is written as WebDataset tar shards or as an
MDS dataset and indexed as a :class:`es_stream.Corpus`; the test split stays an in-memory array
(evaluation needs no streaming).

Layout of one cached build, ``<root>/mnist1d-n<train>-t<test>-noise<noise>-s<seed>/``::

    arrays.npz          x, y (possibly noisy), y_clean, noisy (mask), x_test, y_test
    wds/train-*.tar     {"__key__", "x.npy": float32[40], "cls": int}     (format "wds")
    wds.parquet         the Corpus index of wds/
    mds/                MDSWriter columns {"x": ndarray:float32:40, "y": int}  (format "mds")
    mds.parquet         the Corpus index of mds/

A build is written to a temporary name and renamed when complete, so an interrupted build is
never reused.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from es_stream import Corpus

SEQ_LEN = 40          # mnist1d's final_seq_length
NUM_CLASSES = 10
TARGET_SHARDS = 8     # enough shards for a few DataLoader workers, even on a tiny corpus


@dataclass
class MNIST1D:
    """A built corpus: the indexed train shards plus the in-memory test set.

    Attributes:
        corpus: the train split as an es-stream :class:`Corpus` (ids 0..train-1 follow the
            order of ``y``).
        test_x: float32 tensor [test, 1, 40].
        test_y: int64 tensor [test].
        y: train labels as written into the shards (noisy where ``noisy``).
        y_clean: train labels before noise.
        noisy: bool mask of train samples whose label was flipped.
        directory: where this build lives.
        train_x: float32 array [train, 40], the train inputs (as written into the shards), for
            diagnostics that need the whole set in memory.
    """

    corpus: Corpus
    test_x: torch.Tensor
    test_y: torch.Tensor
    y: np.ndarray
    y_clean: np.ndarray
    noisy: np.ndarray
    directory: Path
    train_x: np.ndarray | None = None


def generate(train: int, test: int, seed: int = 42) -> dict[str, np.ndarray]:
    """Generate MNIST-1D with exactly ``train`` + ``test`` samples, offline.

    ``make_dataset`` makes ``num_samples // 10`` samples per class, shuffles them, and puts the
    first ``int(num_samples * train_split)`` in train. We ask for ``train + test`` rounded up to a
    multiple of 10, pick ``train_split`` so the floor lands exactly on ``train``, and cut the
    test split to ``test``.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    if train < 1 or test < 1:
        raise ValueError(f"train and test must be >= 1, got {train} and {test}")
    args = get_dataset_args()
    args.num_samples = NUM_CLASSES * math.ceil((train + test) / NUM_CLASSES)
    # int(N * (train + 0.5) / N) == train, with no float edge case at exact fractions
    args.train_split = (train + 0.5) / args.num_samples
    args.seed = seed
    # make_dataset seeds numpy's global generator; put the caller's state back afterwards
    state = np.random.get_state()
    try:
        d = make_dataset(args)
    finally:
        np.random.set_state(state)
    x, y = d["x"].astype(np.float32), d["y"].astype(np.int64)
    x_test, y_test = d["x_test"][:test].astype(np.float32), d["y_test"][:test].astype(np.int64)
    assert len(y) == train and len(y_test) == test, (len(y), len(y_test))
    return {"x": x, "y": y, "x_test": x_test, "y_test": y_test}


def add_label_noise(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric label noise: flip ``round(fraction * n)`` labels chosen at random, each to a
    class drawn uniformly from the other 9. Returns ``(noisy_labels, flipped_mask)``."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"noise must be a fraction in [0, 1], got {fraction}")
    rng = np.random.default_rng(seed)
    flip = np.zeros(len(y), dtype=bool)
    flip[rng.choice(len(y), size=round(fraction * len(y)), replace=False)] = True
    noisy = y.copy()
    # adding 1..9 modulo 10 reaches each other class with equal probability, never the same one
    noisy[flip] = (y[flip] + rng.integers(1, NUM_CLASSES, size=int(flip.sum()))) % NUM_CLASSES
    return noisy, flip


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def write_wds(directory: Path, x: np.ndarray, y: np.ndarray) -> None:
    """WebDataset shards: webdataset's default decoder turns ``.npy`` into an array and
    ``.cls`` into an int."""
    import webdataset as wds

    directory.mkdir(parents=True, exist_ok=True)
    per_shard = max(1, math.ceil(len(y) / TARGET_SHARDS))
    with wds.ShardWriter(str(directory / "train-%06d.tar"), maxcount=per_shard, verbose=0) as w:
        for i in range(len(y)):
            w.write({"__key__": f"{i:08d}", "x.npy": _npy_bytes(x[i]), "cls": int(y[i])})


def write_mds(directory: Path, x: np.ndarray, y: np.ndarray) -> None:
    """An MDS dataset with a fixed-shape float32 column, so no per-sample shape is stored."""
    from streaming import MDSWriter

    # 160 B of x + 8 B of y + 4 B of offset per sample, a little slack for the shard header
    size_limit = max(1 << 12, math.ceil(len(y) / TARGET_SHARDS) * (SEQ_LEN * 4 + 12) + 64)
    with MDSWriter(out=str(directory), columns={"x": f"ndarray:float32:{SEQ_LEN}", "y": "int"},
                   size_limit=size_limit) as w:
        for i in range(len(y)):
            w.write({"x": x[i], "y": int(y[i])})


def build_dir(root: str | os.PathLike, train: int, test: int, noise: float, seed: int,
              classes: Sequence[int] | None = None) -> Path:
    """The cache directory of one (train, test, noise, seed[, classes]) build."""
    name = f"mnist1d-n{train}-t{test}-noise{noise:g}-s{seed}"
    if classes is not None:
        name += "-c" + "_".join(str(c) for c in classes)
    return Path(root) / name


def check_classes(classes: Sequence[int] | None) -> list[int] | None:
    """``classes`` sorted, or ValueError naming them unless distinct labels in 0..9."""
    if classes is None:
        return None
    out = sorted(int(c) for c in classes)
    if not out or len(set(out)) != len(out) or not all(0 <= c < NUM_CLASSES for c in out):
        raise ValueError(f"classes must be distinct labels in 0..{NUM_CLASSES - 1}, got "
                         f"{list(classes)}")
    return out


def _index(directory: Path, fmt: str) -> Corpus:
    """Load the saved index, or (re)index the shards when it is missing, stale, or points
    elsewhere (the index stores absolute shard paths; the directory may have been moved)."""
    path = directory / f"{fmt}.parquet"
    data = (directory / fmt).resolve()
    try:
        corpus = Corpus.load(path)
        if Path(corpus.local_path(0)).parent == data:
            return corpus
    except Exception:  # missing, stale, or written by an older es-stream: rebuild it below
        pass
    corpus = Corpus.from_webdataset(data) if fmt == "wds" else Corpus.from_mds(data)
    corpus.save(path)
    return corpus


def keep_classes(d: dict[str, np.ndarray], classes: list[int]) -> dict[str, np.ndarray]:
    """The samples of ``d`` (both splits) whose label is in ``classes``, in their order."""
    train, test = np.isin(d["y"], classes), np.isin(d["y_test"], classes)
    return {"x": d["x"][train], "y": d["y"][train], "x_test": d["x_test"][test],
            "y_test": d["y_test"][test]}


def build(root: str | os.PathLike, train: int = 40000, test: int = 10000, noise: float = 0.0,
          seed: int = 42, fmt: str = "wds", classes: Sequence[int] | None = None) -> MNIST1D:
    """Build (or reuse) the MNIST-1D corpus under ``root`` and return it with the test set.

    Args:
        root: parent directory of the cache (e.g. ``OUT/data``).
        train, test: split sizes (generated; before ``classes`` filters them).
        noise: fraction of train labels flipped (symmetric noise; test labels stay clean).
        seed: seed of the data generation and of the noise.
        fmt: ``"wds"`` or ``"mds"``; each format is written the first time it is asked for.
        classes: keep only the samples of these labels, in both splits (a pre-training source
            of part of the classes: about ``len(classes) / 10`` of ``train`` and ``test``
            remain); None: every class. The data are generated as without it, then filtered,
            so they are normalised like the full set.
    """
    if fmt not in ("wds", "mds"):
        raise ValueError(f"format must be 'wds' or 'mds', got {fmt!r}")
    classes = check_classes(classes)
    directory = build_dir(root, train, test, noise, seed, classes)
    arrays = directory / "arrays.npz"
    if not arrays.exists():
        d = generate(train, test, seed)
        if classes is not None:
            d = keep_classes(d, classes)
        y, flipped = add_label_noise(d["y"], noise, seed)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / "arrays.tmp.npz"
        np.savez(tmp, x=d["x"], y=y, y_clean=d["y"], noisy=flipped, x_test=d["x_test"],
                 y_test=d["y_test"])
        os.replace(tmp, arrays)
        (directory / "meta.json").write_text(json.dumps(
            {"train": train, "test": test, "noise": noise, "seed": seed, "classes": classes,
             "kept_train": len(y), "kept_test": len(d["y_test"])}, indent=1))
    a = dict(np.load(arrays))
    if not (directory / fmt).exists():
        tmp = Path(tempfile.mkdtemp(prefix=f".{fmt}-", dir=directory))
        try:
            (write_wds if fmt == "wds" else write_mds)(tmp / "shards", a["x"], a["y"])
            os.replace(tmp / "shards", directory / fmt)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return MNIST1D(corpus=_index(directory, fmt),
                   test_x=torch.from_numpy(a["x_test"]).unsqueeze(1),
                   test_y=torch.from_numpy(a["y_test"]),
                   y=a["y"], y_clean=a["y_clean"], noisy=a["noisy"], directory=directory,
                   train_x=a["x"])


class DecodeWDS:
    """Decode a tar sample to ``{"x.npy": float32[40], "cls": int}``.

    webdataset's default decoder reads ``.npy`` with ``np.load``, whose header parser runs
    ``ast.literal_eval`` per sample: about 40% of the time to read one of these tiny samples.
    When the header is byte-for-byte the one :func:`write_wds` writes, the payload is viewed
    directly; any other sample goes to the default decoder, so the result is the same.
    """

    def __init__(self) -> None:
        self.header = _npy_bytes(np.zeros(SEQ_LEN, np.float32))[:-4 * SEQ_LEN]
        self.size = len(self.header) + 4 * SEQ_LEN
        self._fallback: Any = None

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        raw, label = sample.get("x.npy"), sample.get("cls")
        if isinstance(raw, bytes) and len(raw) == self.size and raw.startswith(self.header) \
                and isinstance(label, bytes):
            return {"x.npy": np.frombuffer(raw, "<f4", offset=len(self.header)), "cls": int(label)}
        if self._fallback is None:
            from es_stream.dataset import webdataset_decode

            self._fallback = webdataset_decode()
        return self._fallback(sample)


class Collate:
    """Decoded samples -> ``(x float32[B, 1, 40], y int64[B])``, for either format (a class,
    not a closure, so DataLoader workers can pickle it)."""

    def __init__(self, fmt: str) -> None:
        self.x_key, self.y_key = ("x.npy", "cls") if fmt == "wds" else ("x", "y")

    def __call__(self, samples: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(np.stack([s[self.x_key] for s in samples])).unsqueeze(1)
        y = torch.tensor([s[self.y_key] for s in samples], dtype=torch.int64)
        return x, y
