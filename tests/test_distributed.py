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


@pytest.mark.parametrize("backing", ["memory", "memmap"])
def test_two_ranks_eswp_stores_agree_and_kept_samples_train_once(wds_dir, tmp_path, backing):
    """2 gloo ranks x 2 DataLoader workers x 3 epochs of ESWP: after every epoch end both ranks
    hold identical scores (equal to a serial replay of the ES rule), each epoch trains every kept
    sample exactly once across ranks, and only rank 0 writes the manifests."""
    import numpy as np
    import torch

    sys.path.insert(0, str(HERE))
    from _dist_eswp import losses_of

    from es_stream import ESDataset

    corpus = Corpus.from_webdataset(str(wds_dir))
    corpus.save(tmp_path / "corpus.parquet")
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               WORLD_SIZE="2", OMP_NUM_THREADS="1")
    extra = ["--memmap"] if backing == "memmap" else []
    procs = [subprocess.Popen([sys.executable, str(HERE / "_dist_eswp.py"),
                               str(tmp_path / "corpus.parquet"), "6", "3", "2", "3", str(tmp_path)]
                              + extra, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)))
             for r in range(2)]
    for p in procs:
        assert p.wait(timeout=240) == 0, "a rank failed or hung"
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # decisions made and written by rank 0 only, for epochs 1 and 2 (none past the last epoch)
    assert [r["writes"] for r in records] == [2, 0]
    assert not (tmp_path / "manifests" / "epoch=00003").exists()

    n = corpus.num_samples
    reference = torch.full((n,), 1.0 / n, dtype=torch.float32)
    reader = ESDataset(corpus, 6, manifests=tmp_path / "manifests")
    for epoch in range(3):
        keep = reader.epoch_keep(epoch)
        kept = np.arange(n) if keep is None else keep.kept_ids
        if epoch > 0:
            assert len(kept) == int(np.ceil(0.6 * n))  # pruned at ratio 0.4
        trained = records[0]["trained"][epoch] + records[1]["trained"][epoch]
        assert sorted(trained) == kept.tolist()  # every kept sample once, none pruned
        ids = torch.from_numpy(kept)
        reference[ids] = 0.8 * reference[ids] + (1.0 - 0.8) * losses_of(ids, epoch)
        stores = [np.load(tmp_path / f"rank{r}-epoch{epoch}.npy") for r in range(2)]
        assert stores[0].tobytes() == stores[1].tobytes(), f"ranks disagree after epoch {epoch}"
        assert stores[0].tobytes() == reference.numpy().tobytes()


def run_merge(device: str, backing: str, tmp: Path) -> list[dict]:
    """tests/_dist_merge.py on 2 gloo ranks; their records, with the merged stores."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               WORLD_SIZE="2", OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(HERE / "_dist_merge.py"), device, backing,
                               str(tmp)], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)))
             for r in range(2)]
    for p in procs:
        assert p.wait(timeout=120) == 0, "a rank failed or hung"
    import numpy as np

    return [dict(json.loads((tmp / f"rank{r}.json").read_text()),
                 scores=np.load(tmp / f"rank{r}.npy")) for r in range(2)]


@pytest.mark.parametrize("device,backing", [
    ("cpu", "memory"), ("cpu", "memmap"),
    pytest.param("cuda", "memory", marks=pytest.mark.skipif(
        not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU "
        "(tools/gpu_check.py runs this merge with the store on the GPU)"))])
def test_merge_gives_both_ranks_every_update_in_chunks(device, backing, tmp_path):
    """The merge on its own, 2 real gloo ranks: each rank's updates (in chunks of 7 pairs, one
    rank sending more chunks than the other) reach the other, an id both updated takes the
    higher rank's value, a second merge sends nothing, and the store stays on its device."""
    import numpy as np

    sys.path.insert(0, str(HERE))
    from _dist_merge import expected_scores

    records = run_merge(device, backing, tmp_path)
    for r in records:
        np.testing.assert_array_equal(r["scores"], expected_scores())
        assert (r["applied"], r["again"]) == (21 + 21, 0)
    if backing == "memory":
        assert [r["device"].split(":")[0] for r in records] == [device, device]
