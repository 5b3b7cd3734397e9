"""Parquet shard manifests: the durable, inspectable record of what each epoch keeps.

Layout (fixed; other tools read it)::

    out_dir/epoch=EEEEE/shard=SSSSS.parquet    one file per shard, 5-digit zero-padded
    out_dir/epoch=EEEEE/_SUCCESS               written last: the epoch counts only then

Columns: ``sample`` (uint32, position in the shard), ``id`` (int64, global id), ``keep`` (bool),
``score`` (float32, the score the decision used) and ``weight`` (float32, the loss weight a kept
sample carries: 1, or InfoBatch's 1/(1-r)). Key-value metadata: ``corpus_fingerprint``,
``policy``, ``ratio``, ``seed``, ``epoch``, ``es_stream_version``, ``shard``. ``sample`` and
``id`` are delta-encoded, so a manifest costs about 4.2 bytes per sample, almost all of it the
score. Read all epochs as one table with
``pyarrow.dataset.dataset(out_dir, partitioning="hive")`` or DuckDB's
``read_parquet('out_dir/*/*.parquet', hive_partitioning=true)``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ._atomic import atomic_write
from ._version import __version__
from .errors import ManifestError

log = logging.getLogger(__name__)

SUCCESS = "_SUCCESS"


def epoch_dir(out_dir: str | os.PathLike, epoch: int) -> str:
    return os.path.join(os.fspath(out_dir), f"epoch={epoch:05d}")


def shard_file(out_dir: str | os.PathLike, epoch: int, shard: int) -> str:
    return os.path.join(epoch_dir(out_dir, epoch), f"shard={shard:05d}.parquet")


def write_shard(path: str, first_id: int, keep: np.ndarray, score: np.ndarray,
                weight: np.ndarray, metadata: dict[str, str]) -> None:
    """Write one shard's manifest atomically."""
    n = len(keep)
    table = pa.table({
        "sample": pa.array(np.arange(n, dtype=np.uint32)),
        "id": pa.array(np.arange(first_id, first_id + n, dtype=np.int64)),
        "keep": pa.array(keep.astype(bool)),
        "score": pa.array(score.astype(np.float32)),
        "weight": pa.array(weight.astype(np.float32)),
    }).replace_schema_metadata({k.encode(): v.encode() for k, v in metadata.items()})
    with atomic_write(path) as tmp:
        pq.write_table(table, tmp, compression="zstd",
                       use_dictionary=["keep", "weight"],
                       column_encoding={"sample": "DELTA_BINARY_PACKED", "id": "DELTA_BINARY_PACKED",
                                        "score": "BYTE_STREAM_SPLIT"})


def mark_success(out_dir: str | os.PathLike, epoch: int) -> None:
    with atomic_write(os.path.join(epoch_dir(out_dir, epoch), SUCCESS)) as tmp:
        with open(tmp, "w") as f:
            f.write(f"es-stream {__version__}\n")


def clear_success(out_dir: str | os.PathLike, epoch: int) -> None:
    """Un-publish an epoch before rewriting it, so readers never mix old and new files; also
    remove temporary files a killed writer left there (``.<name>.<random>.tmp``)."""
    directory = epoch_dir(out_dir, epoch)
    try:
        os.unlink(os.path.join(directory, SUCCESS))
    except FileNotFoundError:
        pass
    if os.path.isdir(directory):
        for name in os.listdir(directory):
            if name.startswith(".") and name.endswith(".tmp"):
                os.unlink(os.path.join(directory, name))


@dataclass
class EpochKeep:
    """What one epoch keeps: sorted ``kept_ids`` and, when any differ from 1, their weights."""

    epoch: int
    kept_ids: np.ndarray
    weights: np.ndarray | None
    num_samples: int

    @property
    def kept_fraction(self) -> float:
        return len(self.kept_ids) / self.num_samples


def read_epoch(out_dir: str | os.PathLike, epoch: int, fingerprint: str,
               shard_counts: Iterable[int]) -> EpochKeep | None:
    """Read epoch ``epoch``'s manifests for a corpus (its fingerprint and shard sizes).

    Returns None when the epoch has no directory (nothing pruned). Raises
    :class:`ManifestError`, naming the file, for an epoch without ``_SUCCESS``, a missing shard
    file, a manifest of another corpus, or a shard whose row count differs from the corpus.
    """
    directory = epoch_dir(out_dir, epoch)
    if not os.path.isdir(directory):
        return None
    if not os.path.exists(os.path.join(directory, SUCCESS)):
        raise ManifestError(f"{directory}: no {SUCCESS} marker — the epoch's manifests were not "
                            "finished (a crash while writing?); re-run the pruning step or delete "
                            "the directory to keep everything")
    kept, weights, first = [], [], 0
    any_weight = False
    for shard, count in enumerate(shard_counts):
        path = shard_file(out_dir, epoch, shard)
        try:
            pf = pq.ParquetFile(path)
        except FileNotFoundError as exc:
            raise ManifestError(f"{path}: manifest missing for shard {shard} of epoch {epoch}; "
                                "the epoch directory is incomplete — re-run the pruning step") from exc
        meta = {k.decode(): v.decode() for k, v in (pf.schema_arrow.metadata or {}).items()}
        if meta.get("corpus_fingerprint") != fingerprint:
            raise ManifestError(f"{path}: manifest of corpus {meta.get('corpus_fingerprint')!r}, "
                                f"this corpus is {fingerprint!r}; point manifests= at this "
                                "corpus's manifest directory")
        unit = _all_ones(pf, "weight")  # the footer's statistics say so: skip the column
        table = pf.read(columns=["keep"] if unit else ["keep", "weight"])
        if table.num_rows != count:
            raise ManifestError(f"{path}: {table.num_rows} rows, shard {shard} has {count} samples")
        keep = table.column("keep").to_numpy(zero_copy_only=False)
        idx = np.flatnonzero(keep)
        kept.append(idx + first)
        w = (np.ones(len(idx), np.float32) if unit
             else table.column("weight").to_numpy(zero_copy_only=False)[idx])
        any_weight = any_weight or bool((w != 1).any())
        weights.append(w)
        first += count
    return EpochKeep(epoch, np.concatenate(kept).astype(np.int64),
                     np.concatenate(weights).astype(np.float32) if any_weight else None, first)


def _all_ones(pf: pq.ParquetFile, column: str) -> bool:
    """Whether every row group's statistics give ``column`` min == max == 1 (ESWP's weights)."""
    md = pf.metadata
    try:
        j = pf.schema_arrow.get_field_index(column)
        stats = [md.row_group(i).column(j).statistics for i in range(md.num_row_groups)]
    except (KeyError, IndexError):
        return False
    return md.num_row_groups > 0 and all(
        st is not None and st.has_min_max and st.min == 1 and st.max == 1 for st in stats)


def list_epochs(out_dir: str | os.PathLike) -> list[int]:
    """Epochs with a finished (``_SUCCESS``) manifest directory, ascending."""
    out = []
    for name in os.listdir(out_dir):
        if name.startswith("epoch=") and os.path.exists(os.path.join(out_dir, name, SUCCESS)):
            out.append(int(name.split("=", 1)[1]))
    return sorted(out)
