"""Exact resume: a run killed with SIGKILL at an arbitrary step and restarted from its last
checkpoint selects exactly the same ids for the rest of the run and ends with bit-identical
scores and manifests, compared with a run that never stopped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from es_stream import Corpus
from conftest import write_clusters

HERE = Path(__file__).parent
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def run(corpus: Path, out: Path, log: str, kill_at: int | None = None) -> int:
    cmd = [sys.executable, str(HERE / "_resume_run.py"), str(corpus), str(out), log]
    if kill_at is not None:
        cmd.append(str(kill_at))
    return subprocess.run(cmd, env=ENV, timeout=180).returncode


def steps(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The corpus (200 samples, 4 classes, "npy": float[8]) and an uninterrupted run."""
    root = tmp_path_factory.mktemp("resume")
    write_clusters(root / "data")
    Corpus.from_webdataset(str(root / "data")).save(root / "corpus.parquet")
    assert run(root / "corpus.parquet", root / "ref", "steps.jsonl") == 0
    return root


def manifest_bytes(out: Path) -> dict[str, bytes]:
    base = out / "manifests"
    return {str(p.relative_to(base)): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()}


# 7: mid-epoch 0 (checkpoint at 5); 12: the last step of epoch 0, before its pruning decision
# (checkpoint at 10); 23: mid-epoch 2, a pruned epoch, resumed from the end of epoch 1 (step 20)
@pytest.mark.parametrize("kill_at", [7, 12, 23])
def test_killed_run_resumes_exactly(reference, tmp_path, kill_at):
    ref = steps(reference / "ref" / "steps.jsonl")
    assert len(ref) == 12 + 8 + 8 + 12  # drop_last; epochs 1 and 2 keep ceil(0.7 * 200)
    assert run(reference / "corpus.parquet", tmp_path, "first.jsonl", kill_at) == -9
    assert len(steps(tmp_path / "first.jsonl")) == kill_at
    assert run(reference / "corpus.parquet", tmp_path, "resumed.jsonl") == 0
    resumed = steps(tmp_path / "resumed.jsonl")
    checkpoint = kill_at // 5 * 5
    assert resumed[0]["step"] == checkpoint + 1  # it went back to the last checkpoint
    assert resumed == ref[checkpoint:]  # and selected exactly the same ids from there on
    assert (tmp_path / "final-scores.npy").read_bytes() == \
        (reference / "ref" / "final-scores.npy").read_bytes()
    assert manifest_bytes(tmp_path) == manifest_bytes(reference / "ref")
