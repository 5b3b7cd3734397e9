"""`es-stream dedup` resumes after a crash: a real run (a subprocess) that fails on a corrupt
shard midway leaves the shards it read saved; the rerun, once the shard is repaired, reads only
the rest and writes manifests byte-identical to an uninterrupted run's. Saved parts are keyed by
the corpus and the settings, so nothing of another configuration is mixed in."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from es_stream.dedup import DedupConfig, corpus_dedup
from es_stream.dedup_parts import PartStore
from pipelines.webtext import build

SEQ = 128


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    data = build(tmp_path_factory.mktemp("web"), max_bytes=400_000, min_bytes=0, seq_len=SEQ,
                 shard_sequences=300, heldout_per_kind=8, log=lambda *_: None)
    assert data.corpus.num_shards >= 6  # enough shards to stop midway
    return data


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "es_stream.cli", *args], capture_output=True,
                          text=True, timeout=300)


def dedup(index: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_cli("dedup", "--corpus", index, "--manifests", str(out), "--near",
                   "--workers", "1", *extra)


def garble(path: str, what: bytes | None = None) -> bytes:
    """Overwrite the middle of ``path`` (size and mtime kept, as a bad disk or a torn copy
    would leave it), or put ``what`` back; returns the bytes it had."""
    st = os.stat(path)
    with open(path, "rb") as f:
        old = f.read()
    new = what if what is not None else (old[:512] + os.urandom(len(old) - 1024) + old[-512:])
    with open(path, "wb") as f:
        f.write(new)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    return old


def epoch_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "epoch=00000").iterdir())}


def test_a_run_that_crashed_midway_resumes_and_writes_the_same_manifests(web, tmp_path):
    data = web
    corpus = data.corpus
    index = str(data.directory / f"train-k{data.train_shards}.parquet")
    one = dedup(index, tmp_path / "one")  # uninterrupted
    assert one.returncode == 0, one.stderr
    assert not (tmp_path / "one" / "_dedup_parts").exists()  # removed once the manifests are in

    last = corpus.num_shards - 1
    shard_path = corpus.local_path(last)
    original = garble(shard_path)
    try:
        crashed = dedup(index, tmp_path / "two")
    finally:
        garble(shard_path, original)  # the shard repaired, as it was indexed
    assert crashed.returncode == 1 and crashed.stderr, crashed.stdout
    assert not (tmp_path / "two" / "epoch=00000").exists()  # no decision from a partial read
    (key,) = (tmp_path / "two" / "_dedup_parts").iterdir()
    saved = sorted(p.name for p in key.iterdir())
    assert not [n for n in saved if n.endswith(".tmp")]  # atomic: whole files only
    done = {int(n.split("-")[1]) for n in saved}
    assert done and last not in done and len(saved) == 2 * len(done)  # digests + signatures

    # the rerun must not read the saved shards: garble one of them, and it still succeeds
    first = corpus.local_path(min(done))
    before = garble(first)
    try:
        resumed = dedup(index, tmp_path / "two")
    finally:
        garble(first, before)
    assert resumed.returncode == 0, resumed.stderr
    assert epoch_files(tmp_path / "two") == epoch_files(tmp_path / "one")  # byte for byte
    assert not (tmp_path / "two" / "_dedup_parts").exists()


def test_a_run_killed_midway_resumes_from_what_it_saved(web, tmp_path):
    """A real SIGKILL, at a point chosen by the samples read (no race): the process kills itself
    from dedup's progress callback once half of the corpus is read, so some shards are saved
    and the rest are not; `es-stream dedup` then resumes into the same manifests."""
    import signal

    data = web
    corpus = data.corpus
    index = str(data.directory / f"train-k{data.train_shards}.parquet")
    parts = tmp_path / "two" / "_dedup_parts"
    code = (
        "import os, signal\n"
        "from es_stream import Corpus\n"
        "from es_stream.dedup import DedupConfig, corpus_dedup\n"
        f"corpus = Corpus.load({index!r})\n"
        "read = [0]\n"
        "def progress(n):\n"
        "    read[0] += n\n"
        "    if read[0] >= corpus.num_samples // 2:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "corpus_dedup(corpus, DedupConfig(near=True), num_workers=0, meta_batch_size=64,\n"
        f"             progress=progress, parts_dir={str(parts)!r})\n")
    killed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    (key,) = parts.iterdir()
    done = {int(p.name.split("-")[1]) for p in key.glob("*.digests.npy")}
    assert 0 < len(done) < corpus.num_shards
    assert not list(key.glob(".*"))  # no temporary file survives the kill
    first = corpus.local_path(min(done))
    before = garble(first)  # a saved shard: the rerun must not read it
    try:
        resumed = dedup(index, tmp_path / "two")
    finally:
        garble(first, before)
    assert resumed.returncode == 0, resumed.stderr
    one = dedup(index, tmp_path / "one")
    assert one.returncode == 0, one.stderr
    assert epoch_files(tmp_path / "two") == epoch_files(tmp_path / "one")
    assert not parts.exists()


def test_parts_are_keyed_by_corpus_and_settings_and_a_foreign_file_is_read_again(web, tmp_path):
    corpus = web.corpus
    near = DedupConfig(near=True)
    base = PartStore(corpus, tmp_path, None, True, near.hasher().describe(), near.num_perm)
    other = DedupConfig(near=True, shingle=4)
    keys = {base.directory,
            PartStore(corpus, tmp_path, "bin", True, near.hasher().describe(), 128).directory,
            PartStore(corpus, tmp_path, None, True, other.hasher().describe(), 128).directory,
            PartStore(corpus, tmp_path, None, False, {}, 128).directory}
    assert len(keys) == 4  # field, shingle, near: each another key
    # a threshold acts after the parts: the same key, parts reused
    assert PartStore(corpus, tmp_path, None, True, DedupConfig(near=True, threshold=0.5)
                     .hasher().describe(), 128).directory == base.directory

    expected = corpus_dedup(corpus, near, num_workers=0)
    got = corpus_dedup(corpus, near, num_workers=0, parts_dir=tmp_path)
    assert (got.keep == expected.keep).all() and (got.duplicate_of == expected.duplicate_of).all()
    # every shard saved; a file of the wrong shape (not ours) is ignored and its shard re-read
    assert all(base.load(s) is not None for s in range(corpus.num_shards))
    n0 = int(corpus.shard_counts[0])
    path = next(Path(base.directory).glob("shard-000000-*.digests.npy"))
    np.save(path, np.zeros((n0 + 1, 2), np.uint64))
    assert base.load(0) is None
    again = corpus_dedup(corpus, near, num_workers=0, parts_dir=tmp_path)
    assert (again.reason == expected.reason).all()
    assert base.load(0) is not None  # saved again, right this time
    shutil.rmtree(tmp_path / "unrelated", ignore_errors=True)
    (tmp_path / "unrelated").mkdir()
    base.remove()
    assert not Path(base.directory).exists() and (tmp_path / "unrelated").is_dir()
