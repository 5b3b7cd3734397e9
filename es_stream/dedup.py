"""Deduplication decided once before training: exact (content hash) and near-duplicate (MinHash
+ LSH over byte shingles), written as prune-once manifests (``epoch=00000``, ``applies_to: all``)
that :class:`~es_stream.ESDataset` and ``es-stream compact`` read like a reference band.

**Exact.** Each sample's payload bytes are hashed with BLAKE2b (128-bit digest, ``hashlib``: no
extra dependency; measured by ``tools/bench_dedup.py`` at over 1M samples/s on one core for
256-byte samples, against xxh3-128 at about 10M/s, both far past what reading the shards
allows). Samples with equal digests are one group; the group's first sample by global id is
kept, the others are ``exact_dup``. A false match needs a 128-bit collision: about ``n^2 / 2^129``,
1e-21 at a billion samples. Memory: the digests (16 bytes per sample) and one sort (about 24 more
while it runs).

**Near.** Each sample's set of ``shingle``-byte substrings (default 5) is summarised by a MinHash
signature of ``num_perm`` (default 128) 32-bit values, computed in numpy (one pass per
permutation over a block of samples' shingle hashes; :class:`MinHasher`). The signature is cut into ``bands`` bands
(default 32 of 4 rows); samples whose band agrees fall in one LSH bucket. In each band's buckets
(ordered by id) a sample is compared with up to ``neighbours`` (default 4) samples just before it;
a pair is a near duplicate when the signatures agree on at least ``threshold`` (default 0.8) of
their values: the estimated Jaccard similarity of the shingle sets (Lee et al. 2022 use 0.8 with
5-grams). Near duplicates form groups by connected components (a chain of similar pairs is one
group, as in Lee et al.); the group's first sample by id is kept, the others are ``near_dup``.
With 32 bands of 4 rows a pair of similarity 0.8 shares a bucket in at least one band with
probability 1 - (1 - 0.8^4)^32 > 0.9999, so recall is set by the estimate's noise at the
threshold (standard deviation about 0.035 with 128 values), not by LSH.
Pairs are checked band by band, skipping pairs already joined, so nothing grows with the number
of pairs. Memory: ``4 * num_perm`` bytes per sample (512 by default) for the signatures, plus
one band's keys, sort order and group labels (about 40 bytes per sample) while it is bucketed
(``tools/bench_dedup.py`` measures the peak).

**Composed with a reference filter.** Given the kept ids of another once-for-all decision
(``es-stream prune --policy band|threshold``), only samples that filter keeps can represent a
group: a sample the filter drops is ``filtered``, and a group's first *kept-by-the-filter* sample
is the one kept, so a duplicate is never lost because its first copy was filtered. The manifest
is the AND of both decisions, with the reason per sample.

**Manifest columns**, besides the standard ones (``keep``, ``score``, ``weight``): ``reason``
(``kept``, ``exact_dup``, ``near_dup`` or ``filtered``) and ``duplicate_of`` (int64: the id of the
group's kept sample, -1 for none); ``score`` holds the similarity to that sample (1 for an exact
duplicate, the estimated Jaccard similarity for a near one, 0 otherwise).

Each process reads the corpus through DataLoader workers and hashes in its main thread; under
``torchrun`` each rank takes its part and rank 0 writes the manifests (``es-stream dedup``).

**Memory per sample**, all in one process: 16 bytes of digests and 4 of read counts; with
``near``, ``4 * num_perm`` (512) of signatures and about 40 while a band is bucketed; the exact
groups' sort about 24 more while it runs. 1e8 samples: about 4 GB exact, 57 GB near (a corpus
past one machine's memory is split, deduplicated per part, or compared by digest only).

**Resumable** (``corpus_dedup(parts_dir=...)``; ``es-stream dedup`` uses
``MANIFESTS/_dedup_parts``): each shard's digests and signatures are saved atomically once the
shard is read (:mod:`es_stream.dedup_parts`, keyed by the corpus fingerprint, the field and the
hashing settings, so another corpus or setting is never mixed in); a rerun after a crash or a
kill reads only the shards not saved, decides from all of them and writes manifests
byte-identical to an uninterrupted run's; the parts are removed once the manifests are written.
Under ``torchrun`` a rerun reads everything again. Disk while it runs: 16 bytes per sample,
``4 * num_perm`` more with ``near``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from ._version import __version__
from .reference_policy import ALL_EPOCHS
from .corpus import Corpus
from .errors import ManifestError
from .manifest import (APPLIES_TO, WRITE_ID, applies_to_all, clear_success, epoch_writer,
                       mark_success, read_epoch, shard_file, write_shard)

__all__ = ["REASONS", "DedupConfig", "DedupResult", "MinHasher", "Payload", "content_digests",
           "components", "corpus_dedup", "decide", "exact_groups", "near_groups",
           "remove_parts", "similarity", "write_manifests"]

#: the ``reason`` column's values, in the order of their codes in :class:`DedupResult`
REASONS = ("kept", "exact_dup", "near_dup", "filtered")
KEPT, EXACT, NEAR, FILTERED = range(4)

_MIX = np.uint64(0x9E3779B97F4A7C15)  # 2^64 / golden ratio: multiplicative hashing constant
_NO_SHINGLE = np.uint32(0xFFFFFFFF)  # signature value of a sample with no bytes


def content_digests(samples: Sequence[bytes]) -> np.ndarray:
    """The 128-bit BLAKE2b digest of each sample, as a ``uint64`` array ``[n, 2]``."""
    blake = hashlib.blake2b
    joined = b"".join([blake(s, digest_size=16).digest() for s in samples])
    return np.frombuffer(joined, dtype=np.uint64).reshape(len(samples), 2).copy()


def exact_groups(digests: np.ndarray, eligible: np.ndarray | None = None) -> np.ndarray:
    """For each sample, the id of the sample kept for its content: its own id when it is the
    first eligible sample (by id) with that digest, the id of that sample otherwise, -1 when no
    sample with that digest is eligible. ``digests``: ``[n, 2]`` uint64 (:func:`content_digests`);
    ``eligible``: bool ``[n]`` (default all)."""
    n = len(digests)
    ids = np.arange(n, dtype=np.int64)
    if n == 0:
        return ids
    ok = np.ones(n, bool) if eligible is None else np.asarray(eligible, bool)
    # within a digest, eligible samples first, then by id: a group's first row is its keeper
    order = np.lexsort((ids, ~ok, digests[:, 1], digests[:, 0]))
    d = digests[order]
    start = np.ones(n, bool)
    start[1:] = (d[1:] != d[:-1]).any(axis=1)
    first = np.maximum.accumulate(np.where(start, np.arange(n), 0))  # each row's group start
    keeper = order[first]
    keeper = np.where(ok[keeper], keeper, -1)
    out = np.empty(n, np.int64)
    out[order] = keeper
    return out


class MinHasher:
    """MinHash signatures of byte strings over their ``shingle``-byte substrings, in numpy.

    Each shingle gets a 32-bit simple tabulation hash (one random table of 256 values per byte
    position, XORed: 3-independent); permutation ``p`` maps it to ``(a_p x + b_p) mod 2^32``
    (``a_p`` odd: a bijection of 32-bit values), and the signature holds each permutation's
    minimum. A string shorter than ``shingle`` is one shingle (itself, zero-padded); an empty one
    has the signature of all ``2^32 - 1``. Deterministic for a ``seed``.

    Samples are processed in blocks of similar length (sorted by length) as a 2-D array, each
    row's tail past its last shingle filled with its first shingle's hash (a repeated value
    leaves a minimum unchanged), so one ``min`` along rows serves any mix of lengths.
    """

    def __init__(self, num_perm: int = 128, shingle: int = 5, seed: int = 0,
                 block: int = 1 << 16) -> None:
        if num_perm < 1:
            raise ValueError(f"num_perm must be >= 1, got {num_perm}")
        if not 1 <= shingle <= 16:
            raise ValueError(f"shingle must be 1..16 bytes, got {shingle}")
        self.num_perm, self.shingle, self.seed, self.block = num_perm, shingle, seed, block
        rng = np.random.default_rng([seed, 0x5EED])
        self._table = rng.integers(0, 1 << 32, (shingle, 256), dtype=np.uint64).astype(np.uint32)
        self._a = rng.integers(0, 1 << 32, num_perm, dtype=np.uint64).astype(np.uint32) | np.uint32(1)
        self._b = rng.integers(0, 1 << 32, num_perm, dtype=np.uint64).astype(np.uint32)

    def describe(self) -> dict[str, str]:
        return {"num_perm": str(self.num_perm), "shingle": str(self.shingle),
                "minhash_seed": str(self.seed)}

    def signatures(self, samples: Sequence[bytes]) -> np.ndarray:
        """uint32 ``[len(samples), num_perm]``: each sample's MinHash signature."""
        n, k = len(samples), self.shingle
        out = np.full((n, self.num_perm), _NO_SHINGLE, np.uint32)
        lengths = np.fromiter((len(s) for s in samples), dtype=np.int64, count=n)
        order = np.argsort(lengths, kind="stable")
        i = int(np.searchsorted(lengths[order], 0, side="right"))  # empty samples keep the max
        while i < n:
            j = min(n, i + max(1, self.block // max(k, int(lengths[order[i]]))))
            while j > i + 1 and (j - i) * max(k, int(lengths[order[j - 1]])) > self.block:
                j = max(i + 1, i + self.block // max(k, int(lengths[order[j - 1]])))
            rows = order[i:j]
            out[rows] = self._block([samples[r] for r in rows], lengths[rows])
            i = j
        return out

    def shingle_hashes(self, samples: Sequence[bytes], lengths: np.ndarray) -> np.ndarray:
        """uint32 ``[len(samples), S]``: each non-empty sample's shingle hashes, rows padded
        with their first hash to the longest sample's count ``S``."""
        k = self.shingle
        width = max(k, int(lengths.max()))
        x = np.frombuffer(b"".join([s.ljust(width, b"\0") for s in samples]), np.uint8)
        x = x.reshape(len(samples), width)
        s = width - k + 1
        h = self._table[0][x[:, :s]]
        for j in range(1, k):
            h ^= self._table[j][x[:, j:j + s]]
        counts = np.maximum(lengths - k + 1, 1)
        if (counts < s).any():
            h = np.where(np.arange(s) >= counts[:, None], h[:, :1], h)
        return h

    def _block(self, samples: Sequence[bytes], lengths: np.ndarray) -> np.ndarray:
        h = self.shingle_hashes(samples, lengths)
        out = np.empty((len(samples), self.num_perm), np.uint32)
        tmp = np.empty_like(h)
        for p in range(self.num_perm):
            np.multiply(h, self._a[p], out=tmp)
            tmp += self._b[p]
            tmp.min(axis=1, out=out[:, p])
        return out


def similarity(signatures: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Estimated Jaccard similarity of samples ``i`` and ``j`` (arrays of rows of
    ``signatures``): the share of signature values that agree."""
    return (signatures[i] == signatures[j]).mean(axis=1).astype(np.float32)


def near_groups(signatures: np.ndarray, threshold: float = 0.8, bands: int = 32,
                neighbours: int = 4, rows: np.ndarray | None = None) -> np.ndarray:
    """For each row of ``signatures`` (or of those listed in ``rows``, ascending, without
    copying them), the position of the one kept for its near-duplicate group (its own when it is
    first), by the rule in the module docstring: LSH with ``bands`` bands, each sample compared
    with up to ``neighbours`` earlier members of each of its buckets, pairs agreeing on at least
    ``threshold`` of the signature joined into groups."""
    perms = signatures.shape[1]
    rows = np.arange(len(signatures), dtype=np.int64) if rows is None else rows
    n = len(rows)
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if bands < 1 or perms % bands:
        raise ValueError(f"bands ({bands}) must divide the signature length ({perms})")
    width = perms // bands
    label = np.arange(n, dtype=np.int64)
    cut = np.float32(threshold) - np.float32(1e-6)
    for band in range(bands):
        part = signatures[rows, band * width:(band + 1) * width]
        key = np.zeros(n, np.uint64)
        for r in range(width):  # mix the band's values into one 64-bit bucket key
            key ^= part[:, r].astype(np.uint64)
            key *= _MIX
            key ^= key >> np.uint64(31)
        order = np.argsort(key, kind="stable")  # stable: ids ascending within a bucket
        sk = key[order]
        del key, part
        for o in range(1, neighbours + 1):
            same = np.flatnonzero(sk[o:] == sk[:-o])
            a, b = order[same + o], order[same]
            # pairs already in one group need no check: memory stays per band, not per pair
            apart = label[a] != label[b]
            a, b = a[apart], b[apart]
            hit = np.zeros(len(a), bool)
            for s in range(0, len(a), 1 << 16):  # [pairs, num_perm] temporaries in slices
                hit[s:s + (1 << 16)] = similarity(signatures, rows[a[s:s + (1 << 16)]],
                                                  rows[b[s:s + (1 << 16)]]) >= cut
            if hit.any():
                label = components(n, a[hit], b[hit], label)
    return label


def components(n: int, u: np.ndarray, v: np.ndarray,
               label: np.ndarray | None = None) -> np.ndarray:
    """Connected components of the graph on ``n`` nodes with edges ``(u, v)``: each node's
    smallest member (hooking each root under the smaller, then pointer jumping, until every
    edge joins two nodes with one root). ``label``: the components of edges already joined
    (each node's smallest member), to add these edges to."""
    label = np.arange(n, dtype=np.int64) if label is None else label.copy()
    while True:
        lu, lv = label[u], label[v]
        differ = lu != lv
        if not differ.any():
            return label
        np.minimum.at(label, np.maximum(lu, lv)[differ], np.minimum(lu, lv)[differ])
        while True:  # labels only point to smaller ids, so this converges
            jumped = label[label]
            if (jumped == label).all():
                break
            label = jumped


@dataclass
class DedupConfig:
    """What decides a dedup: ``near`` off means exact only. See the module docstring."""

    near: bool = False
    threshold: float = 0.8
    num_perm: int = 128
    bands: int = 32
    shingle: int = 5
    neighbours: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if self.bands < 1 or self.num_perm % self.bands:
            raise ValueError(f"bands ({self.bands}) must divide num_perm ({self.num_perm})")
        if self.neighbours < 1:
            raise ValueError(f"neighbours must be >= 1, got {self.neighbours}")

    def hasher(self) -> MinHasher:
        return MinHasher(self.num_perm, self.shingle, self.seed)

    def describe(self) -> dict[str, str]:
        out = {"policy": "dedup", "near": str(self.near)}
        if self.near:
            out.update({"threshold": repr(self.threshold), "bands": str(self.bands),
                        "neighbours": str(self.neighbours), **self.hasher().describe()})
        return out


@dataclass
class DedupResult:
    """One decision: per sample ``keep``, ``reason`` (uint8 codes into :data:`REASONS`),
    ``duplicate_of`` (the kept sample of its group, -1 for none) and ``similarity`` to it."""

    keep: np.ndarray
    reason: np.ndarray
    duplicate_of: np.ndarray
    similarity: np.ndarray
    counts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.counts = {name: int((self.reason == code).sum()) for code, name in enumerate(REASONS)}


def decide(digests: np.ndarray, signatures: np.ndarray | None = None,
           eligible: np.ndarray | None = None, config: DedupConfig | None = None) -> DedupResult:
    """The dedup decision from content digests (and, for near duplicates, MinHash signatures),
    restricted to the ``eligible`` samples (a reference filter's keep mask; default all)."""
    config = config or DedupConfig()
    n = len(digests)
    ok = np.ones(n, bool) if eligible is None else np.asarray(eligible, bool)
    if len(ok) != n:
        raise ValueError(f"eligible has {len(ok)} entries, digests {n}")
    ids = np.arange(n, dtype=np.int64)
    dup_of = exact_groups(digests, ok)
    reason = np.full(n, KEPT, np.uint8)
    sim = np.zeros(n, np.float32)
    exact = ok & (dup_of != ids)
    reason[exact], sim[exact] = EXACT, 1.0
    reason[~ok] = FILTERED
    if config.near and signatures is not None:
        if signatures.shape != (n, config.num_perm):
            raise ValueError(f"signatures have shape {signatures.shape}, expected ({n}, "
                             f"{config.num_perm})")
        rest = np.flatnonzero(reason == KEPT)  # near groups among the exact keepers only
        local = near_groups(signatures, config.threshold, config.bands, config.neighbours, rest)
        near = np.flatnonzero(local != np.arange(len(rest)))
        who, keeper = rest[near], rest[local[near]]
        reason[who], sim[who] = NEAR, similarity(signatures, who, keeper)
        dup_of[who] = keeper
        # an exact copy of a near duplicate points at the near group's keeper too, with the
        # near duplicate's similarity to it
        via = np.flatnonzero((reason == EXACT) & (reason[np.maximum(dup_of, 0)] == NEAR))
        sim[via] = sim[dup_of[via]]
        dup_of = np.where(dup_of >= 0, dup_of[np.maximum(dup_of, 0)], -1)
    elif config.near:
        raise ValueError("near-duplicate detection needs the MinHash signatures")
    dup_of[reason == KEPT] = -1
    return DedupResult(keep=reason == KEPT, reason=reason, duplicate_of=dup_of, similarity=sim)


class Payload:
    """A raw sample -> the bytes dedup hashes: the field ``field`` (bytes; str as UTF-8; a
    numpy array's buffer; a number's digits), or
    with ``field=None`` every payload field (names not starting with ``_``) in name order, each
    as its name, length and bytes, so that different splits into fields never hash equal."""

    def __init__(self, field: str | None = None) -> None:
        self.field = field

    def _bytes(self, sample: dict[str, Any], name: str) -> bytes:
        value = sample[name]
        if isinstance(value, (bytes, bytearray, memoryview)):
            return bytes(value)
        if isinstance(value, str):
            return value.encode()
        if isinstance(value, np.ndarray):
            return value.tobytes()
        if isinstance(value, (int, float, np.number)):  # an MDS int/float column: its digits
            return repr(value).encode()
        raise TypeError(f"sample {sample.get('__key__')!r}: field {name!r} is "
                        f"{type(value).__name__}; dedup hashes bytes, str or numpy arrays — "
                        "choose another --field")

    def __call__(self, sample: dict[str, Any]) -> bytes:
        if self.field is not None:
            if self.field not in sample:
                raise KeyError(f"sample {sample.get('__key__')!r} has no field {self.field!r} "
                               f"(fields: {', '.join(k for k in sample if not k.startswith('_'))})")
            return self._bytes(sample, self.field)
        parts = []
        for name in sorted(k for k in sample if not k.startswith("_")):
            data = self._bytes(sample, name)
            parts.append(b"%s\0%d\0" % (name.encode(), len(data)) + data)
        return b"".join(parts)


class _AsList:
    """Collate: the list of samples itself (a class, so DataLoader workers can pickle it)."""

    def __call__(self, samples: list[bytes]) -> list[bytes]:
        return samples


def _filter_mask(corpus: Corpus, filter_dir: str | os.PathLike | None) -> np.ndarray | None:
    if filter_dir is None:
        return None
    if not applies_to_all(filter_dir):
        raise ManifestError(f"{filter_dir}: not a decision made once for every epoch (its "
                            "epoch=00000 lacks applies_to: all); combine dedup with `es-stream "
                            "prune --policy band|threshold` output only")
    kept = read_epoch(filter_dir, 0, corpus.fingerprint, corpus.shard_counts)
    if kept is None:
        raise ManifestError(f"{filter_dir}: no epoch=00000 to combine with")
    mask = np.zeros(corpus.num_samples, bool)
    mask[kept.kept_ids] = True
    return mask


def corpus_dedup(corpus: Corpus, config: DedupConfig | None = None, *,
                 filter_dir: str | os.PathLike | None = None, field: str | None = None,
                 num_workers: int = 2, meta_batch_size: int = 4096,
                 progress: Callable[[int], None] | None = None,
                 parts_dir: str | os.PathLike | None = None) -> DedupResult:
    """Read every sample of ``corpus`` once (through :class:`~es_stream.ESDataset`, in id
    order per worker) and decide (see :func:`decide`), combined with the once-for-all decision
    in ``filter_dir`` when given. ``field``: see :class:`Payload`. ``progress(samples)`` is
    called after each meta-batch (and once per shard taken from ``parts_dir``).

    ``parts_dir``: save each shard's digests and signatures there once it is read, and take
    those already saved (:class:`es_stream.dedup_parts.PartStore`, keyed by the corpus and the
    settings), so a run killed midway resumes where it stopped with the same decision; remove
    them with :func:`remove_parts` once the manifests are written. One process only: under
    ``torchrun`` a shard is split across ranks, so ``parts_dir`` is not used there.

    Under ``torch.distributed`` (``torchrun``) each rank reads and hashes its own part of the
    corpus (ESDataset's split: disjoint, every sample once); the digests and signatures are
    then summed across ranks (each sample's are non-zero on one rank only) in chunks, and every
    rank returns the same decision."""
    import torch.distributed as dist

    from .dataset import loader
    from .dedup_parts import PendingDataset

    config = config or DedupConfig()
    eligible = _filter_mask(corpus, filter_dir)
    n = corpus.num_samples
    digests = np.zeros((n, 2), np.uint64)
    hasher = config.hasher() if config.near else None
    signatures = np.zeros((n, config.num_perm), np.uint32) if hasher else None
    seen = np.zeros(n, np.int32)
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    parts = None if parts_dir is None or distributed else _part_store(corpus, parts_dir, field,
                                                                      config)
    starts, left = corpus.shard_starts, corpus.shard_counts.copy()  # left: samples to read
    for shard in range(corpus.num_shards if parts is not None else 0):
        saved = parts.load(shard)
        if saved is not None:
            a, b = int(starts[shard]), int(starts[shard + 1])
            digests[a:b], seen[a:b], left[shard] = saved[0], 1, 0
            if signatures is not None:
                signatures[a:b] = saved[1]
            if progress is not None:
                progress(b - a)
    pending = None if parts is None else np.flatnonzero(seen == 0)
    ds = PendingDataset(corpus, meta_batch_size=meta_batch_size, decode=Payload(field),
                        collate=_AsList(), shuffle=False, rank=rank, world_size=world)
    ds.pending = pending  # None: every sample
    for mb in (loader(ds, num_workers=num_workers) if pending is None or len(pending) else ()):
        ids = mb.ids.numpy()
        if len(mb.lost_ids):
            raise ManifestError(f"{len(mb.lost_ids)} samples could not be read; dedup needs "
                                "every sample")
        digests[ids] = content_digests(mb.data)
        if hasher is not None:
            signatures[ids] = hasher.signatures(mb.data)
        seen[ids] += 1
        if parts is not None:  # save each shard as soon as all of it is read
            shards = np.searchsorted(starts, ids, side="right") - 1
            left -= np.bincount(shards, minlength=corpus.num_shards)
            for shard in np.unique(shards[left[shards] == 0]):
                a, b = int(starts[shard]), int(starts[shard + 1])
                parts.save(int(shard), digests[a:b], None if signatures is None
                           else signatures[a:b])
        if progress is not None:
            progress(len(ids))
    if distributed:
        for arr in (digests.view(np.int64), seen) + (() if signatures is None else
                                                     (signatures.view(np.int32),)):
            _sum_across_ranks(arr)
    if not (seen == 1).all():
        raise ManifestError(f"read {int((seen > 0).sum())} of {n} samples of the corpus "
                            f"({int((seen > 1).sum())} more than once); dedup needs every sample "
                            "exactly once")
    return decide(digests, signatures, eligible, config)


def _part_store(corpus: Corpus, parts_dir: str | os.PathLike, field: str | None,
                config: DedupConfig) -> Any:
    from .dedup_parts import PartStore

    return PartStore(corpus, parts_dir, field, config.near, config.hasher().describe(),
                     config.num_perm)


def remove_parts(corpus: Corpus, parts_dir: str | os.PathLike, field: str | None = None,
                 config: DedupConfig | None = None) -> None:
    """Remove what :func:`corpus_dedup` saved in ``parts_dir`` for this corpus, ``field`` and
    ``config`` (call it once the manifests are written); other parts there are left."""
    _part_store(corpus, parts_dir, field, config or DedupConfig()).remove()


def _sum_across_ranks(arr: np.ndarray, chunk: int = 1 << 22) -> None:
    """``arr`` (int32 or int64, C-contiguous) summed over every rank, in place, ``chunk``
    values at a time: each sample's values are non-zero on the one rank that read it, so the
    sum is that rank's value, exactly (integer addition of zeros)."""
    import torch
    import torch.distributed as dist

    from .distributed import wire_device

    wire = wire_device(dist.get_backend())
    flat = arr.reshape(-1)
    for start in range(0, len(flat), chunk):
        part = torch.from_numpy(flat[start:start + chunk]).to(wire)
        dist.all_reduce(part)
        flat[start:start + chunk] = part.cpu().numpy()


def write_manifests(corpus: Corpus, result: DedupResult, out_dir: str | os.PathLike,
                    config: DedupConfig | None = None,
                    filter_dir: str | os.PathLike | None = None) -> str:
    """Write ``result`` as ``out_dir/epoch=00000`` for every epoch (``applies_to: all``), one
    shard file each, with the ``reason`` and ``duplicate_of`` columns; returns the directory.
    Rewriting the same decision gives byte-identical files (the write id is a digest of it)."""
    config = config or DedupConfig()
    if filter_dir is not None and os.path.abspath(filter_dir) == os.path.abspath(out_dir):
        raise ValueError(f"{out_dir}: the dedup manifests would replace the filter decision they "
                         "combine; write them to another directory")
    if not result.keep.any():
        raise ManifestError("the decision keeps no sample; nothing to train on")
    describe = {**config.describe(), APPLIES_TO: ALL_EPOCHS,
                "filter": os.path.abspath(filter_dir) if filter_dir is not None else ""}
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps({**describe, "corpus": corpus.fingerprint,
                         "es_stream_version": __version__}, sort_keys=True).encode())
    for arr in (result.keep, result.reason, result.duplicate_of, result.similarity):
        h.update(np.ascontiguousarray(arr).tobytes())
    write_id = h.hexdigest()
    meta = {"corpus_fingerprint": corpus.fingerprint, "epoch": "0",
            "es_stream_version": __version__, **describe, WRITE_ID: write_id}
    names = np.array(REASONS, dtype=object)
    starts = corpus.shard_starts
    with epoch_writer(out_dir, 0) as directory:
        clear_success(out_dir, 0)
        for shard in range(corpus.num_shards):
            a, b = int(starts[shard]), int(starts[shard + 1])
            write_shard(shard_file(out_dir, 0, shard), a, result.keep[a:b], result.similarity[a:b],
                        np.ones(b - a, np.float32),
                        {**meta, "shard": corpus.shards[shard].name},
                        extra={"reason": names[result.reason[a:b]],
                               "duplicate_of": result.duplicate_of[a:b]})
        mark_success(out_dir, 0, write_id)
    return directory
