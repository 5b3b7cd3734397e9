"""ESStreamingDataset's ranks agree or stop: 2 real gloo processes over real MDS shards compare
their datasets at the start of an epoch; different shuffle seeds (which would give the ranks
overlapping samples) raise on both, naming the field and both values."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("streaming")

from test_agreement import free_port  # noqa: E402
from test_streaming_dataset import write_corpus  # noqa: E402

HERE = Path(__file__).parent


def two_ranks(local: Path, tmp: Path, seeds: str, tries: int = 3) -> list[dict]:
    """Both ranks' records. Streaming's shared-memory setup races with other jobs on the same
    machine (each rank reads /dev/shm to pick its prefix): a run in which a rank could not build
    its dataset is started again, up to ``tries`` times."""
    for _ in range(tries):
        records = _run_two_ranks(local, tmp, seeds)
        if not any("setup_failed" in r for r in records):
            return records
    pytest.fail(f"streaming could not set up 2 ranks in {tries} tries: {records}")


def _run_two_ranks(local: Path, tmp: Path, seeds: str) -> list[dict]:
    for stale in tmp.glob("agree*.json"):
        stale.unlink()
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2",
               LOCAL_WORLD_SIZE="2", OMP_NUM_THREADS="1")
    procs = []
    for rank in range(2):
        out = tmp / f"agree{rank}.json"
        procs.append((out, subprocess.Popen(
            [sys.executable, str(HERE / "_dist_stream_agree.py"), str(local), str(out), seeds],
            env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)))))
    codes = [p.wait(timeout=240) for _, p in procs]
    records = [json.loads(out.read_text()) if out.exists() else {"setup_failed": "no record"}
               for out, _ in procs]
    if not any("setup_failed" in r for r in records):
        assert codes == [0, 0], f"a rank failed: exit codes {codes}, records {records}"
    return records


def test_different_shuffle_seeds_raise_on_both_ranks(tmp_path: Path):
    local = write_corpus(tmp_path / "mds")
    for record in two_ranks(local, tmp_path, "5,6"):
        assert not record["ok"] and record["type"] == "RankMismatchError", record
        assert record["message"].startswith("ranks disagree on shuffle_seed at the start of "
                                            "epoch 0: rank 0 has 5, rank 1 has 6"), record


def test_agreeing_ranks_pass(tmp_path: Path):
    local = write_corpus(tmp_path / "mds")
    assert [r["ok"] for r in two_ranks(local, tmp_path, "5,5")] == [True, True]
