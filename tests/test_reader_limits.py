"""Readers bounded by what the index declares, not by what the input claims, and every OS error
of a shard named and under the error policy: a compressed MDS shard decompressed no further than
its declared raw size (memory and disk), any number of shards read under a low open-file limit,
an unreadable MDS shard skipped under on_error="skip". Real MDSWriter datasets, real subprocesses
with real resource limits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from es_stream import Corpus, ESDataset, ShardError

from conftest import write_mds

EXPAND = 512 << 20  # what the bomb expands to


def gzip_bomb(path: Path) -> None:
    """A gzip file of EXPAND zero bytes, compressed in chunks (about 500 KiB on disk)."""
    zero = bytes(1 << 20)
    c = zlib.compressobj(1, zlib.DEFLATED, 31)
    with open(path, "wb") as f:
        for _ in range(EXPAND >> 20):
            f.write(c.compress(zero))
        f.write(c.flush())


def zstd_bomb(path: Path) -> None:
    """A zstd frame declaring EXPAND bytes, made of run-length blocks of 128 KiB of zeros:
    16 KiB on disk, as a hostile file is built (no encoder run)."""
    block = 128 << 10
    count = EXPAND // block
    frame = bytearray((0xFD2FB528).to_bytes(4, "little"))
    frame.append(0xE0)  # 8-byte content size, single segment, no checksum, no dictionary
    frame += EXPAND.to_bytes(8, "little")
    for i in range(count):
        header = (block << 3) | (1 << 1) | (1 if i == count - 1 else 0)  # an RLE block
        frame += header.to_bytes(3, "little") + b"\0"
    path.write_bytes(bytes(frame))


@pytest.mark.parametrize("compression,bomb", [("gz", gzip_bomb), ("zstd", zstd_bomb)])
def test_decompression_bounded_by_declared_size(tmp_path, compression, bomb):
    from streaming import MDSWriter

    out = tmp_path / "mds"
    with MDSWriter(out=str(out), columns={"bin": "bytes", "idx": "int"},
                   compression=compression) as w:
        for i in range(20):
            w.write({"bin": bytes([i]) * 100, "idx": i})
    index = json.loads((out / "index.json").read_text())
    zipped = out / index["shards"][0]["zip_data"]["basename"]
    bomb(zipped)
    index["shards"][0]["zip_data"]["bytes"] = zipped.stat().st_size  # as a hostile one declares
    (out / "index.json").write_text(json.dumps(index))
    before = sorted(os.listdir(out))
    Corpus.from_mds(out).save(tmp_path / "idx.parquet")
    script = textwrap.dedent(f"""
        import resource, sys
        from es_stream import Corpus, ESDataset, ShardError
        ds = ESDataset(Corpus.load({str(tmp_path / "idx.parquet")!r}), 4)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            list(ds)
        except ShardError as exc:
            print(exc, file=sys.stderr)
        else:
            sys.exit("no error")
        grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
        print(grew // 1024)  # MiB
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert str(zipped) in proc.stderr and "more than the" in proc.stderr
    assert f"{index['shards'][0]['raw_data']['bytes']} bytes index.json declares" in proc.stderr
    assert int(proc.stdout.split()[-1]) < 128, "memory grew by the expanded size"
    lock = f".{index['shards'][0]['raw_data']['basename']}.es-stream-lock"
    assert sorted(os.listdir(out)) == sorted(before + [lock])  # no output, partial or whole


def test_compressed_shard_still_reads(tmp_path):
    """The bounded decompression gives what MDSWriter wrote, for each compression streaming
    knows."""
    from streaming import MDSWriter

    for compression in ("gz", "bz2", "br", "snappy", "zstd:7"):
        out = tmp_path / compression.replace(":", "-")
        with MDSWriter(out=str(out), columns={"bin": "bytes", "idx": "int"},
                       compression=compression, size_limit=4 << 10) as w:
            for i in range(60):
                w.write({"bin": np.random.default_rng(i).bytes(200 + i), "idx": i})
        got = {int(i): b for mb in ESDataset(Corpus.from_mds(out), 8, decode=lambda s: s,
                                             collate=list)
               for i, b in zip(mb.ids.tolist(), [s["bin"] for s in mb.data])}
        assert got == {i: np.random.default_rng(i).bytes(200 + i) for i in range(60)}, compression


SHARDS = 2000


def read_under_fd_limit(index: Path) -> subprocess.CompletedProcess:
    """Read one whole shuffled epoch of ``index`` in a process limited to 256 open files."""
    script = textwrap.dedent(f"""
        import resource
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
        import torch
        from es_stream import Corpus, ESDataset
        ds = ESDataset(Corpus.load({str(index)!r}), 64, decode=lambda s: s, collate=list)
        ids = torch.cat([mb.ids for mb in ds]).tolist()
        assert sorted(ids) == list(range({SHARDS})), len(ids)  # one sample a shard
        print("ok")
    """)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=600)


def test_many_tar_shards_under_a_low_open_file_limit(tmp_path):
    directory = tmp_path / "wds"
    with wds.ShardWriter(str(directory / "s-%06d.tar") if directory.mkdir() is None else "",
                         maxcount=1, verbose=0) as w:
        for i in range(SHARDS):
            w.write({"__key__": f"k{i:06d}", "bin": b"%06d" % i})
    Corpus.from_webdataset(str(directory)).save(tmp_path / "idx.parquet")
    proc = read_under_fd_limit(tmp_path / "idx.parquet")
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_many_mds_shards_under_a_low_open_file_limit(tmp_path):
    from streaming import MDSWriter

    out = tmp_path / "mds"
    with MDSWriter(out=str(out), columns={"idx": "int"}, size_limit=40) as w:
        for i in range(SHARDS):
            w.write({"idx": i})
    assert len(json.loads((out / "index.json").read_text())["shards"]) >= SHARDS
    Corpus.from_mds(out).save(tmp_path / "idx.parquet")
    proc = read_under_fd_limit(tmp_path / "idx.parquet")
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


@pytest.mark.parametrize("on_error", ["skip", "raise"])
def test_unreadable_mds_shard_goes_through_on_error(tmp_path, on_error):
    """A shard path that cannot be read as a file (here: a directory now stands there; as root,
    permissions would not stop the read) is a ShardError naming it: skipped and reported under
    on_error="skip", raised under "raise"."""
    out = write_mds(tmp_path / "mds")
    corpus = Corpus.from_mds(out)
    ds = ESDataset(corpus, 8, on_error=on_error, shuffle=False)
    victim = out / corpus.shards[2].name
    victim.unlink()
    victim.mkdir()  # after the dataset was made: its shard check has passed
    first, stop = int(corpus.shard_starts[2]), int(corpus.shard_starts[3])
    if on_error == "raise":
        with pytest.raises(ShardError, match=f"{victim}: cannot read the shard"):
            list(ds)
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(ds)
    lost = torch.cat([mb.lost_ids for mb in batches]).tolist()
    got = torch.cat([mb.ids for mb in batches]).tolist()
    assert lost == list(range(first, stop))
    assert sorted(got + lost) == list(range(corpus.num_samples))
    assert any(str(victim) in str(w.message) and "Is a directory" in str(w.message)
               for w in caught)
