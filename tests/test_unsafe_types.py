"""No code from data by default: ESDataset's default decoding never unpickles a tar member, and
MDS ``pkl`` columns are refused by ESDataset and compact, each unless ``allow_unsafe_types=True``.

The pickles here, when loaded, create a marker file (``open(path, "w")`` through
``__reduce__``): the marker's absence is what shows no code ran."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from es_stream import Corpus, ESDataset, SampleError
from es_stream.compact import compact


class OpensAFile:
    """Unpickling this runs ``open(path, "w")``: code chosen by whoever wrote the pickle."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def write_tar(directory: Path, members: dict[str, bytes], n: int = 4) -> Corpus:
    directory.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(directory / "s-000000.tar")) as w:
        for i in range(n):
            w.write({"__key__": f"k{i}", "cls": i, **members})
    return Corpus.from_webdataset(str(directory))


def read(corpus: Corpus, **kwargs) -> list[dict]:
    return [s for mb in ESDataset(corpus, 4, collate=list, shuffle=False, **kwargs) for s in mb.data]


@pytest.mark.parametrize("suffix", ["pyd", "pickle", "pkl"])
def test_tar_pickle_members_are_refused_by_default_naming_the_opt_in(tmp_path, suffix):
    marker = tmp_path / "ran"
    corpus = write_tar(tmp_path / "tar", {suffix: pickle.dumps(OpensAFile(marker))})
    with pytest.raises(SampleError, match="allow_unsafe_types=True"):
        read(corpus)
    assert not marker.exists()  # nothing was unpickled
    samples = read(corpus, allow_unsafe_types=True)
    assert marker.exists() and len(samples) == 4  # the opt-in does unpickle
    for s in samples:
        s[suffix].close()


def test_skip_loses_only_the_pickled_samples_with_a_warning(tmp_path):
    marker = tmp_path / "ran"
    corpus = write_tar(tmp_path / "tar", {"pyd": pickle.dumps(OpensAFile(marker))}, n=2)
    with pytest.warns(RuntimeWarning, match="allow_unsafe_types"):
        mbs = list(ESDataset(corpus, 4, collate=list, shuffle=False, on_error="skip"))
    assert sorted(mbs[0].lost_ids.tolist()) == [0, 1] and not marker.exists()


def test_pth_tensors_load_safely_and_code_in_a_pth_is_refused(tmp_path):
    buf = io.BytesIO()
    torch.save({"w": torch.arange(3)}, buf)
    samples = read(write_tar(tmp_path / "ok", {"pth": buf.getvalue()}))
    assert torch.equal(samples[0]["pth"]["w"], torch.arange(3))
    marker = tmp_path / "ran"
    buf = io.BytesIO()
    torch.save(OpensAFile(marker), buf)
    corpus = write_tar(tmp_path / "bad", {"pth": buf.getvalue()})
    with pytest.raises(SampleError, match="allow_unsafe_types=True"):
        read(corpus)
    assert not marker.exists()


def test_a_decode_handler_of_ones_own_still_decides(tmp_path):
    corpus = write_tar(tmp_path / "tar", {"pyd": b"not a pickle at all"})

    def mine(key, data):
        return data.decode() if key.endswith(".pyd") else None

    assert read(corpus, decode=[mine])[0]["pyd"] == "not a pickle at all"


def write_pkl_mds(directory: Path, marker: Path | None = None) -> Corpus:
    from streaming import MDSWriter

    with MDSWriter(out=str(directory), columns={"obj": "pkl", "idx": "int"}) as w:
        for i in range(6):
            w.write({"obj": OpensAFile(marker) if marker and i == 0 else {"i": i}, "idx": i})
    return Corpus.from_mds(directory)


def test_mds_pkl_columns_are_refused_unless_allowed(tmp_path):
    pytest.importorskip("streaming")
    corpus = write_pkl_mds(tmp_path / "mds")
    with pytest.raises(ValueError, match=r"'obj'.*allow_unsafe_types=True"):
        ESDataset(corpus, 3)
    samples = [s for mb in ESDataset(corpus, 3, collate=list, shuffle=False,
                                     allow_unsafe_types=True) for s in mb.data]
    assert [s["obj"] for s in samples] == [{"i": i} for i in range(6)]


def test_compact_refuses_mds_pkl_columns_unless_allowed(tmp_path):
    pytest.importorskip("streaming")
    marker = tmp_path / "ran"
    corpus = write_pkl_mds(tmp_path / "mds", marker)
    with pytest.raises(ValueError, match=r"compact\(\.\.\., allow_unsafe_types=True\)"):
        compact(corpus, list(range(6)), tmp_path / "out")
    assert not marker.exists() and not (tmp_path / "out").exists()
    compact(corpus, [1, 2], tmp_path / "out2", allow_unsafe_types=True)
    assert [int(v) for v in read_idx(tmp_path / "out2")] == [1, 2]


def read_idx(directory: Path) -> list[int]:
    corpus = Corpus.from_mds(directory)
    return [s["idx"] for mb in ESDataset(corpus, 2, collate=list, shuffle=False,
                                         allow_unsafe_types=True) for s in mb.data]


class _Marker:
    """Unpickling this writes a file: the proof that loading ran code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_score_store_holding_a_pickle_is_refused_without_running_it(tmp_path):
    from es_stream import ScoreStore
    from es_stream.errors import ScoreError

    marker = tmp_path / "ran"
    path = tmp_path / "scores.npy"
    np.save(path, np.array([_Marker(marker), 1.0], dtype=object), allow_pickle=True)
    with pytest.raises((ScoreError, ValueError), match=str(path.name)):
        ScoreStore.load(path)
    with pytest.raises((ScoreError, ValueError), match=str(path.name)):
        ScoreStore.open(path, 2)
    assert not marker.exists()
