"""es-stream: Evolved Sampling over sharded corpora.

The core: :class:`Corpus` (shard index and stable sample ids), :class:`ESDataset` (the
meta-batch stream), :class:`MetaBatch`, and :func:`loader`.
"""

from ._version import __version__
from .corpus import Corpus, ShardInfo
from .dataset import ESDataset, loader
from .errors import ESStreamError, MissingExtraError, ShardError, StaleIndexError
from .metabatch import MetaBatch
from .plan import EpochPlan

__all__ = [
    "Corpus", "ESDataset", "EpochPlan", "ESStreamError", "MetaBatch", "MissingExtraError",
    "ShardError", "ShardInfo", "StaleIndexError", "__version__", "loader",
]
