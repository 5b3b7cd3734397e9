"""Ranks agree or stop: 2 real gloo processes compare their datasets at the start of an epoch;
a difference raises on both, naming the field and both values, instead of duplicating samples
or hanging."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from es_stream import Corpus
from es_stream.agreement import check_ranks_agree, digest

HERE = Path(__file__).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_ranks(corpus_path: Path, tmp: Path, seeds: str, sizes: str, via: str = "check"
              ) -> list[dict]:
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2",
               OMP_NUM_THREADS="1")
    procs = []
    for rank in range(2):
        out = tmp / f"agree{rank}.json"
        procs.append((out, subprocess.Popen(
            [sys.executable, str(HERE / "_dist_agree.py"), str(corpus_path), str(out), seeds, sizes, via],
            env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)))))
    for _, p in procs:
        assert p.wait(timeout=240) == 0, "a rank failed or hung"
    return [json.loads(out.read_text()) for out, _ in procs]


@pytest.fixture
def corpus_path(wds_dir, tmp_path) -> Path:
    Corpus.from_webdataset(str(wds_dir)).save(tmp_path / "corpus.parquet")
    return tmp_path / "corpus.parquet"


def test_different_seeds_raise_on_both_ranks_naming_seed(corpus_path, tmp_path):
    records = two_ranks(corpus_path, tmp_path, seeds="7,8", sizes="4,4")
    for record in records:
        assert not record["ok"] and record["type"] == "RankMismatchError", record
        assert record["message"].startswith("ranks disagree on seed at the start of epoch 0: "
                                            "rank 0 has 7, rank 1 has 8"), record["message"]


def test_different_meta_batch_sizes_raise_instead_of_hanging(corpus_path, tmp_path):
    records = two_ranks(corpus_path, tmp_path, seeds="7,7", sizes="4,5")
    for record in records:
        assert "ranks disagree on meta_batch_size" in record.get("message", ""), record
        assert "rank 0 has 4, rank 1 has 5" in record["message"]


def test_equal_ranks_pass(corpus_path, tmp_path):
    assert [r["ok"] for r in two_ranks(corpus_path, tmp_path, seeds="7,7", sizes="4,4")] == [True, True]


def test_without_a_process_group_nothing_is_checked():
    check_ranks_agree({"seed": 1})  # one process: nothing to compare with, no error
    assert digest([1, "a"]) == digest([1, "a"]) != digest([1, "b"])


def test_set_epoch_checks_the_ranks_different_seeds_raise_on_both(corpus_path, tmp_path):
    """The check runs inside ESDataset.set_epoch: no call of the user's is needed."""
    records = two_ranks(corpus_path, tmp_path, seeds="7,8", sizes="4,4", via="set_epoch")
    for record in records:
        assert not record["ok"] and record["type"] == "RankMismatchError", record
        assert record["message"].startswith("ranks disagree on seed at the start of epoch 0: "
                                            "rank 0 has 7, rank 1 has 8"), record["message"]


def test_set_epoch_with_agreeing_ranks_reads_disjoint_samples(corpus_path, tmp_path):
    records = two_ranks(corpus_path, tmp_path, seeds="7,7", sizes="4,4", via="set_epoch")
    assert [r["ok"] for r in records] == [True, True], records
    ids0, ids1 = set(records[0]["ids"]), set(records[1]["ids"])
    assert ids0 and ids1 and not ids0 & ids1
