"""es-stream for MosaicML Composer: :class:`EvolvedSampling` (ES, ESWP) and :class:`InfoBatch`
as Composer algorithms, trained on an
:class:`~es_stream.integrations.streaming_dataset.ESStreamingDataset`.

One module per algorithm (:mod:`.evolved_sampling`, :mod:`.infobatch`), what they share in
:mod:`.common`; every name is importable from here. Needs ``pip install 'es-stream[composer]'``
(mosaicml >= 0.32): without it, importing this package raises
:class:`~es_stream.errors.MissingExtraError` naming that extra.
"""

from __future__ import annotations

from ...errors import MissingExtraError

try:
    import composer  # noqa: F401
except ImportError as exc:
    raise MissingExtraError("es_stream.integrations.composer", "composer", "mosaicml") from exc

from .common import (LossFn, ScoreCheckpoint, agreed_manifests, causal_lm_sample_loss,  # noqa: E402
                     per_sample_losses, refresh_dataloader_len, train_dataset, unwrap_model)
from .evolved_sampling import EvolvedSampling, run_evolved_sampling_first  # noqa: E402
from .infobatch import InfoBatch  # noqa: E402

__all__ = ["EvolvedSampling", "InfoBatch", "LossFn", "ScoreCheckpoint", "agreed_manifests",
           "causal_lm_sample_loss", "per_sample_losses", "refresh_dataloader_len",
           "run_evolved_sampling_first", "train_dataset", "unwrap_model"]
