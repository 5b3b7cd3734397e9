"""on_error and the error types: what a bad sample or shard costs, and where it is reported."""

from __future__ import annotations

import pickle

import pytest
from torch._utils import ExceptionWrapper

import es_stream.errors as errors


def test_every_error_survives_worker_reraise_and_pickle():
    """DataLoader rebuilds a worker's exception as ``type(msg)`` (RuntimeError if that fails)."""
    made = [errors.ShardError("a.tar", "corrupt", sample=3),
            errors.SampleError("a.tar", "bad", sample=4), errors.StaleIndexError("a.tar: changed"),
            errors.ManifestError("m: unfinished"), errors.ESStreamError("es: failed"),
            errors.MissingExtraError("Reading MDS shards", "mds", "mosaicml-streaming")]
    defined = {c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, Exception)
               and c.__module__ == errors.__name__}
    assert {type(e) for e in made} == defined  # a new error class gets checked here too
    for exc in made:
        try:
            raise exc
        except Exception:
            wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
        with pytest.raises(Exception, match="in DataLoader worker process 0") as info:
            wrapped.reraise()
        assert type(info.value) is type(exc) and str(exc) in str(info.value)
        back = pickle.loads(pickle.dumps(exc))
        assert type(back) is type(exc) and str(back) == str(exc)
        assert getattr(back, "sample", None) == getattr(exc, "sample", None)
