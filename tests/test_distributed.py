"""Exactly-once coverage across real torch.distributed ranks (gloo) x DataLoader workers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from es_stream import Corpus

HERE = Path(__file__).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(corpus_path: Path, world: int, b: int, workers: int, epochs: int, tmp: Path,
              manifests: Path | None = None) -> list[dict]:
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    procs = []
    for rank in range(world):
        out = tmp / f"rank{rank}.json"
        procs.append((out, subprocess.Popen(
            [sys.executable, str(HERE / "_dist_rank.py"), str(corpus_path), str(b), str(workers),
             str(epochs), str(out)] + ([str(manifests)] if manifests else []),
            env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)))))
    for _, p in procs:
        assert p.wait(timeout=240) == 0, "a rank failed or hung (unequal step counts?)"
    return [json.loads(out.read_text()) for out, _ in procs]


@pytest.mark.parametrize("kind", ["wds", "mds"])
@pytest.mark.parametrize("workers", [0, 2, 3])
def test_two_ranks_exactly_once(kind, workers, wds_dir, mds_dir, tmp_path):
    corpus = Corpus.from_webdataset(str(wds_dir)) if kind == "wds" else Corpus.from_mds(mds_dir)
    corpus.save(tmp_path / "corpus.parquet")
    records = run_ranks(tmp_path / "corpus.parquet", world=2, b=4, workers=workers, epochs=2,
                        tmp=tmp_path)
    for epoch in range(2):
        per_rank = [r["epochs"][epoch] for r in records]
        assert len(per_rank[0]) == len(per_rank[1])  # equal steps
        ids = [i for batches in per_rank for batch in batches for i in batch]
        assert sorted(ids) == list(range(corpus.num_samples))  # none lost, none twice
    assert records[0]["epochs"][0] != records[0]["epochs"][1]  # epochs reshuffle


def test_two_ranks_pruned_epoch_kept_exactly_once(wds_dir, tmp_path):
    import numpy as np
    import pyarrow.dataset as pads
    import torch

    from es_stream import ESWPPolicy, Pruner, ScoreStore

    corpus = Corpus.from_webdataset(str(wds_dir))
    corpus.save(tmp_path / "corpus.parquet")
    store = ScoreStore(corpus.num_samples)
    store.scatter(torch.arange(50), torch.rand(50, generator=torch.Generator().manual_seed(0)))
    Pruner(corpus, store, ESWPPolicy(ratio=0.3, burn_in_epochs=0, anneal=0.0),
           tmp_path / "m").on_epoch_end(0, 4)
    table = pads.dataset(str(tmp_path / "m" / "epoch=00001")).to_table()
    kept = sorted(np.asarray(table.column("id"))[np.asarray(table.column("keep"))].tolist())
    records = run_ranks(tmp_path / "corpus.parquet", world=2, b=4, workers=2, epochs=2,
                        tmp=tmp_path, manifests=tmp_path / "m")
    per_rank = [r["epochs"][1] for r in records]
    assert len(per_rank[0]) == len(per_rank[1])
    assert sorted(i for batches in per_rank for b in batches for i in b) == kept
