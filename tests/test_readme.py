"""The README's plain-loop example runs as written, on a small real corpus."""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import torch
import webdataset as wds

from es_stream import Corpus

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_block(name: str) -> str:
    text = README.read_text()
    match = re.search(rf"<!-- readme-test: {name} .*?-->\n```python\n(.*?)```", text, re.S)
    assert match, f"README block {name!r} not found"
    return match.group(1)


def write_clusters(directory: Path, n: int = 1024, seed: int = 0) -> np.ndarray:
    """``n`` samples around 10 class centres ("npy": float[40], "cls": int) as tar shards,
    indexed to ``directory/corpus.parquet``, as the README examples expect; returns the centres."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(10, 40)).astype(np.float32)
    with wds.ShardWriter(str(directory / "train-%06d.tar"), maxcount=300, verbose=0) as w:
        for i in range(n):
            buf = io.BytesIO()
            np.save(buf, centers[i % 10] + 0.3 * rng.normal(size=40).astype(np.float32))
            w.write({"__key__": f"{i:06d}", "npy": buf.getvalue(), "cls": i % 10})
    Corpus.from_webdataset(str(directory)).save(directory / "corpus.parquet")
    return centers


def test_first_screen_example_writes_shards_and_trains_with_infobatch(tmp_path, monkeypatch):
    """The README's first block, run as written in an empty directory: it writes its own shards,
    trains, prunes the middle epochs by score, and the model learns the toy classes."""
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(readme_block("first-screen"), "README.md", "exec"), scope)
    corpus, model = scope["corpus"], scope["model"]
    assert corpus.num_samples == 4000 and corpus.num_shards == 4
    # the run record and epochs 1..5 (epoch 0 has no decision yet; none past the last epoch)
    epochs = sorted(p.name for p in (tmp_path / "manifests").iterdir())
    assert epochs == ["_run.json"] + [f"epoch={e:05d}" for e in range(1, 6)]
    t = pads.dataset(str(tmp_path / "manifests"), partitioning="hive").to_table()
    keep, epoch = t.column("keep").to_numpy(zero_copy_only=False), t.column("epoch").to_numpy()
    kept = {int(e): int(keep[epoch == e].sum()) for e in range(1, 6)}
    assert kept[1] < 4000 and kept[5] == 4000     # pruned in the middle, all read in the tail
    weights = t.column("weight").to_numpy()
    assert (weights[keep & (epoch == 1)] > 1).any()  # the kept low-loss samples are up-weighted
    rng = np.random.default_rng(1)                  # fresh images of the same ten classes
    labels = np.arange(1000) % 10
    images = rng.normal(60, 30, size=(1000, 16, 16))
    images[np.arange(1000), labels] += 120
    x = torch.from_numpy(images.clip(0, 255).astype(np.uint8).astype(np.float32) / 255)  # "torchl"
    with torch.no_grad():
        acc = (model(x).argmax(1).numpy() == labels).mean()
    assert acc >= 0.9, acc


def test_metrics_example_logs_stats_and_pruning_summaries(tmp_path, monkeypatch, caplog):
    import logging

    write_clusters(tmp_path, seed=3)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    with caplog.at_level(logging.INFO, logger="es_stream"):
        exec(compile(readme_block("metrics"), "README.md", "exec"), scope)
    history, selector = scope["history"], scope["selector"]
    stats = [(step, m) for step, m in history if "es/selected_fraction" in m]
    prunes = [(step, m) for step, m in history if "es/prune/kept" in m]
    assert [step for step, _ in stats] == [0, 1, 2]
    steps_per_epoch = [1024 // 128, math.ceil(0.7 * 1024) // 128, 1024 // 128]  # epoch 1 pruned
    for (_, m), steps in zip(stats, steps_per_epoch):
        assert m["es/steps"] == steps and m["es/samples_selected"] == 32 * steps
        assert m["es/selected_fraction"] == pytest.approx(32 / 128)
        assert m["es/score_p10"] <= m["es/score_p50"] <= m["es/score_p90"]
    assert stats[0][1]["es/never_scored_fraction"] > stats[2][1]["es/never_scored_fraction"]
    assert prunes and prunes[0][1]["es/prune/kept"] == math.ceil(0.7 * 1024)
    assert scope["pruner"].last_summary["kept"] == 1024       # the annealed last decision
    assert scope["stats"] == {k[3:]: v for k, v in stats[-1][1].items()}
    assert any("selected_fraction" in r.getMessage() for r in caplog.records)
    assert selector.stats()["steps"] == 0                      # log_stats reset it


def test_plain_loop_example_trains(tmp_path, monkeypatch):
    centers = write_clusters(tmp_path)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(readme_block("plain-loop"), "README.md", "exec"), scope)
    selector, model = scope["selector"], scope["model"]
    assert selector.step == 3 * (1024 // 128)  # drop_last: every meta-batch is full
    assert not torch.allclose(selector.store.gather(torch.arange(1024)), torch.full((1024,), 1 / 1024))
    x = torch.from_numpy(centers)
    assert (model(x).argmax(1) == torch.arange(10)).float().mean() >= 0.8  # it learned


def test_eswp_example_prunes_the_middle_epochs(tmp_path, monkeypatch):
    write_clusters(tmp_path, seed=1)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(readme_block("eswp-loop"), "README.md", "exec"), scope)
    # epoch 0 is burn-in, epoch 3 the annealing tail: epochs 1 and 2 train on ceil(0.7 n) samples
    kept = int(np.ceil(0.7 * 1024))
    assert scope["selector"].step == 2 * (1024 // 128) + 2 * (kept // 128)
    assert sorted(p.name for p in (tmp_path / "manifests").iterdir()) == [
        "_run.json", "epoch=00001", "epoch=00002", "epoch=00003"]  # none for epoch 4: never run
    t = pads.dataset(str(tmp_path / "manifests"), partitioning="hive").to_table()
    keep, epoch = t.column("keep").to_numpy(zero_copy_only=False), t.column("epoch").to_numpy()
    assert {e: int(keep[epoch == e].sum()) for e in (1, 2, 3)} == {1: kept, 2: kept, 3: 1024}


def test_torchrun_example_runs_on_two_gloo_ranks(tmp_path):
    """The multi-rank script runs as written under real torchrun (2 processes, gloo): ranks end
    with identical scores, manifests are written for the pruned epochs, each rank checkpoints;
    run again, it resumes from its last checkpoint to the same end."""
    import os
    import socket
    import subprocess
    import sys

    write_clusters(tmp_path, seed=2)
    (tmp_path / "train.py").write_text(readme_block("torchrun"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(port), "train.py"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(cmd, cwd=tmp_path, env=env, check=True, timeout=300)
    scores = [np.load(tmp_path / f"scores-rank{r}.npy") for r in range(2)]
    assert scores[0].tobytes() == scores[1].tobytes()
    assert (scores[0] != 0).all()  # every sample was trained and scored
    kept = int(np.ceil(0.7 * 1024))
    t = pads.dataset(str(tmp_path / "manifests"), partitioning="hive").to_table()
    keep, epoch = t.column("keep").to_numpy(zero_copy_only=False), t.column("epoch").to_numpy()
    assert {e: int(keep[epoch == e].sum()) for e in (1, 2, 3)} == {1: kept, 2: kept, 3: 1024}
    latest = [(tmp_path / "checkpoints" / f"rank{r}" / "latest").read_text().strip() for r in range(2)]
    assert latest[0] == latest[1] and latest[0].startswith("step-")
    # a second launch resumes from the last checkpoint (mid-way through the last epoch, as
    # 2 x 8 + 2 x 5 = 26 steps were taken and checkpoints come every 10) and ends the same
    subprocess.run(cmd, cwd=tmp_path, env=env, check=True, timeout=300)
    again = np.load(tmp_path / "scores-rank0.npy")
    assert again.tobytes() == scores[0].tobytes()


def test_reference_prune_and_rho_examples_run(tmp_path, monkeypatch):
    """The reference-model README blocks run as written: score every sample once, keep the
    middle half for every epoch, then RHO-LOSS selection against the same reference store."""
    write_clusters(tmp_path, seed=3)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(readme_block("reference-prune"), "README.md", "exec"), scope)
    assert scope["kept"] == [512, 512, 512]  # ceil(0.5 n), the same decision in every epoch
    assert sorted(p.name for p in (tmp_path / "pruned").iterdir()) == ["_run.json", "epoch=00000"]
    assert json.loads((tmp_path / "reference.meta.json").read_text())["reference"] == {
        "scorer": "reference-mlp-v1", "complete": True}
    exec(compile(readme_block("rho-loop"), "README.md", "exec"), scope)
    assert scope["selector"].step == 2 * (1024 // 128)


def test_resume_example_killed_and_rerun_ends_as_an_uninterrupted_run(tmp_path, monkeypatch):
    """The TrainingState README block, run to the end in one directory; in another, stopped
    mid-epoch after step 17 (its last checkpoint is step 15) and run again as written: the
    second run resumes and ends with the same model, scores and manifests, bit for bit."""
    source = readme_block("resume-loop")
    results = {}
    for name, stop_at in (("whole", None), ("resumed", 17)):
        directory = tmp_path / name
        directory.mkdir()
        write_clusters(directory, seed=4)
        monkeypatch.chdir(directory)
        if stop_at is not None:
            class Stop(Exception):
                pass

            def stop(step: int) -> None:
                if step == stop_at:
                    raise Stop
            interrupted = source.replace("        step += 1\n", "        step += 1\n        stop(step)\n")
            assert interrupted != source
            with pytest.raises(Stop):
                exec(compile(interrupted, "README.md", "exec"), {"stop": stop})
            assert (directory / "checkpoints" / "latest").read_text().strip() == "step-000000000015"
        seen: list[int] = []  # the steps this run takes: a resumed run starts after step 15
        scope: dict = {"seen": seen}
        counted = source.replace("        step += 1\n", "        step += 1\n        seen.append(step)\n")
        exec(compile(counted, "README.md", "exec"), scope)
        assert seen[0] == (1 if stop_at is None else 16) and seen[-1] == scope["step"]
        # the files' metadata name the shards by path, which differs between the directories
        manifests = {p.relative_to(directory / "manifests"): pq.read_table(p).to_pydict()
                     for p in sorted((directory / "manifests").rglob("*.parquet"))}
        results[name] = (scope["step"], [p.detach().clone() for p in scope["model"].parameters()],
                         scope["selector"].store.to_numpy(), manifests)
    (step_a, params_a, scores_a, man_a), (step_b, params_b, scores_b, man_b) = results.values()
    assert step_a == step_b > 17
    assert all(torch.equal(a, b) for a, b in zip(params_a, params_b))
    assert scores_a.tobytes() == scores_b.tobytes()
    assert man_a == man_b and len(man_a) > 0
