"""`CHUNK`: how many scores a whole-store pass (save, restore, a pruning decision) handles at a
time, and :func:`chunk_ranges` to walk ``[0, n)`` by it.

One constant for every such pass: 4M float32 scores are 16 MiB per array, so a pruning policy's
few temporaries per chunk stay near 50 MB while each file read or write is still large enough to
run at disk speed (``tools/bench_store.py``).
"""

from __future__ import annotations

from typing import Iterator

CHUNK = 1 << 22


def chunk_ranges(n: int, chunk: int = CHUNK) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of each chunk of ``[0, n)``, in order."""
    for start in range(0, n, chunk):
        yield start, min(start + chunk, n)
