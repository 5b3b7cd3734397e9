"""The web-like stream as a workload (pipelines.webtext.train) and its curation methods through
the shared loop: every method takes the same steps under a budget in passes, the oracle keeps
exactly the clean kind, dedup's manifest drops the duplicates, the reference filter keeps
exactly what its bound says, the clean seed set is neither trained on nor held out, and the
benchmark runs the workload end to end."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # `pipelines` is not an installed package
sys.path.insert(0, str(ROOT / "tools"))

from es_stream import ScoreStore  # noqa: E402
from es_stream.manifest import read_epoch  # noqa: E402
from pipelines import loop  # noqa: E402
from pipelines.reference import ReferenceConfig  # noqa: E402
from pipelines.textlm.data import _read_all  # noqa: E402
from pipelines.webtext.corpus import KINDS, build  # noqa: E402
from pipelines.webtext.train import seed_set, webtext_reference, workload  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SEQ, N, b, B, PASSES = 64, 600, 16, 32, 0.5
REF = ReferenceConfig(heldout=96, width=8, epochs=1, b=16)


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("web")
    data = build(root / "data", samples=N, seq_len=SEQ, max_bytes=1_500_000, min_bytes=0,
                 shard_sequences=256, heldout_per_kind=16, log=lambda *_: None)
    w = workload(data, eval_sequences=32, per_kind=8, hidden=16, embed=8)
    ref, meta = webtext_reference(root / "ref", data, w, REF, validation=64, log=lambda *_: None)
    return {"data": data, "workload": w, "ref": ref, "meta": meta, "root": root,
            "samples": _read_all(data.corpus, SEQ), "kinds": data.labels()["kind"]}


def run(web: dict, method: str, tmp_path: Path, **options) -> dict:
    config = loop.RunConfig(1, b=b, B=B, seed=1, progress=False, budget_passes=PASSES,
                            evals_per_run=2, reference=web["ref"],
                            run_dir=str(tmp_path / method), **options)
    return loop.train(web["workload"], method, config)


def kept_ids(web: dict, tmp_path: Path, method: str) -> np.ndarray:
    corpus = web["data"].corpus
    keep = read_epoch(tmp_path / method / "manifests", 0, corpus.fingerprint, corpus.shard_counts)
    return np.sort(keep.kept_ids)


@pytest.mark.parametrize("spread", [False, True])
def test_the_clean_seed_set_is_neither_trained_on_nor_held_out(web: dict, spread: bool) -> None:
    seeds = seed_set(web["data"], REF.heldout, 64, spread)
    windows = _read_all(seeds.corpus, SEQ)
    assert windows.shape == (REF.heldout, SEQ) and seeds.validation.shape == (64, SEQ)
    train = {bytes(r) for r in web["samples"]}
    held = {bytes(r) for r in web["data"].heldout.numpy()}
    mine = {bytes(r) for r in windows} | {bytes(r) for r in seeds.validation.numpy()}
    assert not mine & train and not mine & held
    assert len(mine) == REF.heldout + 64     # distinct windows, training apart from validation
    # real text: printable bytes and newlines, not the binary kinds
    assert np.isin(windows, list(range(9, 14)) + list(range(32, 127))).mean() > 0.99
    ref = web["ref"]
    assert ref.clean_losses is not None and len(ref.clean_losses) == 64
    assert ref.train_s > 0 and ref.score_s > 0   # its training and scoring are paid


def test_every_method_takes_the_budgets_steps_and_reports_its_kinds(web: dict,
                                                                    tmp_path: Path) -> None:
    steps = math.ceil(PASSES * N / b)
    counts = web["data"].meta["counts"]
    for method in ("uniform", "es", "rho", "oracle", "dedup_exact", "dedup_near", "ref_filter",
                   "dedup_filter"):
        r = run(web, method, tmp_path)
        assert r["steps"] == steps, method            # the same training compute for all
        # b per step, but for the tail batch of each pass over a pruned set
        assert sum(r["backpropagated_by_kind"].values()) == r["samples_backpropagated"], method
        assert 0 <= steps * b - r["samples_backpropagated"] < b * math.ceil(r["epochs_done"]), method
        assert r["samples_by_kind"] == counts, method
        assert {f"bpb_{k}" for k in KINDS} <= set(r["final_metrics"]), method
        assert math.isfinite(r["final_bpb"]), method
        if method in ("es", "rho"):   # they read B per step (the epoch's tail is shorter)
            assert steps * B - B < r["samples_forwarded"] <= steps * B, method
        if method in ("rho", "ref_filter", "dedup_filter"):
            assert r["reference_s"] == pytest.approx(web["ref"].seconds), method
        if loop.methods.get(method).prune == "once":
            kept = kept_ids(web, tmp_path, method)
            by_kind = {k: int((web["kinds"][kept] == k).sum()) for k in KINDS}
            assert r["kept_by_kind"] == by_kind, method
            trained = {k for k, v in r["backpropagated_by_kind"].items() if v}
            assert trained <= {k for k, v in by_kind.items() if v}, method


def test_the_oracle_keeps_exactly_the_clean_kind(web: dict, tmp_path: Path) -> None:
    r = run(web, "oracle", tmp_path)
    kept = kept_ids(web, tmp_path, "oracle")
    assert kept.tolist() == np.flatnonzero(web["kinds"] == "clean").tolist()
    assert set(k for k, v in r["backpropagated_by_kind"].items() if v) == {"clean"}
    # the side table is what it needs: a workload without one is refused, naming it
    import dataclasses

    bare = dataclasses.replace(web["workload"], sample_kinds=None)
    with pytest.raises(ValueError, match="side table"):
        loop.train(bare, "oracle", loop.RunConfig(1, b=b, progress=False))


def test_dedup_drops_the_duplicates_and_keeps_one_of_each(web: dict, tmp_path: Path) -> None:
    samples, kinds = web["samples"], web["kinds"]
    for method in ("dedup_exact", "dedup_near"):
        run(web, method, tmp_path)
        kept = kept_ids(web, tmp_path, method)
        assert not np.isin(np.flatnonzero(kinds == "exact_dup"), kept).any(), method
        contents = [bytes(samples[i]) for i in kept]
        assert len(set(contents)) == len(contents), method        # no exact copy survives
        if method == "dedup_exact":   # every distinct content is still there, once
            assert set(contents) == {bytes(s) for s in samples}
    near = np.flatnonzero(kinds == "near_dup")
    kept = kept_ids(web, tmp_path, "dedup_near")
    assert np.isin(near, kept).mean() <= 0.2          # most near copies are caught
    assert np.isin(np.flatnonzero(kinds == "clean"), kept).mean() >= 0.9


def test_the_reference_filter_keeps_what_its_bound_says(web: dict, tmp_path: Path) -> None:
    corpus = web["data"].corpus
    scores = ScoreStore.open(web["ref"].store, corpus.num_samples,
                             fingerprint=corpus.fingerprint).read_range(0, corpus.num_samples)
    bound = float(np.quantile(np.asarray(web["ref"].clean_losses), 0.9))
    run(web, "ref_filter", tmp_path, filter_quantile=0.9)
    expected = np.flatnonzero(scores <= bound)
    assert 0 < len(expected) < N
    assert kept_ids(web, tmp_path, "ref_filter").tolist() == expected.tolist()
    # combined: dedup among what the filter kept, so the result is inside the filter's set
    run(web, "dedup_filter", tmp_path, filter_quantile=0.9)
    both = kept_ids(web, tmp_path, "dedup_filter")
    assert set(both.tolist()) <= set(expected.tolist())
    assert len({bytes(web["samples"][i]) for i in both}) == len(both)


def test_rs2_reads_a_fresh_half_each_epoch_and_every_sample_once_over_two(
        web: dict, tmp_path: Path) -> None:
    """RS2 at keep 0.5 over a budget of two passes: two epochs of half the corpus each, the
    first included (drawn before the first step), disjoint, so every sample is trained on once;
    each epoch's manifest is exactly the policy's draw; half of uniform's steps."""
    from es_stream.random_subsets import RS2Policy

    config = loop.RunConfig(1, b=b, B=B, seed=1, progress=False, budget_passes=2.0,
                            evals_per_run=2, run_dir=str(tmp_path / "rs2"), prune_keep=0.5)
    r = loop.train(web["workload"], "rs2", config)
    corpus = web["data"].corpus
    policy = RS2Policy(0.5, seed=1)
    epochs = [read_epoch(tmp_path / "rs2" / "manifests", e, corpus.fingerprint,
                         corpus.shard_counts) for e in range(2)]
    for e, keep in enumerate(epochs):
        assert np.sort(keep.kept_ids).tolist() == policy.kept_ids(N, e).tolist()
    both = np.concatenate([k.kept_ids for k in epochs])
    assert np.sort(both).tolist() == list(range(N))  # without replacement: each sample once
    assert r["samples_backpropagated"] == N and r["epochs_done"] == 2
    assert r["backpropagated_by_kind"] == web["data"].meta["counts"]
    assert r["steps"] == 2 * math.ceil(N / 2 / b)  # half of uniform's 2 * N / b


def test_bench_train_runs_the_web_stream_with_a_budget_in_passes(tmp_path: Path) -> None:
    import bench_train

    argv = ["--workload", "webtext", "--web-samples", "400", "--web-seq-len", "64",
            "--web-passes", "0.5", "--web-hidden", "16", "--web-embed", "8",
            "--web-eval-sequences", "32", "--web-per-kind", "8", "--web-evals", "2",
            "--methods", "uniform,oracle,dedup_near,budget_dedup_near", "--seeds", "0",
            "--out", str(tmp_path / "ev"), "--data-dir", str(tmp_path / "data"),
            "--no-progress"]
    res = bench_train.main(argv)
    assert res["ran"] == 4
    runs = {r["method"]: r for r in map(json.loads, (tmp_path / "ev" / "runs.jsonl").open())}
    assert runs["oracle"]["result"]["kept_by_kind"]["html"] == 0
    assert runs["uniform"]["result"]["steps"] == math.ceil(0.5 * 400 / 32)
    (entry,) = res["experiments"].values()
    cut = entry["budget_cuts"]["budget_dedup_near"]
    assert runs["budget_dedup_near"]["config"]["budget_epochs"] == cut["epochs"]
    assert cut["epochs"] == pytest.approx(0.5 * cut["mean_train_s_of"]
                                          / cut["mean_train_s_uniform"], abs=1e-4)
    tables = (tmp_path / "ev" / "tables.md").read_text()
    assert "## The web-like stream" in tables and "kept clean" in tables
