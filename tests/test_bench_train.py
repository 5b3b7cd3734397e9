"""tools/bench_train.py on a tiny MNIST-1D configuration: real shards, real training, 2 seeds,
the budget-matched control, the table/JSON fields, and resuming an interrupted run."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("mnist1d")
pytest.importorskip("matplotlib")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))

import bench_train  # noqa: E402
from benchtrain.report import time_to_target  # noqa: E402

TRAIN, EPOCHS, b, B = 640, 3, 16, 32
METHODS = ["uniform", "uniform_B", "es", "eswp", "random", "budget_es"]


def argv(tmp_path: Path, *extra: str) -> list[str]:
    return ["--workload", "mnist1d", "--m1d-train", str(TRAIN), "--m1d-test", "200",
            "--m1d-epochs", str(EPOCHS), "--m1d-b", str(b), "--m1d-B", str(B), "--seeds", "0,1",
            "--methods", ",".join(METHODS), "--out", str(tmp_path / "evidence"),
            "--data-dir", str(tmp_path / "data"), "--no-progress", *extra]


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_bench_mnist1d_two_seeds_budget_control_and_resume(tmp_path: Path, capsys) -> None:
    res = bench_train.main(argv(tmp_path))
    out = tmp_path / "evidence"
    assert res["ran"] == len(METHODS) * 2 and res["skipped"] == 0
    runs = [json.loads(x) for x in lines(out / "runs.jsonl")]
    assert len(runs) == len(METHODS) * 2 and len({r["key"] for r in runs}) == len(runs)
    by = {(r["method"], r["seed"]): r["result"] for r in runs}

    # counts follow from the method: uniform trains everything in batches of b, uniform_B in
    # batches of B, the selecting methods forward everything and back-propagate b of each B
    for seed in (0, 1):
        assert by["uniform", seed]["samples_backpropagated"] == EPOCHS * TRAIN
        assert by["uniform", seed]["steps"] == EPOCHS * TRAIN // b
        assert by["uniform_B", seed]["steps"] == EPOCHS * TRAIN // B
        for m in ("es", "random"):
            assert by[m, seed]["samples_forwarded"] == EPOCHS * TRAIN
            assert by[m, seed]["samples_backpropagated"] == EPOCHS * TRAIN // 2
        assert by["eswp", seed]["samples_forwarded"] < EPOCHS * TRAIN  # epoch 1 pruned 30%

    # both times recorded: the CPU seconds beside the wall-clock, a curve point per evaluation
    for r in by.values():
        assert r["cpu_s"] > 0 and len(r["cpu_curve"]) == len(r["curve"])
        assert [q for _, q in r["cpu_curve"]] == [q for _, q in r["curve"]]

    # the budget-matched control: cut to ES's mean time over uniform's, in epochs, on the default
    # time basis (CPU seconds)
    entry = json.loads((out / "summary.json").read_text())["mnist1d-noise0"]
    assert entry["time_basis"] == ["cpu"]
    cut = entry["budget_cuts"]["budget_es"]
    mean = lambda m, k: sum(by[m, s][k] for s in (0, 1)) / 2  # noqa: E731
    raw = EPOCHS * mean("es", "cpu_s") / mean("uniform", "cpu_s")
    assert cut["epochs"] == round(min(raw, EPOCHS), 3) and 0 < cut["epochs"] <= EPOCHS
    per_epoch = TRAIN // b
    full = math.floor(cut["epochs"])
    steps = full * per_epoch + (math.ceil((cut["epochs"] - full) * per_epoch) if cut["epochs"] > full else 0)
    for seed in (0, 1):
        r = by["budget_es", seed]
        assert r["epochs"] == cut["epochs"] and r["steps"] == steps
        assert r["samples_backpropagated"] == steps * b
        assert len(r["curve"]) == math.ceil(cut["epochs"])

    # the summary: every field, ratios to uniform, target = uniform's mean final - tolerance
    s = entry["summary"]
    u_final = mean("uniform", "final")
    assert s["higher_is_better"] and s["quality"] == "test_acc"
    assert s["target"] == pytest.approx(u_final - 0.002)
    assert list(s["methods"]) == METHODS
    for m, row in s["methods"].items():
        assert row["seeds"] == [0, 1]
        for k in ("wall_clock_s", "samples_forwarded", "samples_backpropagated", "final", "best"):
            assert set(row[k]) == {"mean", "std"}
            assert row["ratio_to_uniform"][k] == pytest.approx(row[k]["mean"] / s["methods"]["uniform"][k]["mean"])
        assert row["best"]["mean"] >= row["final"]["mean"]
        ttt = row["time_to_target_s"]
        assert ttt["of"] == 2 and ttt["reached"] == sum(t is not None for t in ttt["per_seed"])
        for seed, t in zip((0, 1), ttt["per_seed"]):
            reach = [p[0] for p in by[m, seed]["cpu_curve"] if p[1] >= s["target"]]
            assert t == (reach[0] if reach else None)
        assert isinstance(row["lossless"], bool)
        assert row["time_to_uniform_mean_final_s"]["of"] == 2
    assert s["methods"]["uniform"]["ratio_to_uniform"]["wall_clock_s"] == 1.0
    assert s["methods"]["es"]["ratio_to_uniform"]["samples_backpropagated"] == pytest.approx(0.5)

    # the scoring forward's cost, read off the random control: random/uniform = F/T + b/B
    sc = s["scoring_cost"]
    r = mean("random", "cpu_s") / mean("uniform", "cpu_s")
    assert sc["random_over_uniform"] == pytest.approx(r)
    assert sc["forward_over_train_per_sample"] == pytest.approx(r - b / B)
    assert sc["selection_overhead"] == pytest.approx(mean("es", "cpu_s") / mean("random", "cpu_s"))

    table = (out / "tables.md").read_text()
    assert "scoring forward per sample = " in table
    assert "| method | seeds | train s | × unif |" in table and "budget_es: " in table
    for label in ("uniform (b)", "uniform (B)", "| es |", "| eswp |", "random (b of B)",
                  "uniform, ES's budget"):
        assert label in table
    assert "target = uniform's mean final test_acc minus 0.002" in table
    png = out / "mnist1d-noise0.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({png.name})" in table
    assert "estimated" in capsys.readouterr().out

    # a second invocation finds every run done and trains nothing
    before = (out / "runs.jsonl").read_text()
    res = bench_train.main(argv(tmp_path))
    assert res["ran"] == 0 and res["skipped"] == len(METHODS) * 2
    assert (out / "runs.jsonl").read_text() == before

    # an invocation killed after seed 0's measured runs, mid-way through writing the next line:
    # the rerun does exactly what is missing (seed 1, then both budget runs, cut with the new
    # seed-1 timings), keeps seed 0's records as they were, and ignores the torn line
    kept = lines(out / "runs.jsonl")[:5]
    assert [json.loads(x)["seed"] for x in kept] == [0] * 5
    (out / "runs.jsonl").write_text("\n".join(kept) + "\n" + kept[0][:40])
    res = bench_train.main(argv(tmp_path))
    assert res["ran"] == 7 and res["skipped"] == 5
    new_cut = res["experiments"]["mnist1d-noise0"]["budget_cuts"]["budget_es"]["epochs"]
    after = lines(out / "runs.jsonl")
    assert after[:5] == kept and after[5] == kept[0][:40] and len(after) == 5 + 1 + 7
    done = [json.loads(x) for x in after[6:]]
    assert [(r["method"], r["seed"]) for r in done] == [(m, 1) for m in METHODS[:5]] + [
        ("budget_es", 0), ("budget_es", 1)]
    assert all(r["config"]["budget_epochs"] == new_cut for r in done[5:])

    # killed after the last measured run, before the budget runs: only those two run, with the
    # cut the finished runs give
    measured = [x for x in after if x != after[5] and json.loads(x)["method"] != "budget_es"]
    assert len(measured) == 10
    (out / "runs.jsonl").write_text("\n".join(measured) + "\n")
    res = bench_train.main(argv(tmp_path))
    assert res["ran"] == 2 and res["skipped"] == 10
    assert res["experiments"]["mnist1d-noise0"]["budget_cuts"]["budget_es"]["epochs"] == new_cut


def test_dry_run_prints_the_plan_and_an_estimate(tmp_path: Path, capsys) -> None:
    res = bench_train.main(argv(tmp_path, "--all", "--dry-run", "--grid-seeds", "0"))
    printed = capsys.readouterr().out
    assert res["ran"] == 0 and not (tmp_path / "evidence" / "runs.jsonl").exists()
    # all = mnist1d at noise 0, 0.2, 0.4 + textlm + ratio {2, 4} + prune {0.2, 0.3, 0.5} + betas 4x3
    names = ["mnist1d-noise0", "textlm", "mnist1d-noise0.2", "mnist1d-noise0.4", "ratio-2",
             "ratio-4", "prune-0.2", "prune-0.3", "prune-0.5", "fix-schedule", "fix-epochs"]
    for name in names:
        assert f"  {name}: " in printed
    assert printed.count("  betas-") == 12
    assert res["estimate"]["runs"] > 0 and res["estimate"]["seconds"] > 0
    assert "estimated" in printed


def test_fixes_grid_runs_burn_in_anneal_and_a_longer_run(tmp_path: Path) -> None:
    # the fixes grid's two experiments, tiny: ES with burn-in/anneal shares uniform's runs with
    # the plain grid cell, the longer run trains --fix-epochs epochs; both get full tables
    extra = ["--grid", "fixes", "--grid-seeds", "0", "--fix-epochs", str(EPOCHS + 1),
             "--methods", "uniform,es,budget_es"]
    args = argv(tmp_path, *extra)
    args = args[2:]  # no main workload: the grid alone
    res = bench_train.main(args)
    runs = [json.loads(x) for x in lines(tmp_path / "evidence" / "runs.jsonl")]
    by = {(r["config"].get("epochs"), r["method"], r["config"].get("burn_in")): r for r in runs}
    # uniform once per epoch budget (burn-in/anneal do not key it), ES once per experiment
    assert sorted(r["method"] for r in runs) == ["budget_es"] * 2 + ["es"] * 2 + ["uniform"] * 2
    assert (EPOCHS, "es", 0.1) in by and (EPOCHS + 1, "es", 0.0) in by
    assert by[EPOCHS + 1, "uniform", None]["result"]["samples_backpropagated"] == (EPOCHS + 1) * TRAIN
    # fix-schedule differs from the main configuration: its uniform reference is its own run
    # (same machine conditions as its ES runs); fix-epochs' uniform differs by its epochs anyway
    assert by[EPOCHS, "uniform", None]["config"]["reference"] == "fix-schedule"
    assert "reference" not in by[EPOCHS, "es", 0.1]["config"]
    assert res["ran"] == 6
    tables = (tmp_path / "evidence" / "tables.md").read_text()
    assert "## Fixes tried" in tables and "(`fix-schedule`)" in tables and "(`fix-epochs`)" in tables
    assert "burn-in 0.1, anneal 0.1" in tables

    # bad fixes-grid settings are refused before anything runs, naming the flag
    for bad in (["--fix-burn-in", "0.7", "--fix-anneal", "0.5"], ["--fix-epochs", "0"]):
        with pytest.raises(SystemExit):
            bench_train.parse_args(args + bad)


def test_time_to_target() -> None:
    # the run-key rules are tested on their own in tests/test_bench_plan.py
    curve = [[1.0, 3.0], [2.0, 2.5], [3.0, 2.4]]
    assert time_to_target(curve, 2.5, higher=False) == 2.0
    assert time_to_target(curve, 2.0, higher=False) is None
    assert time_to_target(curve, 2.9, higher=True) == 1.0
