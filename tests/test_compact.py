"""`compact` never destroys data: the output goes to a new or empty directory (or replaces an
earlier compaction output with ``overwrite``), never overlaps the source, and is renamed into
place only when complete — an error or a SIGKILL mid-write leaves the output directory as it was.

Real shards (webdataset ``TarWriter``, streaming ``MDSWriter``), real failures (a truncated
shard, a killed process), byte comparisons of everything that must survive.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from es_stream import Corpus
from es_stream.compact import MARKER, compact
from es_stream.errors import ShardError, StaleIndexError
from conftest import payload, write_wds
from test_cli import run  # the installed console script


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` (relative path -> bytes): what must survive unchanged."""
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def source_corpus(kind: str, wds_dir: Path, mds_dir: Path) -> Corpus:
    return Corpus.from_webdataset(str(wds_dir)) if kind == "wds" else Corpus.from_mds(str(mds_dir))


def reindex(directory: Path, fmt: str) -> Corpus:
    return Corpus.from_webdataset(str(directory)) if fmt == "wds" else Corpus.from_mds(str(directory))


def pruned(shards: Path, tmp_path: Path) -> tuple[Path, Path]:
    """An index of ``shards`` and a manifest keeping half of them, written in-process (what
    ``es-stream index`` and ``es-stream prune`` write, without two interpreter start-ups)."""
    import torch

    from es_stream import ESWPPolicy, Pruner, ScoreStore

    corpus = Corpus.from_mds(str(shards)) if (shards / "index.json").exists() \
        else Corpus.from_webdataset(str(shards))
    index = tmp_path / "corpus.parquet"
    corpus.save(index)
    store = ScoreStore(corpus.num_samples)
    store.scatter(torch.arange(corpus.num_samples), torch.rand(corpus.num_samples) + 0.01)
    policy = ESWPPolicy(ratio=0.5, anneal=0.0, burn_in_epochs=0, seed=0)
    Pruner(corpus, store, policy, str(tmp_path / "m")).write(0, 1)
    return index, tmp_path / "m" / "epoch=00000"


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


# --- the output directory must be new, empty, or (with overwrite) an earlier output ----------

@pytest.mark.parametrize("fmt", ["wds", "mds"])
def test_output_holding_unrelated_files_is_refused_and_they_survive(wds_dir, tmp_path, fmt):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "shard-000000.tar").write_bytes(b"not ours either")
    before = snapshot(out)
    corpus = Corpus.from_webdataset(str(wds_dir))
    with pytest.raises(FileExistsError, match=f"{out}.*not empty"):
        compact(corpus, np.arange(10), out, fmt)
    assert snapshot(out) == before
    with pytest.raises(FileExistsError, match="notes.txt.*not part of an earlier compaction"):
        compact(corpus, np.arange(10), out, fmt, overwrite=True)
    assert snapshot(out) == before and leftovers(tmp_path) == []
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty directory is fine
    compact(corpus, np.arange(10), empty, fmt)
    assert reindex(empty, fmt).num_samples == 10


def test_cli_refuses_a_non_empty_out_naming_it(wds_dir, tmp_path):
    index, manifest = pruned(wds_dir, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep-me.txt").write_text("precious")
    args = ["compact", "--corpus", str(index), "--manifest", str(manifest), "--out", str(out),
            "--format", "mds"]
    result = run(*args)
    assert result.returncode == 1 and str(out) in result.stderr and "not empty" in result.stderr
    result = run(*args, "--overwrite")
    assert result.returncode == 1 and "keep-me.txt" in result.stderr
    assert (out / "keep-me.txt").read_text() == "precious" and sorted(os.listdir(out)) == ["keep-me.txt"]
    assert "--overwrite" in run("compact", "--help").stdout


# --- never overlapping the source -------------------------------------------------------------

@pytest.mark.parametrize("source", ["wds", "mds"])
@pytest.mark.parametrize("relation", ["same", "inside", "contains", "symlink"])
def test_output_overlapping_the_source_is_refused_naming_both(wds_dir, mds_dir, tmp_path,
                                                              source, relation):
    corpus = source_corpus(source, wds_dir, mds_dir)
    src = wds_dir if source == "wds" else mds_dir
    out = {"same": src, "inside": src / "compacted", "contains": tmp_path,
           "symlink": tmp_path / "link"}[relation]
    if relation == "symlink":
        out.symlink_to(src, target_is_directory=True)
    before = snapshot(tmp_path)
    for options in ({}, {"overwrite": True}):
        with pytest.raises(ValueError) as info:
            compact(corpus, np.arange(0, 50, 2), out, source, **options)
        assert str(out) in str(info.value) and os.path.realpath(src) in str(info.value)
        assert snapshot(tmp_path) == before  # the source and everything beside it, byte for byte
    assert reindex(src, source).num_samples == 50


def test_cli_refuses_compacting_into_the_source(mds_dir, tmp_path):
    index, manifest = pruned(mds_dir, tmp_path)
    before = snapshot(mds_dir)
    result = run("compact", "--corpus", str(index), "--manifest", str(manifest),
                 "--out", str(mds_dir), "--overwrite")
    assert result.returncode == 1 and "is the source directory" in result.stderr
    assert snapshot(mds_dir) == before


def test_wds_shards_from_several_directories_each_count_as_source(tmp_path):
    paths = write_wds(tmp_path / "a", sizes=(5,)) + write_wds(tmp_path / "b", sizes=(6,), start=5)
    corpus = Corpus.from_webdataset(paths)
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=str(tmp_path / "b")):
        compact(corpus, np.arange(11), tmp_path / "b" / "out")
    assert snapshot(tmp_path) == before


def test_a_directory_of_symlinked_shards_counts_as_source(tmp_path):
    (tmp_path / "links").mkdir()
    for path in write_wds(tmp_path / "store", sizes=(4, 5)):
        (tmp_path / "links" / Path(path).name).symlink_to(path)
    corpus = Corpus.from_webdataset(str(tmp_path / "links"))
    before = snapshot(tmp_path)
    for out in (tmp_path / "links" / "out", tmp_path / "store" / "out"):
        with pytest.raises(ValueError, match="lies inside the source directory"):
            compact(corpus, np.arange(9), out)
    assert snapshot(tmp_path) == before


# --- replacing an earlier output ----------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["wds", "mds"])
def test_earlier_larger_output_is_refused_then_replaced_whole_with_overwrite(wds_dir, tmp_path, fmt):
    source = snapshot(wds_dir)
    corpus = Corpus.from_webdataset(str(wds_dir))
    out = tmp_path / "out"
    compact(corpus, np.arange(50), out, fmt, max_count=10)
    first = snapshot(out)
    kept = np.arange(0, 50, 2)
    with pytest.raises(FileExistsError, match="overwrite"):
        compact(corpus, kept, out, fmt, max_count=10)
    assert snapshot(out) == first
    mapping = compact(corpus, kept, out, fmt, max_count=10, overwrite=True)
    assert reindex(out, fmt).num_samples == len(kept)  # no stale shard of the larger output
    assert pq.read_table(mapping).column("old_id").to_pylist() == kept.tolist()
    fresh = tmp_path / "fresh"
    compact(corpus, kept, fresh, fmt, max_count=10)
    assert sorted(os.listdir(out)) == sorted(os.listdir(fresh))  # exactly what a fresh run writes
    assert leftovers(tmp_path) == [] and snapshot(wds_dir) == source


def test_overwrite_accepts_an_output_written_before_the_marker(wds_dir, tmp_path):
    """Outputs of earlier es-stream versions have no marker: only shards, index.json and
    mapping.parquet may be in them; anything more and overwrite refuses."""
    corpus = Corpus.from_webdataset(str(wds_dir))
    out = tmp_path / "out"
    compact(corpus, np.arange(50), out, "wds", max_count=10)
    (out / MARKER).unlink()
    (out / "README").write_text("about this data")
    with pytest.raises(FileExistsError, match="README"):
        compact(corpus, np.arange(5), out, "wds", overwrite=True)
    (out / "README").unlink()
    compact(corpus, np.arange(5), out, "wds", overwrite=True)
    assert reindex(out, "wds").num_samples == 5


def test_overwrite_through_a_symlinked_out_keeps_the_link(wds_dir, tmp_path):
    corpus = Corpus.from_webdataset(str(wds_dir))
    real = tmp_path / "real"
    compact(corpus, np.arange(50), real, "wds", max_count=10)
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    compact(corpus, np.arange(7), link, "wds", overwrite=True)
    assert link.is_symlink() and reindex(link, "wds").num_samples == 7


# --- failures mid-write ---------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["wds", "mds"])
@pytest.mark.parametrize("previous", [False, True])
def test_error_mid_write_leaves_the_output_as_it_was(tmp_path, fmt, previous):
    paths = write_wds(tmp_path / "src")
    corpus = Corpus.from_webdataset(paths)
    out = tmp_path / "out"
    if previous:
        compact(corpus, np.arange(30), out, fmt, max_count=5)
    before = snapshot(out) if previous else None
    with open(paths[-1], "r+b") as f:  # the last shard is cut short after indexing
        f.truncate(1024)
    with pytest.raises(StaleIndexError, match="train-000004.tar: shard changed.*size"):
        compact(corpus, np.arange(50), out, fmt, max_count=5, **({"overwrite": True} if previous else {}))
    if previous:
        assert snapshot(out) == before
    else:
        assert not out.exists()
    assert leftovers(tmp_path) == []


def test_interrupt_from_progress_leaves_no_output(wds_dir, tmp_path):
    def stop_halfway(rows, **_):
        for i, row in enumerate(rows):
            if i == 20:
                raise KeyboardInterrupt
            yield row

    with pytest.raises(KeyboardInterrupt):
        compact(Corpus.from_webdataset(str(wds_dir)), np.arange(50), tmp_path / "out",
                max_count=5, progress=stop_halfway)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


KILLED_CHILD = textwrap.dedent("""
    import sys, time
    import numpy as np
    from es_stream import Corpus
    from es_stream.compact import compact

    def pause_halfway(rows, **_):
        for i, row in enumerate(rows):
            if i == 25:
                print("halfway", flush=True)
                time.sleep(120)  # the parent SIGKILLs us here
            yield row

    src, out, fmt, overwrite = sys.argv[1:]
    options = {"overwrite": True} if overwrite == "1" else {}
    compact(Corpus.from_webdataset(src), np.arange(50), out, fmt, max_count=5,
            progress=pause_halfway, **options)
""")


@pytest.mark.parametrize("fmt,previous", [("wds", False), ("mds", True)])
def test_sigkill_mid_write_leaves_the_output_as_it_was(wds_dir, tmp_path, fmt, previous):
    corpus = Corpus.from_webdataset(str(wds_dir))
    out = tmp_path / "out"
    if previous:
        compact(corpus, np.arange(10), out, fmt)
    before = snapshot(out) if previous else None
    child = subprocess.Popen([sys.executable, "-c", KILLED_CHILD, str(wds_dir), str(out), fmt,
                              "1" if previous else "0"], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert child.stdout.readline() == "halfway\n"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    if previous:
        assert snapshot(out) == before
    else:
        assert not out.exists()
    assert len(leftovers(tmp_path)) == 1  # the killed run's hidden directory, nothing else
    with pytest.warns(UserWarning, match="interrupted compaction"):
        compact(corpus, np.arange(50), out, fmt, overwrite=previous)
    assert reindex(out, fmt).num_samples == 50


def test_non_utf8_key_to_mds_is_refused_naming_it_and_to_wds_kept(tmp_path):
    import webdataset as wds

    shard = tmp_path / "src" / "names.tar"
    shard.parent.mkdir()
    with wds.TarWriter(str(shard)) as w:  # \udce9: a latin-1 byte, as webdataset decodes it
        for key in ("plain", "caf\udce9"):
            w.write({"__key__": key, "bin": key.encode("utf-8", "surrogateescape")})
    corpus = Corpus.from_webdataset([str(shard)])
    with pytest.raises(ValueError, match=r"sample id 1's key 'caf\\udce9' .*names.tar.*not valid "
                       "UTF-8.*compact to wds"):
        compact(corpus, np.arange(2), tmp_path / "mds", "mds")
    assert not (tmp_path / "mds").exists() and leftovers(tmp_path) == []
    compact(corpus, np.arange(2), tmp_path / "wds", "wds")
    back = Corpus.from_webdataset(str(tmp_path / "wds"))
    assert [back.tar.key(i) for i in range(2)] == ["plain", "caf\udce9"]


def test_outputs_get_the_umask_mode_not_the_private_temporary_one(wds_dir, tmp_path):
    """mkstemp/mkdtemp make 0600/0700 files and directories; what atomic_write renames into place
    and compact's --out must be readable as a plain open()/mkdir() would make them."""
    import stat

    from es_stream import _atomic

    file_mode, dir_mode = 0o666 & ~_atomic._UMASK, 0o777 & ~_atomic._UMASK
    assert file_mode & 0o044, "this test needs a umask that lets others read"
    with _atomic.atomic_write(tmp_path / "f.json") as tmp:
        Path(tmp).write_text("{}")
    assert stat.S_IMODE((tmp_path / "f.json").stat().st_mode) == file_mode
    corpus = Corpus.from_webdataset(str(wds_dir))
    out = tmp_path / "compacted"
    compact(corpus, np.arange(0, corpus.num_samples, 2), out)
    assert stat.S_IMODE(out.stat().st_mode) == dir_mode
    assert stat.S_IMODE((out / "mapping.parquet").stat().st_mode) == file_mode


@pytest.mark.parametrize("fmt", ["wds", "mds"])
def test_overwrite_under_a_reader_is_stale_not_other_samples(wds_dir, tmp_path, fmt):
    """A run reads a compaction output by its index while ``compact --overwrite`` replaces the
    output with another manifest's samples (same shard names): its next epoch raises
    StaleIndexError naming a shard, and no sample of the new output arrives under an old id."""
    from es_stream import ESDataset

    corpus = Corpus.from_webdataset(str(wds_dir))
    out = tmp_path / "out"
    compact(corpus, np.arange(0, 40, 2), out, fmt, max_count=5)
    reindex(out, fmt).save(tmp_path / "out.parquet")
    reading = Corpus.load(tmp_path / "out.parquet")
    ds = ESDataset(reading, 4, decode=lambda s: s, collate=list, shuffle=False)
    first = [bytes(s["bin"]) for mb in ds for s in mb.data]
    assert first == [payload(i) for i in range(0, 40, 2)]
    compact(corpus, np.arange(1, 41, 2), out, fmt, max_count=5, overwrite=True)
    ds.set_epoch(1)
    with pytest.raises(StaleIndexError, match=r"out/shard.*shard changed since it was indexed"):
        for n, mb in enumerate(ds):  # whatever arrives before the error is the old samples
            assert [bytes(s["bin"]) for s in mb.data] == first[4 * n:4 * n + len(mb.data)]


def _typed_tar(directory: Path, bad_cls: bool = False) -> Corpus:
    import io
    import json as jsonlib

    import webdataset as wds

    directory.mkdir(parents=True)
    with wds.ShardWriter(str(directory / "t-%06d.tar"), maxcount=3, verbose=0) as w:
        for i in range(5):
            buf = io.BytesIO()
            np.save(buf, np.arange(i + 1, dtype=np.int16).reshape(1, -1))
            w.write({"__key__": f"k{i}", "npy": buf.getvalue(),
                     "cls": b"x" if bad_cls and i == 3 else str(i * 7).encode(),
                     "txt": f"caption {i} é".encode(), "json": jsonlib.dumps({"i": i}).encode(),
                     "jpg": bytes([255, 216, i]), "seg.id": str(-i).encode()})
    return Corpus.from_webdataset(str(directory))


def test_tar_to_mds_columns_are_typed_as_webdataset_decodes_them(tmp_path):
    """.cls/.id -> int, .txt -> str, .json -> json, .npy -> ndarray, others bytes, read back
    with streaming's own reader."""
    from streaming import StreamingDataset

    corpus = _typed_tar(tmp_path / "tar")
    compact(corpus, np.arange(corpus.num_samples), tmp_path / "mds", "mds")
    index = json.loads((tmp_path / "mds" / "index.json").read_text())
    shard = index["shards"][0]
    assert dict(zip(shard["column_names"], shard["column_encodings"])) == {
        "__key__": "str", "cls": "int", "jpg": "bytes", "json": "json", "npy": "ndarray",
        "seg.id": "int", "txt": "str"}
    ds = StreamingDataset(local=str(tmp_path / "mds"), shuffle=False, batch_size=1)
    for i in range(5):
        s = ds[i]
        assert s["cls"] == i * 7 and isinstance(s["cls"], int)
        assert s["seg.id"] == -i and s["txt"] == f"caption {i} é" and s["json"] == {"i": i}
        np.testing.assert_array_equal(s["npy"], np.arange(i + 1, dtype=np.int16).reshape(1, -1))
        assert s["npy"].dtype == np.int16 and s["jpg"] == bytes([255, 216, i])


def test_tar_to_mds_bytes_columns_keep_every_file_byte_identical(tmp_path):
    corpus = _typed_tar(tmp_path / "tar", bad_cls=True)
    compact(corpus, np.arange(corpus.num_samples), tmp_path / "mds", "mds", typed=False)
    index = json.loads((tmp_path / "mds" / "index.json").read_text())
    assert set(index["shards"][0]["column_encodings"]) == {"str", "bytes"}


def test_a_file_that_is_not_what_its_suffix_says_is_named(tmp_path):
    corpus = _typed_tar(tmp_path / "tar", bad_cls=True)
    with pytest.raises(ValueError, match=r"sample id 3's key 'k3'.*file \.cls.*--bytes-columns"):
        compact(corpus, np.arange(corpus.num_samples), tmp_path / "mds", "mds")
    assert not (tmp_path / "mds").exists() and leftovers(tmp_path) == []
