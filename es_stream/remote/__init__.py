"""Object-store shards (``s3://``, ``gs://``, ``http(s)://``) read by byte range.

:func:`coalesce_ranges` plans requests (pure numpy), :func:`open_store` maps a URL to an
obstore store from the standard environment, :class:`RangeFetcher` reads exact byte ranges with
several requests in flight, retries and a deadline. Needs ``pip install 'es-stream[remote]'``
for the fetching; the planning is numpy alone.
"""

from .fetch import DEFAULT_GAP, RangeFetcher, RetryPolicy
from .ranges import RangePlan, coalesce_ranges
from .store import REMOTE_SCHEMES, is_remote_url, open_store, split_url

__all__ = ["DEFAULT_GAP", "REMOTE_SCHEMES", "RangeFetcher", "RangePlan", "RetryPolicy",
           "coalesce_ranges", "is_remote_url", "open_store", "split_url"]
