"""Rewrite a corpus with only the samples a manifest keeps, payloads byte for byte, through
webdataset's ``ShardWriter`` or streaming's ``MDSWriter``; plus ``mapping.parquet`` (old id ->
new id)."""

from __future__ import annotations

import os
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ._atomic import atomic_write
from .corpus import Corpus
from .sources import open_reader


def compact(corpus: Corpus, kept_ids: np.ndarray, out_dir: str | os.PathLike, fmt: str | None = None,
            max_count: int = 10_000, progress: Iterable | None = None) -> str:
    """Write the kept samples (in id order) to ``out_dir`` as ``fmt`` (default: the corpus's
    own format). Returns the path of ``mapping.parquet``.

    Tar to tar and MDS to MDS keep every payload byte-identical; tar to MDS stores each file
    suffix as a ``bytes`` column (plus ``__key__``). MDS to tar is refused: MDS columns are typed
    values, and re-encoding them as files would not be byte-identical.
    """
    fmt = fmt or corpus.format
    if fmt not in ("wds", "mds"):
        raise ValueError(f"format must be 'wds' or 'mds', got {fmt!r}")
    if corpus.format == "mds" and fmt == "wds":
        raise ValueError("compacting an MDS corpus to WebDataset is not supported: MDS columns are "
                         "typed values, not files; use --format mds")
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    kept_ids = corpus.check_ids(kept_ids, "kept ids")
    shards, positions = corpus.locate(kept_ids)
    reader = open_reader(corpus)
    rows = zip(kept_ids.tolist(), shards.tolist(), positions.tolist())
    if progress is not None:
        rows = progress(rows, total=len(kept_ids), desc="compact", unit="sample")
    try:
        if fmt == "wds":
            _write_wds(reader, rows, out_dir, max_count)
        else:
            _write_mds(corpus, reader, rows, out_dir)
    finally:
        reader.close()
    mapping = os.path.join(out_dir, "mapping.parquet")
    with atomic_write(mapping) as tmp:
        pq.write_table(pa.table({"old_id": pa.array(kept_ids),
                                 "new_id": pa.array(np.arange(len(kept_ids), dtype=np.int64))}), tmp)
    return mapping


def _write_wds(reader, rows, out_dir: str, max_count: int) -> None:
    import webdataset as wds

    with wds.ShardWriter(os.path.join(out_dir, "shard-%06d.tar"), maxcount=max_count, verbose=0) as w:
        for sid, shard, pos in rows:
            sample = reader.read(shard, pos, sid)
            sample.pop("__url__", None)
            w.write(sample)  # bytes values are written as they are


def _write_mds(corpus: Corpus, reader, rows, out_dir: str) -> None:
    from streaming import MDSWriter

    if corpus.format == "mds":
        first = corpus.mds.index["shards"][0]
        columns = dict(zip(first["column_names"], first["column_encodings"]))
        with MDSWriter(out=out_dir, columns=columns, exist_ok=True) as w:
            for sid, shard, pos in rows:
                w.write(reader.read(shard, pos, sid))
        return
    columns = {"__key__": "str", **{s: "bytes" for s in corpus.tar.suffixes}}
    with MDSWriter(out=out_dir, columns=columns, exist_ok=True) as w:
        for sid, shard, pos in rows:
            sample = reader.read(shard, pos, sid)
            sample.pop("__url__", None)
            missing = set(columns) - set(sample)
            if missing:
                raise ValueError(f"sample id {sid} ({sample['__key__']}) lacks {sorted(missing)}: "
                                 "MDS needs every column in every sample; compact to wds instead")
            w.write(sample)
