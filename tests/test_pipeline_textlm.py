"""End to end: the byte-level LM pipeline on a tiny slice of the real standard library text —
real WebDataset shards, real es-stream streaming, real training."""

from __future__ import annotations

import json
import math
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("webdataset")
pytest.importorskip("matplotlib")
# `pipelines` is not an installed package: make the repository root importable however pytest
# was started (`python -m pytest` adds the cwd, the `pytest` script does not)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from es_stream import ESDataset, loader  # noqa: E402
from pipelines.textlm.__main__ import main  # noqa: E402
from pipelines.textlm.data import MB, Collate, Decode, build, collect, split_files, stdlib_dir  # noqa: E402
from pipelines.textlm.train import sequence_losses, train  # noqa: E402

L, SHARD, EPOCHS = 64, 128, 3
TINY = ["--max-mb", "0.15", "--min-mb", "0", "--seq-len", str(L), "--shard-sequences", str(SHARD),
        "--train-mb", "0", "--eval-sequences", "96", "--hidden", "32", "--embed", "16",
        "--b", "16", "--B", "32", "--epochs", str(EPOCHS), "--no-progress"]


def concatenated(source: Path, files: list[list]) -> bytes:
    return b"".join((source / rel).read_bytes() for rel, _ in files)


def test_textlm_end_to_end(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    results = main(TINY + ["--methods", "uniform,es,eswp", "--out", str(out)])
    printed = capsys.readouterr().out

    saved = json.loads((out / "results.json").read_text())
    assert saved["table"] == results["table"] and "final bpb" in results["table"]
    assert [r["method"] for r in saved["runs"]] == ["uniform", "es", "eswp"]
    directory = Path(saved["data_dir"])
    meta = json.loads((directory / "meta.json").read_text())
    assert meta["source"] == str(stdlib_dir()) and meta["seq_len"] == L
    assert 0 < meta["bytes"] <= 0.15 * MB

    # split by file: disjoint, everything collected is in one split, held-out ~5% of the bytes
    files = json.loads((directory / "files.json").read_text())
    train_files = {rel for rel, _ in files["train"]}
    held_files = {rel for rel, _ in files["heldout"]}
    assert train_files and held_files and not train_files & held_files
    assert train_files | held_files == {rel for rel, _ in collect(None, int(0.15 * MB))}

    # the shards are plain WebDataset tar files holding the files' bytes cut into windows of L,
    # in order; held-out text never appears in a train shard
    source = Path(meta["source"])
    train_text, held_text = concatenated(source, files["train"]), concatenated(source, files["heldout"])
    shards = sorted((directory / "train").glob("*.tar"))
    assert len(shards) == math.ceil(meta["train_sequences"] / SHARD) > 1
    with tarfile.open(shards[0]) as tar:
        members = tar.getmembers()
        assert [m.name for m in members[:2]] == ["000000000.bin", "000000001.bin"]
        assert tar.extractfile(members[1]).read() == train_text[L:2 * L]
    assert meta["train_sequences"] == len(train_text) // L
    assert meta["heldout_sequences"] == len(held_text) // L
    held = np.load(directory / "heldout.npy")
    assert held.tobytes() == held_text[:len(held_text) // L * L]

    # the training corpus streamed through es-stream gives back exactly those windows, by id
    data = build(out / "data", max_bytes=int(0.15 * MB), min_bytes=0, seq_len=L,
                 shard_sequences=SHARD)
    assert data.directory == directory and data.corpus.num_samples == meta["train_sequences"]
    ds = ESDataset(data.corpus, 50, decode=Decode(L), collate=Collate(L), shuffle=True, seed=3)
    got = np.zeros((data.corpus.num_samples, L), np.uint8)
    for mb in loader(ds, num_workers=2):
        got[mb.ids.numpy()] = mb.data.numpy()
    assert got.tobytes() == train_text[:data.corpus.num_samples * L]

    # training: every method learnt (8 bits/byte is a uniform guess), counts add up
    runs = {r["method"]: r for r in saved["runs"]}
    n = meta["train_sequences"]
    for m, r in runs.items():
        assert len(r["curve"]) == EPOCHS * 2  # --evals-per-epoch 2 by default
        assert [t for t, _ in r["curve"]] == sorted(t for t, _ in r["curve"])
        assert r["final_bpb"] < 7.0 and r["best_bpb"] <= r["final_bpb"]
        assert any(line.strip().startswith(m) for line in printed.splitlines())
    assert runs["uniform"]["samples_forwarded"] == runs["uniform"]["samples_backpropagated"] == EPOCHS * n
    assert runs["es"]["samples_forwarded"] == EPOCHS * n
    full, tail = divmod(n, 32)
    assert runs["es"]["samples_backpropagated"] == EPOCHS * (full * 16 + min(tail, 16))
    # eswp: epoch 0 burn-in, epoch 2 the annealing tail, epoch 1 keeps ceil(70%)
    assert runs["eswp"]["samples_forwarded"] == 2 * n + math.ceil(0.7 * n)
    assert (out / "runs" / "eswp-seed0" / "scores.npy").exists()
    png = out / "bpb_vs_time.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and str(png) in printed


def test_budget_cut_and_per_sample_loss(tmp_path: Path) -> None:
    data = build(tmp_path, max_bytes=int(0.1 * MB), min_bytes=0, seq_len=L, shard_sequences=SHARD)
    n = data.corpus.num_samples
    held = data.heldout[:32]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the CLI does: more threads only contend on a busy 2-core machine
    try:
        r = train("uniform", data.corpus, held, 2, b=16, B=16, seed=0, workers=0, progress=False,
                  budget_epochs=1.5, hidden=16, embed=8, evals_per_epoch=2)
    finally:
        torch.set_num_threads(threads)
    per_epoch = math.ceil(n / 16)
    assert r["steps"] == per_epoch + math.ceil(0.5 * per_epoch)
    assert abs(r["epochs_done"] - 1.5) <= 1 / per_epoch
    # two evaluations in epoch 0; epoch 1 is cut where its mid-epoch evaluation would be: one
    assert len(r["curve"]) == 3
    with pytest.raises(ValueError, match="budget_epochs"):
        train("uniform", data.corpus, held, 1, budget_epochs=1.5, progress=False)

    # the per-sample loss is the mean next-byte cross-entropy of each sequence on its own
    model = torch.nn.Sequential(torch.nn.Embedding(256, 8), torch.nn.Linear(8, 256))
    seqs = data.heldout[:4]
    losses = sequence_losses(model, seqs)
    for i in range(4):
        alone = torch.nn.functional.cross_entropy(model(seqs[i:i + 1, :-1].long())[0],
                                                  seqs[i, 1:].long())
        assert torch.allclose(losses[i], alone, atol=1e-6)


def test_collect_and_split_are_deterministic(tmp_path: Path) -> None:
    files = collect(None, int(2 * MB))
    assert files == sorted(files) and files == collect(None, int(2 * MB))
    assert all(not rel.startswith("site-packages") and "__pycache__" not in rel for rel, _ in files)
    train_a, held_a = split_files(files, 0.1, seed=0)
    train_b, held_b = split_files(files, 0.1, seed=0)
    assert (train_a, held_a) == (train_b, held_b)
    assert split_files(files, 0.1, seed=1)[1] != held_a
    total = sum(s for _, s in files)
    held_bytes = sum(s for _, s in held_a)
    assert held_bytes >= 0.1 * total and held_bytes - held_a[-1][1] < 0.1 * total
    assert sorted(train_a + held_a) == files
    with pytest.raises(ValueError, match="less than the required"):
        build(tmp_path, max_bytes=int(0.05 * MB))  # the default minimum is 20 MB


def test_cli_help_and_bad_method(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0 and "--train-mb" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["--methods", "uniform,nope"])
    assert exc.value.code == 2
