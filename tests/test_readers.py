"""Shard readers: one per format in READERS, each a ShardReader, reading the same samples one by
one and a meta-batch at once."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from conftest import payload
from es_stream import Corpus
from es_stream.sources import READERS, ShardReader, open_reader


def test_every_reader_has_the_protocol_signatures():
    assert set(READERS) == {"wds", "mds"}
    for name in ("read", "read_batch", "close"):
        wanted = inspect.signature(getattr(ShardReader, name))
        for cls in READERS.values():
            assert inspect.signature(getattr(cls, name)).parameters.keys() == \
                wanted.parameters.keys(), (cls.__name__, name)


@pytest.mark.parametrize("kind", ["wds", "mds"])
def test_open_reader_reads_by_format(kind, wds_dir, mds_dir):
    if kind == "mds":
        pytest.importorskip("streaming")
    corpus = Corpus.from_webdataset(str(wds_dir)) if kind == "wds" else Corpus.from_mds(mds_dir)
    reader = open_reader(corpus)
    try:
        assert isinstance(reader, ShardReader) and isinstance(reader, READERS[kind])
        ids = np.array([3, 0, 20, 21], dtype=np.int64)
        shards, positions = corpus.locate(ids)
        batch = reader.read_batch(ids, shards)
        one_by_one = [reader.read(s, p, i) for s, p, i in
                      zip(shards.tolist(), positions.tolist(), ids.tolist())]
        for i, early, alone in zip(ids.tolist(), batch, one_by_one):
            assert early is None or early == alone  # None: left to read()
            assert alone["bin"] == payload(i)
    finally:
        reader.close()


def test_open_reader_refuses_an_unknown_format(wds_dir):
    corpus = Corpus.from_webdataset(str(wds_dir))
    corpus.format = "zip"
    with pytest.raises(ValueError, match="no shard reader for format 'zip'"):
        open_reader(corpus)
