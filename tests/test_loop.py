"""The shared training loop (pipelines.loop) on both workloads, real shards and real training:
the counts each method implies, determinism per seed, the budget cut, the pruning guard, and the
argument checks."""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("mnist1d")
# `pipelines` is not an installed package: make the repository root importable however pytest
# was started (`python -m pytest` adds the cwd, the `pytest` script does not)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines import loop  # noqa: E402
from pipelines.mnist1d import data as m1d_data  # noqa: E402
from pipelines.mnist1d import train as m1d  # noqa: E402
from pipelines.textlm import data as text_data  # noqa: E402
from pipelines.textlm import train as text  # noqa: E402

b, B, EPOCHS = 16, 48, 3
SELECTING = ("es", "loss", "selective_backprop", "topk", "random")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def workloads(tmp_path_factory: pytest.TempPathFactory) -> dict[str, loop.Workload]:
    root = tmp_path_factory.mktemp("data")
    m = m1d_data.build(root / "mnist1d", 200, 100, 0.0, 42, "wds")
    t = text_data.build(root / "textlm", max_bytes=int(0.02 * text_data.MB), min_bytes=0,
                        seq_len=32, shard_sequences=256)
    return {"mnist1d": m1d.workload(m.corpus, m.test_x, m.test_y),
            "textlm": text.workload(t.corpus, t.heldout[:64], hidden=16, embed=8)}


def without_time(r: dict) -> dict:
    return {**r, "wall_clock_s": None, "cpu_s": None, "curve": [q for _, q in r["curve"]],
            "cpu_curve": [q for _, q in r["cpu_curve"]]}


@pytest.mark.parametrize("name", ["mnist1d", "textlm"])
def test_every_method_counts_what_it_does_and_repeats_per_seed(workloads, name: str) -> None:
    w = workloads[name]
    n = w.corpus.num_samples
    config = loop.RunConfig(EPOCHS, b=b, B=B, seed=3, progress=False, evals_per_epoch=2)
    runs = {m: loop.train(w, m, config) for m in loop.METHODS}
    for m, r in runs.items():
        assert len(r["curve"]) == 2 * EPOCHS and r["epochs_done"] == EPOCHS
        values = [q for _, q in r["curve"]]
        assert r[f"final_{w.quality}"] == values[-1]
        assert r[f"best_{w.quality}"] == (max if w.higher_is_better else min)(values)
        assert r["params"] == sum(p.numel() for p in w.make_model().parameters())
    # uniform: every sample read and trained on, in batches of b
    assert runs["uniform"]["samples_forwarded"] == runs["uniform"]["samples_backpropagated"] == EPOCHS * n
    assert runs["uniform"]["steps"] == EPOCHS * math.ceil(n / b)
    # the selecting methods: meta-batches of B, b of each back-propagated (a tail of <= b whole)
    def selected(n: int) -> tuple[int, int]:  # (back-propagated, steps) of an epoch of n
        full, tail = divmod(n, B)
        return full * b + min(tail, b), math.ceil(n / B)

    for m in SELECTING:
        assert runs[m]["samples_forwarded"] == EPOCHS * n, m
        assert runs[m]["samples_backpropagated"] == EPOCHS * selected(n)[0], m
        assert runs[m]["steps"] == EPOCHS * selected(n)[1], m
    # eswp: epoch 0 is burn-in, epoch 2 the annealed tail, epoch 1 keeps ceil(70%) of the set
    kept = math.ceil(0.7 * n)
    assert runs["eswp"]["samples_forwarded"] == 2 * n + kept
    assert runs["eswp"]["samples_backpropagated"] == 2 * selected(n)[0] + selected(kept)[0]
    assert runs["eswp"]["steps"] == 2 * selected(n)[1] + selected(kept)[1]
    # infobatch trains every sample it reads (batches of b), fewer in epoch 1
    info = runs["infobatch"]
    assert info["samples_backpropagated"] == info["samples_forwarded"] < EPOCHS * n
    assert info["steps"] < EPOCHS * math.ceil(n / b)
    # the same seed and settings: the same run, to the bit (wall-clock aside)
    for m in ("es", "infobatch"):
        assert without_time(loop.train(w, m, config)) == without_time(runs[m])
    # another seed: another run
    other = loop.train(w, "es", dataclasses.replace(config, seed=4))
    assert without_time(other) != without_time(runs["es"])


@pytest.mark.parametrize("name", ["mnist1d", "textlm"])
def test_budget_cut_stops_mid_epoch_and_never_prunes_for_an_epoch_it_does_not_run(
        workloads, name: str, tmp_path: Path) -> None:
    # 4 epochs cut at 2.5: epochs 0, 1 and half of 2 run; the decision at the end of epoch e is
    # for epoch e + 1, so decisions exist for epochs 1 and 2 only, never for epoch 3
    w = workloads[name]
    config = loop.RunConfig(4, b=b, B=B, progress=False, budget_epochs=2.5,
                            run_dir=str(tmp_path / "run"))
    r = loop.train(w, "eswp", config)
    per_epoch = math.ceil(w.corpus.num_samples / B)
    assert r["steps"] <= 2 * per_epoch + math.ceil(0.5 * per_epoch)
    assert abs(r["epochs_done"] - 2.5) <= 1 / per_epoch and len(r["curve"]) == 3
    assert sorted(os.listdir(tmp_path / "run" / "manifests")) == ["_run.json", "epoch=00001", "epoch=00002"]
    assert (tmp_path / "run" / "scores.npy").exists()


def test_the_mnist1d_pipeline_prunes_no_epoch_after_a_budget_cut(tmp_path: Path) -> None:
    # through the pipeline's own train(): its loop once decided (and timed) epoch 3's pruning
    # of a run cut at 2.5 epochs, leaving a manifest for an epoch that never ran
    d = m1d_data.build(tmp_path / "data", 200, 100, 0.0, 42, "wds")
    m1d.train("eswp", d.corpus, d.test_x, d.test_y, 4, b=b, B=B, workers=0, progress=False,
              budget_epochs=2.5, run_dir=str(tmp_path / "run"))
    assert sorted(os.listdir(tmp_path / "run" / "manifests")) == ["_run.json", "epoch=00001", "epoch=00002"]


def test_bad_settings_are_refused_naming_the_argument(workloads) -> None:
    w = workloads["mnist1d"]
    cases = [("nope", {}, "unknown method 'nope'"), ("es", {"b": 64, "B": 32}, "b <= B"),
             ("es", {"evals_per_epoch": 0}, "evals_per_epoch"),
             ("uniform", {"budget_epochs": 2.5}, "budget_epochs"),
             ("uniform", {"budget_epochs": 0.0}, "budget_epochs")]
    for method, options, message in cases:
        with pytest.raises(ValueError, match=message):
            loop.train(w, method, loop.RunConfig(2, progress=False, **options))
    with pytest.raises(ValueError, match="epochs must be >= 1, got 0"):
        loop.train(w, "uniform", loop.RunConfig(0, progress=False))
    with pytest.raises(TypeError, match="the workload's collate"):
        loop.take(object(), torch.tensor([0]))
