"""Coalescing byte ranges into requests: a pure numpy function, testable alone.

Over a network each request costs a round trip (tens of milliseconds to an object store) while
a byte costs ``1 / bandwidth``; two ranges ``gap`` bytes apart are cheaper read as one request
when ``gap / bandwidth < round trip``, i.e. when the gap is under the link's
bandwidth-delay product. The bytes of the gap are read and dropped: a gap of 0 reads nothing a
caller did not ask for (es-stream's promise that pruned samples are never read), a larger gap
trades that promise for fewer requests. :data:`es_stream.remote.fetch.DEFAULT_GAP` is the
measured choice (``tools/bench_remote.py --gap``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RangePlan:
    """Requests covering a set of byte ranges, and where each range lies in them.

    ``keys[r]``, ``starts[r]``, ``ends[r]``: request r reads bytes ``[starts[r], ends[r])`` of
    object ``keys[r]`` (requests sorted by key, then offset). For input range i:
    ``request[i]`` is the request that holds it and ``within[i]`` its offset in that request's
    bytes, so its data is ``buffer[request[i]][within[i]:within[i] + sizes[i]]``.
    """

    keys: np.ndarray
    starts: np.ndarray
    ends: np.ndarray
    request: np.ndarray
    within: np.ndarray

    @property
    def num_requests(self) -> int:
        return len(self.starts)

    @property
    def request_bytes(self) -> int:
        """Bytes all requests read together (the ranges plus the gaps read between them)."""
        return int((self.ends - self.starts).sum())


def coalesce_ranges(keys: np.ndarray, offsets: np.ndarray, sizes: np.ndarray, *, gap: int = 0,
                    max_request: int = 8 << 20) -> RangePlan:
    """Group byte ranges ``[offsets[i], offsets[i] + sizes[i])`` of objects ``keys[i]`` into
    requests, in any input order.

    Two ranges of one object share a request when the second starts at most ``gap`` bytes
    after the furthest end read so far (overlapping and repeated ranges share one request, read
    once). A request is also cut where a range starts in another ``max_request``-aligned window
    than the request's first range, so a request spans under ``max_request`` bytes plus its
    last range: no request grows to a whole shard, which bounds the memory of one response.

    Zero-length ranges are allowed (they lie in some request, or in an empty one of their own).
    Raises ``ValueError`` for negative offsets, sizes or gap, or arrays of unequal length.
    """
    keys = np.asarray(keys, dtype=np.int64)
    offsets = np.asarray(offsets, dtype=np.int64)
    sizes = np.asarray(sizes, dtype=np.int64)
    if not (keys.shape == offsets.shape == sizes.shape) or keys.ndim != 1:
        raise ValueError(f"keys, offsets and sizes must be 1-d arrays of one length, got shapes "
                         f"{keys.shape}, {offsets.shape}, {sizes.shape}")
    if gap < 0 or max_request < 1:
        raise ValueError(f"gap must be >= 0 and max_request >= 1, got {gap} and {max_request}")
    if len(offsets) and (offsets.min() < 0 or sizes.min() < 0):
        raise ValueError("byte ranges need offsets >= 0 and sizes >= 0")
    order = np.lexsort((offsets, keys))
    k, o = keys[order], offsets[order]
    e = o + sizes[order]
    cut = np.ones(len(o), dtype=bool)
    if len(o) > 1:
        new_key = k[1:] != k[:-1]
        # furthest end read so far within each key: a running max that restarts at each key
        key_start = np.flatnonzero(np.concatenate([[True], new_key]))
        reach = e.copy()
        for a, b in zip(key_start, np.append(key_start[1:], len(e))):
            reach[a:b] = np.maximum.accumulate(e[a:b])
        window = o // max_request
        cut[1:] = new_key | (o[1:] - reach[:-1] > gap) | (window[1:] != window[:-1])
    firsts = np.flatnonzero(cut)
    if not len(firsts):
        empty = np.empty(0, dtype=np.int64)
        return RangePlan(empty, empty, empty, empty, empty)
    ends = np.maximum.reduceat(e, firsts)
    run_sorted = np.cumsum(cut) - 1
    request = np.empty(len(o), dtype=np.int64)
    request[order] = run_sorted
    starts = o[firsts]
    return RangePlan(keys=k[firsts], starts=starts, ends=ends, request=request,
                     within=offsets - starts[request])
