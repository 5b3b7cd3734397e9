"""es-stream: Evolved Sampling over sharded corpora.

The core: :class:`Corpus` (shard index and stable sample ids), :class:`ESDataset` (the
meta-batch stream), :class:`MetaBatch`, and :func:`loader`.
"""

from ._version import __version__
from .checkpoint import Checkpointer
from .corpus import Corpus, ShardInfo
from .dataset import ESDataset, loader
from .distributed import merge_rank_scores
from .device_channel import FeedbackChannel
from .errors import (ESStreamError, IndexFileError, ManifestError, MissingExtraError,
                     RankMismatchError, SampleError, ScoreError, ShardError, StaleIndexError)
from .metabatch import MetaBatch
from .plan import EpochPlan
from .policy import ESWPPolicy, InfoBatchPolicy
from .reference_policy import BandPolicy, ThresholdPolicy
from .pruner import Pruner
from .random_subsets import RS2Policy
from .reducible import ReducibleLossSelector
from .reference_scoring import Scorer, ScoreResult, score_corpus
from .batch_schedule import BatchSchedule
from .selector import (ESSelector, LossSelector, SelectiveBackpropSelector, Selector,
                       TopKSelector, UniformSelector)
from .state import TrainingState
from .store import MemoryScoreStore, ScoreStore
from .mapped_store import MappedScoreStore  # registers the memory-mapped backing

__all__ = ["MappedScoreStore", "MemoryScoreStore", 
    "BandPolicy", "BatchSchedule", "Checkpointer", "Corpus", "ESDataset", "ESSelector",
    "ESWPPolicy", "EpochPlan", "ESStreamError",
    "FeedbackChannel", "IndexFileError", "InfoBatchPolicy", "LossSelector", "ManifestError",
    "MetaBatch", "MissingExtraError", "Pruner", "RS2Policy", "RankMismatchError", "ReducibleLossSelector",
    "SampleError",
    "ScoreError", "ScoreResult", "ScoreStore", "Scorer", "SelectiveBackpropSelector", "Selector",
    "ShardError", "ShardInfo", "StaleIndexError", "ThresholdPolicy", "TopKSelector",
    "TrainingState", "UniformSelector",
    "__version__", "loader", "merge_rank_scores", "score_corpus",
]
