"""Reference models in the pipelines and the benchmark (issue "Reference scores", item 4), on
real shards, real training and real scoring passes: the held-out split's protocol, the cache, the
reference cost in the wall-clock, RHO-LOSS's selections, the prune-once bands and the random
pruning control, and the benchmark's run keys and tables."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("mnist1d")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))

import es_stream  # noqa: E402
from es_stream.manifest import read_epoch  # noqa: E402
from pipelines import loop  # noqa: E402
from pipelines import reference as R  # noqa: E402
from pipelines.mnist1d import data as m1d_data  # noqa: E402
from pipelines.mnist1d import train as m1d  # noqa: E402
from pipelines.textlm import data as text_data  # noqa: E402
from pipelines.textlm import train as text  # noqa: E402

TRAIN, TEST, NOISE, HELDOUT = 300, 100, 0.2, 200
b, B, EPOCHS = 16, 48, 2


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A noisy MNIST-1D corpus and its reference (trained and scored once for the module)."""
    root = tmp_path_factory.mktemp("ref")
    data = m1d_data.build(root / "mnist1d", TRAIN, TEST, NOISE, 42, "wds")
    config = R.ReferenceConfig.for_workload("mnist1d", heldout=HELDOUT, epochs=2, b=32)
    ref, meta = R.mnist1d_reference(root / "mnist1d", root / "refs", data, NOISE, 42, config,
                                    log=lambda _: None)
    return {"root": root, "data": data, "config": config, "ref": ref, "meta": meta,
            "workload": m1d.workload(data.corpus, data.test_x, data.test_y)}


def reference_scores(ref: loop.Reference) -> np.ndarray:
    return np.load(ref.store, mmap_mode="r")


# ----------------------------------------------------------------------------- the held-out split
def test_mnist1d_heldout_split_is_disjoint_and_carries_the_same_label_noise(built) -> None:
    data, meta = built["data"], built["meta"]
    held = m1d_data.build(built["root"] / "mnist1d", HELDOUT, R._HELDOUT_TEST, NOISE,
                          built["config"].data_seed, "wds")  # the cached build the reference used
    assert meta["identity"]["heldout_build"] == held.directory.name
    assert meta["heldout_samples"] == held.corpus.num_samples == HELDOUT
    # disjoint from train and test: no held-out input equals any of theirs
    seen = {row.tobytes() for row in np.concatenate([data.train_x, data.test_x.squeeze(1).numpy()])}
    assert not any(row.tobytes() in seen for row in held.train_x)
    # the same noise process at the same rate (no clean labels): exactly round(0.2 n) flipped,
    # and the labels it trained on are the noisy ones
    assert held.noisy.sum() == round(NOISE * HELDOUT) and data.noisy.sum() == round(NOISE * TRAIN)
    assert (held.y != held.y_clean).sum() == held.noisy.sum()
    shard_labels = [int(s["cls"]) for s in _samples(held.corpus)]
    assert shard_labels == held.y.tolist()


def _samples(corpus: es_stream.Corpus) -> list[dict]:
    ds = es_stream.ESDataset(corpus, meta_batch_size=64, decode=m1d_data.DecodeWDS(),
                             collate=lambda s: s, shuffle=False)
    out: dict[int, dict] = {}
    for mb in es_stream.loader(ds, num_workers=0):
        out.update(zip(mb.ids.tolist(), mb.data))
    return [out[i] for i in range(corpus.num_samples)]


def test_a_heldout_split_of_the_training_seed_is_refused_naming_the_flag(built) -> None:
    config = R.ReferenceConfig.for_workload("mnist1d", heldout=50, epochs=1, data_seed=42)
    with pytest.raises(ValueError, match="--reference-seed"):
        R.mnist1d_reference(built["root"] / "mnist1d", built["root"] / "other", built["data"],
                            NOISE, 42, config)
    with pytest.raises(ValueError, match="--reference-epochs"):
        R.ReferenceConfig.for_workload("mnist1d", epochs=0)


def test_textlm_reference_slice_is_train_text_not_trained_on(tmp_path: Path) -> None:
    data = text_data.build(tmp_path / "textlm", max_bytes=int(0.04 * text_data.MB), min_bytes=0,
                           seq_len=32, shard_sequences=128, train_bytes=32 * 128)
    assert data.train_shards == 1 < data.total_train_shards
    held = text_data.reference_corpus(data, 200)   # two whole shards after the first
    trained = {data.corpus.local_path(i) for i in range(data.corpus.num_shards)}
    slice_ = [held.local_path(i) for i in range(held.num_shards)]
    assert len(slice_) == 2 and not trained & set(slice_)
    assert all("/train/" in p for p in slice_)     # the train split, never the evaluation text
    with pytest.raises(ValueError, match="--reference-heldout"):
        text_data.reference_corpus(data, 10**6)
    # a GRU reference trained on it scores the training corpus
    target = text.workload(data.corpus, data.heldout[:32], hidden=16, embed=8)
    config = R.ReferenceConfig.for_workload("textlm", heldout=200, width=8, epochs=1, b=32)
    ref, meta = R.textlm_reference(tmp_path / "refs", data, data.heldout[:32], target, config,
                                   log=lambda _: None)
    scores = reference_scores(ref)
    assert len(scores) == data.corpus.num_samples and np.isfinite(scores).all()
    assert meta["heldout_samples"] == held.num_samples
    assert meta["params"] == sum(p.numel() for p in text.make_model("gru", 8).parameters())


# ----------------------------------------------------------------------------- the cache
def test_the_cached_reference_is_reused_and_a_killed_scoring_pass_does_not_retrain(
        built, monkeypatch: pytest.MonkeyPatch) -> None:
    ref, meta, config = built["ref"], built["meta"], built["config"]
    directory = Path(ref.store).parent
    assert meta["train_s"] > 0 and meta["score_s"] > 0 and ref.seconds == meta["train_s"] + meta["score_s"]
    store = es_stream.ScoreStore.open(ref.store, TRAIN)
    assert store.reference == {"scorer": ref.name, "complete": True} and config.to_dict() == meta["config"]
    before = reference_scores(ref).copy()
    model_mtime = (directory / "model.pt").stat().st_mtime_ns

    def no_training(*a, **k):
        raise AssertionError("the cached reference was trained again")

    monkeypatch.setattr(R, "train", no_training)
    args = (built["root"] / "mnist1d", built["root"] / "refs", built["data"], NOISE, 42, config)
    again, meta2 = R.mnist1d_reference(*args, log=lambda _: None)
    assert again == ref and meta2 == meta
    # killed after training, while scoring: the model is kept, the scoring pass runs again
    os.unlink(directory / "meta.json")
    for p in directory.glob("scores*"):
        p.unlink()
    rescored, meta3 = R.mnist1d_reference(*args, log=lambda _: None)
    assert (directory / "model.pt").stat().st_mtime_ns == model_mtime
    assert meta3["train_s"] == meta["train_s"] and rescored.store == ref.store
    np.testing.assert_array_equal(reference_scores(rescored), before)
    # another reference configuration is another cache entry
    other = R.ReferenceConfig.for_workload("mnist1d", heldout=HELDOUT, epochs=1, b=32)
    assert R.cache_key({}, other, built["workload"], built["workload"]) != R.cache_key(
        {}, config, built["workload"], built["workload"])


# ----------------------------------------------------------------------------- the loop's methods
def test_the_reference_cost_is_added_to_the_wall_clock_and_the_curve(built) -> None:
    costly = loop.Reference(built["ref"].store, train_s=100.0, score_s=20.0)
    config = loop.RunConfig(EPOCHS, b=b, B=B, progress=False, reference=costly)
    for method in ("rho", "band_middle"):
        r = loop.train(built["workload"], method, config)
        assert r["reference_s"] == 120.0 and r["reference_train_s"] == 100.0
        assert r["reference_score_s"] == 20.0
        assert 120.0 < r["wall_clock_s"] < 120.0 + 60
        assert all(t > 120.0 for t, _ in r["curve"]) and r["curve"][-1][0] <= r["wall_clock_s"]
    for method in ("uniform", "prune_random"):   # they read no reference: nothing added
        r = loop.train(built["workload"], method, config)
        assert r["reference_s"] == 0.0 and r["wall_clock_s"] < 60


def test_rho_selects_the_top_b_reducible_losses_of_the_scored_store(
        built, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = es_stream.ReducibleLossSelector.select

    def recording(self, ids, losses):
        chosen = original(self, ids, losses)
        calls.append((self.rule, torch.as_tensor(ids).clone(), losses.detach().clone(),
                      chosen.clone()))
        return chosen

    monkeypatch.setattr(es_stream.ReducibleLossSelector, "select", recording)
    ref = reference_scores(built["ref"])
    config = loop.RunConfig(EPOCHS, b=b, B=B, progress=False, reference=built["ref"])
    r = loop.train(built["workload"], "rho", config)
    full, tail = divmod(TRAIN, B)
    assert r["samples_forwarded"] == EPOCHS * TRAIN and r["samples_scored"] == EPOCHS * full * B
    assert r["samples_backpropagated"] == EPOCHS * (full * b + min(tail, b))
    assert len(calls) == EPOCHS * full   # a tail of <= b is trained whole, not selected
    for rule, ids, losses, chosen in calls:
        assert rule == "topk"
        reducible = losses.numpy() - ref[ids.numpy()]
        expected = set(ids[np.argsort(-reducible, kind="stable")[:b]].tolist())
        assert set(ids[chosen].tolist()) == expected
    calls.clear()
    r = loop.train(built["workload"], "rho_es", config)
    assert {c[0] for c in calls} == {"es"} and r["samples_backpropagated"] < EPOCHS * TRAIN


@pytest.mark.parametrize("method", ["band_low", "band_middle", "band_high", "prune_random"])
def test_prune_once_methods_train_on_exactly_the_kept_half_every_epoch(
        built, method: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    read = []
    step = loop._Run.step

    def recording(self, mb, progress=0.0):
        read.append((self.ds.epoch, mb.ids.tolist()))
        return step(self, mb, progress)

    monkeypatch.setattr(loop._Run, "step", recording)
    corpus = built["data"].corpus
    k = math.ceil(0.5 * TRAIN)
    config = loop.RunConfig(EPOCHS, b=b, B=B, progress=False, reference=built["ref"],
                            run_dir=str(tmp_path / "run"), seed=1)
    r = loop.train(built["workload"], method, config)
    manifests = tmp_path / "run" / "manifests"
    assert sorted(p.name for p in manifests.iterdir()) == ["_run.json", "epoch=00000"]  # decided once
    keep = read_epoch(manifests, 0, corpus.fingerprint, corpus.shard_counts)
    kept = set(keep.kept_ids.tolist())
    assert len(kept) == k
    for epoch in range(EPOCHS):   # every epoch reads exactly the kept samples, once each
        ids = [i for e, batch in read if e == epoch for i in batch]
        assert sorted(ids) == sorted(kept)
    assert r["samples_forwarded"] == r["samples_backpropagated"] == EPOCHS * k
    assert r["steps"] == EPOCHS * math.ceil(k / b)
    if method == "prune_random":
        other = loop.train(built["workload"], method, loop.RunConfig(
            EPOCHS, b=b, B=B, progress=False, run_dir=str(tmp_path / "run2"), seed=2))
        keep2 = read_epoch(tmp_path / "run2" / "manifests", 0, corpus.fingerprint,
                           corpus.shard_counts)
        assert len(keep2.kept_ids) == k and set(keep2.kept_ids.tolist()) != kept
        assert other["samples_forwarded"] == r["samples_forwarded"]
        return
    # the band of the reference scores, ordered by (score, id)
    scores = reference_scores(built["ref"])
    order = np.lexsort((np.arange(TRAIN), scores))
    first = {"band_low": 0, "band_middle": (TRAIN - k) // 2, "band_high": TRAIN - k}[method]
    assert kept == set(order[first:first + k].tolist())


def test_prune_chance_keeps_exactly_what_the_reference_predicts_no_worse_than_chance(
        built, tmp_path: Path) -> None:
    corpus, workload = built["data"].corpus, built["workload"]
    assert workload.chance_loss == pytest.approx(math.log(10))
    config = loop.RunConfig(EPOCHS, b=b, B=B, progress=False, reference=built["ref"],
                            run_dir=str(tmp_path / "run"), seed=1)
    r = loop.train(workload, "prune_chance", config)
    keep = read_epoch(tmp_path / "run" / "manifests", 0, corpus.fingerprint, corpus.shard_counts)
    scores = reference_scores(built["ref"])
    expected = np.flatnonzero(scores <= math.log(10))
    assert 0 < len(expected) < TRAIN          # the tiny reference leaves both kinds here
    assert sorted(keep.kept_ids.tolist()) == expected.tolist()
    assert r["samples_backpropagated"] == EPOCHS * len(expected)
    assert r["reference_s"] > 0                # it read the reference: it pays for it


def test_reference_methods_without_a_reference_are_refused_naming_it(built, tmp_path) -> None:
    for method in loop.REFERENCE_METHODS:
        with pytest.raises(ValueError, match="reference"):
            loop.train(built["workload"], method, loop.RunConfig(1, progress=False))
    missing = loop.Reference(str(tmp_path / "nope.npy"))
    with pytest.raises(FileNotFoundError, match="nope.npy"):
        loop.train(built["workload"], "rho", loop.RunConfig(1, progress=False, reference=missing))
    assert not (tmp_path / "nope.npy").exists()   # nothing created in its place
    with pytest.raises(ValueError, match="prune_keep"):
        loop.train(built["workload"], "prune_random", loop.RunConfig(1, progress=False,
                                                                   prune_keep=0.0))


# ----------------------------------------------------------------------------- the benchmark
def test_bench_train_counts_the_reference_in_the_wall_clock_and_reuses_it(tmp_path: Path) -> None:
    import bench_train

    argv = ["--workload", "mnist1d", "--noise", "0.2", "--m1d-train", "300", "--m1d-test", "100",
            "--m1d-epochs", "1", "--methods", "uniform,rho,band_high,prune_random,budget_rho",
            "--seeds", "0", "--reference-heldout", "150", "--reference-epochs", "1",
            "--out", str(tmp_path / "ev"), "--data-dir", str(tmp_path / "data"), "--no-progress"]
    res = bench_train.main(argv)
    assert res["ran"] == 5
    runs = {r["method"]: r for r in map(json.loads, (tmp_path / "ev" / "runs.jsonl").open())}
    refs = list((tmp_path / "data" / "reference").iterdir())
    assert len(refs) == 1   # one reference for every method that reads it
    meta = json.loads((refs[0] / "meta.json").read_text())
    for m in ("rho", "band_high"):
        out = runs[m]["result"]
        assert out["reference_s"] == pytest.approx(meta["train_s"] + meta["score_s"])
        assert out["wall_clock_s"] == pytest.approx(out["train_wall_clock_s"] + out["reference_s"])
        assert out["curve"][0][0] > out["reference_s"]
        assert runs[m]["config"]["ref_model"] == meta["config"]
    for m in ("uniform", "prune_random", "budget_rho"):
        assert "reference_s" not in runs[m]["result"] and "ref_model" not in runs[m]["config"]
    tables = (tmp_path / "ev" / "tables.md").read_text()
    assert "of it ref s" in tables and "## Goals (reference scores)" in tables
    # a second seed: the cached reference is reused (no second directory, same meta)
    res = bench_train.main([*argv[:argv.index("--seeds") + 1], "0,1",
                            *argv[argv.index("--seeds") + 2:]])
    # seed 0's measured runs are done; budget_rho is cut again from both seeds' means
    assert res["ran"] + res["skipped"] == 10 and res["skipped"] >= 4
    assert list((tmp_path / "data" / "reference").iterdir()) == refs
    assert json.loads((refs[0] / "meta.json").read_text()) == meta


def test_the_mnist1d_pipeline_trains_its_reference_once_and_reports_its_cost(tmp_path: Path) -> None:
    from pipelines.mnist1d import main

    argv = ["--methods", "uniform,rho,band_low,prune_random", "--train", "300", "--test", "100",
            "--epochs", "1", "--noise", "0.2", "--reference-heldout", "100",
            "--reference-epochs", "1", "--workers", "0", "--no-progress", "--out", str(tmp_path)]
    res = main(argv)
    runs = {r["method"]: r for r in res["runs"]}
    (ref_dir,) = (tmp_path / "reference").iterdir()
    meta = json.loads((ref_dir / "meta.json").read_text())
    assert res["config"]["reference"] == meta["config"] and meta["config"]["heldout"] == 100
    for m in ("rho", "band_low"):
        assert runs[m]["reference_s"] == pytest.approx(meta["train_s"] + meta["score_s"])
        assert runs[m]["reference_s"] > 0
    assert runs["uniform"]["reference_s"] == runs["prune_random"]["reference_s"] == 0.0
    mtime = (ref_dir / "model.pt").stat().st_mtime_ns
    again = main(argv)   # cached: the same reference, not trained again
    assert (ref_dir / "model.pt").stat().st_mtime_ns == mtime
    assert {r["method"]: r["reference_s"] for r in again["runs"]} == {
        m: r["reference_s"] for m, r in runs.items()}
    with pytest.raises(SystemExit):
        main([*argv, "--reference-width", "0"])


def test_diag_reducible_reports_the_mislabelled_share_of_the_top_half(tmp_path: Path) -> None:
    """tools/diag_reducible.py on a tiny noisy MNIST-1D with a reference that knows the noise
    exactly (high loss on the flipped samples): its figures follow from those losses."""
    sys.path.insert(0, str(ROOT / "tools"))
    import diag_reducible

    from pipelines.mnist1d.data import build

    data = build(tmp_path / "m", 300, 100, 0.4, 42, "wds")
    noisy = np.load(data.directory / "arrays.npz")["noisy"]
    ref = np.where(noisy, 5.0, 0.1).astype(np.float32)
    np.save(tmp_path / "ref.npy", ref)
    lines = diag_reducible.main(["--reference", str(tmp_path / "ref.npy"), "--noise", "0.4",
                                 "--data-dir", str(tmp_path / "m"), "--train", "300",
                                 "--test", "100", "--epochs", "1"])
    assert lines[0] == "reference loss: clean 0.10, mislabelled 5.00"
    share = float(lines[1].split("top half by reducible loss ")[1].split()[0])
    assert 0.0 <= share < noisy.mean()   # a reference this good keeps the flipped ones out
    with pytest.raises(SystemExit, match="ref.npy"):
        np.save(tmp_path / "ref.npy", ref[:10])
        diag_reducible.main(["--reference", str(tmp_path / "ref.npy"), "--data-dir",
                             str(tmp_path / "m"), "--train", "300", "--test", "100"])
