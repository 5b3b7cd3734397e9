"""What makes a shard file the one that was indexed: its size, mtime and a cheap content check
(a BLAKE2b of its first and last :data:`CHECK_BYTES` bytes), recorded at index time in the index
file's metadata and verified when a reader opens the shard (:class:`ShardVerifier`).

Why at open, not only at :meth:`Corpus.load`: a shard may be replaced after the index was loaded
— between epochs, or by ``es-stream compact --overwrite`` swapping a directory under a running
reader. Reading it by the old offsets would serve the new shard's bytes under the old ids; the
check turns that into a :class:`~es_stream.errors.StaleIndexError` naming the shard.

The content check is compared on request, by ``Corpus.load(path, check="content")`` (at most
``2 * CHECK_BYTES`` bytes a shard: at 1e5 shards that is 13 GB, so not by default). At open, a reader compares by ``fstat`` alone: size, mtime
and the file (device, inode) that load saw, so a shard replaced afterwards — a rename over it,
as sync tools and ``compact --overwrite`` do — is caught without reading any of its bytes: no
byte of a pruned sample is read in an epoch. A change written into the same file that also
restores its mtime is left to the readers' own per-sample checks (the tar header of each sample,
MDS's sample offset table).

An index written before the check existed has no ``check`` for its shards: size and mtime are
compared (at load and at open), as they always were.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from .errors import StaleIndexError

#: bytes hashed at each end of a shard
CHECK_BYTES = 64 << 10
_PREFIX = "blake2b-128:"


def content_check(fd: int, size: int) -> str:
    """The content check of the open file ``fd`` of ``size`` bytes: a BLAKE2b (128 bits) of its
    first and last :data:`CHECK_BYTES` bytes (all of it when smaller), and its size."""
    h = hashlib.blake2b(digest_size=16)
    h.update(size.to_bytes(8, "little"))
    h.update(os.pread(fd, min(size, CHECK_BYTES), 0))
    if size > CHECK_BYTES:
        start = max(size - CHECK_BYTES, CHECK_BYTES)
        h.update(os.pread(fd, size - start, start))
    return _PREFIX + h.hexdigest()


def is_check(value: object) -> bool:
    """Whether ``value`` is a content check as :func:`content_check` writes it (or None)."""
    return value is None or (isinstance(value, str) and value.startswith(_PREFIX)
                             and len(value) == len(_PREFIX) + 32)


class ShardVerifier:
    """Verifies each shard of ``corpus`` against what was indexed when a reader opens it.

    Once per shard for as long as the reader lives (an epoch): the stat of a shard that passed is
    kept, and a reopened file with the same device, inode, size and mtime is not checked again
    (an LRU of open files may reopen a shard often). :meth:`reset` forgets them (the reader's
    ``close``). Shards without a recorded mtime (streamed URLs, MDS shards not fetched when
    indexed) and corpora loaded with ``Corpus.load(check=False)`` are not verified.
    """

    def __init__(self, corpus: Any) -> None:  # an es_stream.Corpus (this module is below it)
        self.corpus = corpus
        self.passed: dict[int, tuple[int, int, int, int]] = {}

    def verify(self, shard: int, fd: int, path: str) -> os.stat_result:
        """fstat the open shard ``fd`` and compare it with the index; the stat, or a
        :class:`StaleIndexError` naming ``path``."""
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if self.passed.get(shard) == key:
            return st
        info = self.corpus.shards[shard]
        if info.mtime_ns >= 0 and getattr(self.corpus, "verify_shards", True):
            what = None
            if st.st_size != info.size:
                what = f"size {info.size} -> {st.st_size}"
            elif st.st_mtime_ns != info.mtime_ns:
                what = f"mtime {info.mtime_ns} -> {st.st_mtime_ns}"
            elif self.corpus.file_ids.get(shard, (st.st_dev, st.st_ino)) != (st.st_dev, st.st_ino):
                what = ("same size and mtime, different content: another file at this path than "
                        "when the index was loaded")
            if what is not None:
                where = self.corpus.index_path
                raise StaleIndexError(
                    f"{path}: shard changed since it was indexed ({what}); its samples are not "
                    "the ones the index lists, so none is read — re-index the corpus"
                    + (f" (es-stream index ... -o {where})" if where else ""))
        self.passed[shard] = key
        return st

    def reset(self) -> None:
        self.passed.clear()
