"""A bounded set of open shard files: readers keep at most :data:`MAX_OPEN_SHARDS` shards open,
closing the least recently used one to open another, so any number of shards is read within the
process's open-file limit (commonly 1,024; a DataLoader worker also needs descriptors for its
pipes and shared memory)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Generic, TypeVar

#: open shard files a reader keeps at most (per reader: one per DataLoader worker)
MAX_OPEN_SHARDS = 64

H = TypeVar("H")


class OpenShards(Generic[H]):
    """Shard index -> open handle, least recently used closed first beyond ``capacity``."""

    def __init__(self, open_shard: Callable[[int], H], close_handle: Callable[[H], None],
                 capacity: int = MAX_OPEN_SHARDS) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1 open shard, got {capacity}")
        self.open_shard, self.close_handle, self.capacity = open_shard, close_handle, capacity
        self.handles: OrderedDict[int, H] = OrderedDict()

    def get(self, shard: int) -> H:
        """The open handle of ``shard``, opening it (and closing the least recently used one
        when full) if needed."""
        handle = self.handles.get(shard)
        if handle is not None:
            self.handles.move_to_end(shard)
            return handle
        while len(self.handles) >= self.capacity:
            _, old = self.handles.popitem(last=False)
            self.close_handle(old)
        handle = self.open_shard(shard)
        self.handles[shard] = handle
        return handle

    def __len__(self) -> int:
        return len(self.handles)

    def close(self) -> None:
        while self.handles:
            _, handle = self.handles.popitem(last=False)
            self.close_handle(handle)
