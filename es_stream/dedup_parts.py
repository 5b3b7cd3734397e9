"""What makes ``es-stream dedup`` resumable: each shard's content digests (and MinHash
signatures) saved once the shard is read, so a rerun after a crash or a kill reads only the
shards not saved yet (:func:`es_stream.dedup.corpus_dedup` with ``parts_dir``).

**Keyed, never mixed.** The parts of one dedup live in ``parts_dir/<key>/``, the key a digest of
everything that decides a shard's digests and signatures: the corpus fingerprint (its shards'
names, sizes and sample counts), the compared ``field``, whether near duplicates are sought and
the MinHash settings (``num_perm``, ``shingle``, ``seed``), and the es-stream version. A changed
corpus or setting is another key: its parts are computed afresh, never mixed with these. (The
near-duplicate ``threshold``, ``bands`` and ``neighbours`` act after the parts, so a rerun with
another threshold reuses them.) Each shard's file is also named by that shard's identity (its
name, size, mtime and content check as indexed), so a shard rewritten in place is read again.

**Atomic.** One ``.npy`` per shard and array (``digests`` ``uint64 [count, 2]``; ``minhash``
``uint32 [count, num_perm]``), each written through :func:`es_stream.atomic.atomic_write` and
read back with ``allow_pickle=False``: a kill leaves either a whole file or none. A file of the
wrong shape or type (written by something else) is ignored and its shard read again.

**Disk and memory.** On disk, while a dedup runs: 16 bytes per sample, plus ``4 * num_perm`` (512
by default) with near duplicates. The caller removes the parts once its manifests are written
(:meth:`PartStore.remove`); nothing else in ``parts_dir`` is touched.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil

import numpy as np

from ._version import __version__
from .atomic import atomic_write
from .corpus import Corpus
from .dataset import ESDataset
from .manifest import EpochKeep

__all__ = ["PartStore", "PendingDataset"]

log = logging.getLogger(__name__)


class PartStore:
    """The saved parts of one dedup of ``corpus`` (see the module docstring).

    Args:
        corpus: the corpus being deduplicated.
        parts_dir: the directory that holds the parts (one sub-directory per key).
        field: the compared field (:class:`es_stream.dedup.Payload`; None: every field).
        near: whether MinHash signatures are saved too.
        hasher: the settings that decide the signatures (``MinHasher.describe()``).
        num_perm: the signature length.
    """

    def __init__(self, corpus: Corpus, parts_dir: str | os.PathLike, field: str | None,
                 near: bool, hasher: dict[str, str], num_perm: int) -> None:
        self.corpus, self.near, self.num_perm = corpus, near, num_perm
        key = {"corpus": corpus.fingerprint, "field": field, "near": near,
               "es_stream_version": __version__, **(hasher if near else {})}
        digest = hashlib.blake2b(json.dumps(key, sort_keys=True).encode(), digest_size=8)
        self.parts_dir = os.fspath(parts_dir)
        self.directory = os.path.join(self.parts_dir, digest.hexdigest())

    def _path(self, shard: int, what: str) -> str:
        info = self.corpus.shards[shard]
        ident = json.dumps([os.path.basename(info.name.rstrip("/")), info.size, info.mtime_ns,
                            info.num_samples, info.check])
        tag = hashlib.blake2b(ident.encode(), digest_size=6).hexdigest()
        return os.path.join(self.directory, f"shard-{shard:06d}-{tag}.{what}.npy")

    def load(self, shard: int) -> tuple[np.ndarray, np.ndarray | None] | None:
        """Shard ``shard``'s saved ``(digests, signatures)`` (signatures None without near), or
        None when it is not saved (or a file is not what this store writes)."""
        count = int(self.corpus.shard_counts[shard])
        wanted = [("digests", np.uint64, (count, 2))]
        if self.near:
            wanted.append(("minhash", np.uint32, (count, self.num_perm)))
        out = []
        for what, dtype, shape in wanted:
            path = self._path(shard, what)
            if not os.path.exists(path):
                return None
            try:
                arr = np.load(path, allow_pickle=False)
            except (OSError, ValueError) as e:
                log.warning("%s: unreadable (%s); reading shard %d again", path, e, shard)
                return None
            if arr.dtype != dtype or arr.shape != shape:
                log.warning("%s: %s %s, expected %s %s; reading shard %d again", path, arr.dtype,
                            arr.shape, np.dtype(dtype), shape, shard)
                return None
            out.append(arr)
        return out[0], (out[1] if self.near else None)

    def save(self, shard: int, digests: np.ndarray, signatures: np.ndarray | None) -> None:
        """Save shard ``shard``'s digests (and signatures), each file atomically; the digests
        last, so a shard counts as saved only once everything of it is."""
        os.makedirs(self.directory, exist_ok=True)
        parts = ([("minhash", signatures)] if self.near else []) + [("digests", digests)]
        for what, arr in parts:
            with atomic_write(self._path(shard, what)) as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, np.ascontiguousarray(arr), allow_pickle=False)

    def remove(self) -> None:
        """Delete this dedup's parts (its key's directory), and ``parts_dir`` if that leaves it
        empty; parts of other keys are left as they are."""
        shutil.rmtree(self.directory, ignore_errors=True)
        try:
            os.rmdir(self.parts_dir)
        except OSError:  # not empty (other keys' parts) or already gone
            pass


class PendingDataset(ESDataset):
    """An :class:`~es_stream.ESDataset` that reads only the sample ids in ``pending`` (sorted;
    None: all of them), the shards a resumed dedup has not saved: the ids stay the corpus's.
    A module-level class, so DataLoader workers can pickle it."""

    pending: np.ndarray | None = None

    def epoch_keep(self, epoch: int) -> EpochKeep | None:
        if self.pending is None:
            return super().epoch_keep(epoch)
        return EpochKeep(epoch, self.pending, None, self.corpus.num_samples)
