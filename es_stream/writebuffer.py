"""`WriteBuffer`: recent score updates held in memory, applied to a file in sorted batches.

Why: a memory-mapped store of 1e9 samples is 4 GB; random single-id writes each dirty one 4 KiB
page, so the kernel writes back a page per update (~250k updates/s here, see BENCHMARKS.md).
Buffering the updates and applying them sorted, many at a time, coalesces them per page and
keeps the file's dirty pages in step with the buffer's size.

The buffer is a small log-structured merge: each :meth:`add` becomes a sorted segment, and
neighbouring segments of similar size are merged, so there are O(log capacity) segments and a
lookup is one ``searchsorted`` per segment. Newer values win over older ones for the same id.
A one-hash Bloom filter of 8 bits per entry of capacity (``id mod m``) sends only the ids that
may be buffered (at most ~12% of the others when full) to those lookups.
"""

from __future__ import annotations

import numpy as np


def _merge(older: tuple[np.ndarray, np.ndarray],
           newer: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Union of two sorted, id-unique segments; for an id in both, ``newer``'s value."""
    ids = np.concatenate([older[0], newer[0]])
    values = np.concatenate([older[1], newer[1]])
    order = np.argsort(ids, kind="stable")  # stable: of two equal ids the newer one sorts last
    ids, values = ids[order], values[order]
    last = np.ones(len(ids), dtype=bool)
    last[:-1] = ids[:-1] != ids[1:]
    return ids[last], values[last]


class WriteBuffer:
    """Pending ``(id, value)`` updates, at most ``capacity`` of them before :attr:`full`.

    Args:
        capacity: updates held before the owner should :meth:`drain` (12 bytes each).
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.segments: list[tuple[np.ndarray, np.ndarray]] = []
        self.size = 0  # entries held (an id updated twice may count twice until merged)
        self._mask = (1 << max(6, (8 * capacity - 1).bit_length())) - 1  # filter bits - 1
        self._filter = np.zeros((self._mask + 1) // 8, dtype=np.uint8)

    def __len__(self) -> int:
        return self.size

    @property
    def full(self) -> bool:
        return self.size >= self.capacity

    def add(self, ids: np.ndarray, values: np.ndarray) -> None:
        """Record updates; ``ids`` must be unique within one call. No ids (an empty meta-batch)
        is a no-op: an empty segment would break :meth:`overlay`'s lookups."""
        if len(ids) == 0:
            return
        order = np.argsort(ids, kind="stable")
        segment = (np.asarray(ids, dtype=np.int64)[order], np.asarray(values, np.float32)[order])
        self.segments.append(segment)
        self.size += len(order)
        h = segment[0] & self._mask
        np.bitwise_or.at(self._filter, h >> 3, (1 << (h & 7)).astype(np.uint8))
        # merge while the newest segment is at least half its older neighbour (amortised
        # O(log capacity) merges per entry, and O(log capacity) segments to look up)
        while len(self.segments) > 1 and 2 * len(self.segments[-1][0]) >= len(self.segments[-2][0]):
            newer = self.segments.pop()
            older = self.segments.pop()
            merged = _merge(older, newer)
            self.size -= len(older[0]) + len(newer[0]) - len(merged[0])
            self.segments.append(merged)

    def overlay(self, ids: np.ndarray, values: np.ndarray) -> None:
        """Replace, in place, ``values[i]`` by the buffered value of ``ids[i]`` where there is one."""
        if not self.segments:
            return
        h = ids & self._mask
        maybe = np.flatnonzero((self._filter[h >> 3] >> (h & 7).astype(np.uint8)) & 1)
        if not len(maybe):
            return
        query = ids[maybe]
        for seg_ids, seg_values in self.segments:  # oldest first, so newer segments win
            pos = np.searchsorted(seg_ids, query)
            np.minimum(pos, len(seg_ids) - 1, out=pos)
            hit = seg_ids[pos] == query
            if hit.any():
                values[maybe[hit]] = seg_values[pos[hit]]

    def drain(self) -> tuple[np.ndarray, np.ndarray]:
        """All pending updates as sorted unique ``(ids, values)``, newest value per id; empties
        the buffer."""
        if not self.segments:
            return np.empty(0, np.int64), np.empty(0, np.float32)
        merged = self.segments[0]
        for segment in self.segments[1:]:
            merged = _merge(merged, segment)
        self.segments, self.size = [], 0
        self._filter.fill(0)
        return merged
