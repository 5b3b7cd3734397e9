"""The es-stream command line, run as the installed console script."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from es_stream import Corpus

EXE = shutil.which("es-stream", path=str(Path(sys.executable).parent))


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([EXE, *args], capture_output=True, text=True)


def test_index_wds_directory_and_load_back(wds_dir, tmp_path):
    out = tmp_path / "corpus.parquet"
    result = run("index", str(wds_dir), "-o", str(out))
    assert result.returncode == 0, result.stderr
    corpus = Corpus.load(out)
    assert f"indexed {corpus.num_samples} samples in 5 wds shards" in result.stdout
    assert corpus.fingerprint == Corpus.from_webdataset(str(wds_dir)).fingerprint


def test_index_mds_and_pipe_urls(wds_dir, mds_dir, tmp_path):
    assert run("index", str(mds_dir), "-o", str(tmp_path / "m.parquet")).returncode == 0
    assert Corpus.load(tmp_path / "m.parquet").format == "mds"
    urls = [f"pipe:cat {p}" for p in sorted(wds_dir.glob("*.tar"))]
    assert run("index", *urls, "-o", str(tmp_path / "p.parquet")).returncode == 0
    assert Corpus.load(tmp_path / "p.parquet").num_samples == 50


def test_index_error_names_the_file(tmp_path):
    result = run("index", str(tmp_path / "nope-{0..1}.tar"), "-o", str(tmp_path / "x.parquet"))
    assert result.returncode == 2
    assert "nope-0.tar" in result.stderr and "no such shard" in result.stderr
    assert not (tmp_path / "x.parquet").exists()


def test_help():
    result = run("index", "--help")
    assert result.returncode == 0 and "Parquet" in result.stdout
