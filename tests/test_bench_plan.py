"""The planning rules of tools/bench_train.py on their own, no training: which configuration
fields key a run, the grids' own reference runs, what a resumed invocation still runs, the budget
cut arithmetic, the estimate, and how a planned run becomes the shared loop's settings."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))

from benchtrain import experiments as P  # noqa: E402
from benchtrain.run import RunLog, loop_config, loop_method  # noqa: E402

EPOCHS = 3


def experiments(tmp_path: Path, *extra: str) -> list[P.Experiment]:
    return P.plan(P.parse_args(["--m1d-epochs", str(EPOCHS), "--seeds", "0,1",
                                "--out", str(tmp_path), *extra]))


def by_name(exps: list[P.Experiment]) -> dict[str, P.Experiment]:
    return {e.name: e for e in exps}


def record(exp: P.Experiment, run: P.Run, wall: float) -> dict:
    """What runs.jsonl holds for ``run`` (the fields planning reads)."""
    return {"key": run.key, "workload": exp.workload, "method": run.method, "seed": run.seed,
            "config": run.config, "result": {"wall_clock_s": wall}, "run_s": wall}


def test_a_run_is_keyed_by_the_fields_its_method_uses(tmp_path: Path) -> None:
    cfg = by_name(experiments(tmp_path, "--workload", "mnist1d"))["mnist1d-noise0"].config
    data = {"train", "test", "noise", "data_seed", "epochs", "b", "lr", "threads", "workers"}
    es = {"beta1", "beta2", "burn_in", "anneal"}
    assert data <= set(cfg)
    expected = {
        "uniform": data, "uniform_B": data | {"B"}, "es": data | es | {"B"},
        "eswp": data | es | {"B", "eswp_ratio", "prune_anneal", "prune_burn_in_epochs"},
        "infobatch": data | {"infobatch_ratio", "prune_anneal"},
        "loss": data | {"B"}, "selective_backprop": data | {"B"}, "random": data | {"B"},
        "topk": data | {"B"},
        "budget_es": data | {"budget_epochs"}, "budget_eswp": data | {"budget_epochs"},
        "budget_infobatch": data | {"budget_epochs"},
        "budget_infobatch_es": data | {"budget_epochs"},
        "budget_eswp_rescale": data | {"budget_epochs"},
        # the variants: their own option, none of the others'
        "eswp_rescale": data | es | {"B", "eswp_ratio", "prune_anneal", "prune_burn_in_epochs",
                                     "rescale_min_keep"},
        "infobatch_es": data | {"beta1", "beta2", "infobatch_ratio", "prune_anneal"},
        "es_reweight": data | es | {"B"}, "es_fresh": data | es | {"B", "fresh_epochs"},
        "es_to_uniform": data | es | {"B", "b_ramp"}, "es_from_uniform": data | es | {"B", "b_ramp"},
        # the reference-score methods: the reference model keys only those that read it
        "rho": data | {"B", "ref_model"}, "rho_es": data | es | {"B", "ref_model"},
        "band_low": data | {"ref_model", "prune_keep"},
        "band_middle": data | {"ref_model", "prune_keep"},
        "prune_chance": data | {"ref_model"}, "budget_prune_chance": data | {"budget_epochs"},
        "band_high": data | {"ref_model", "prune_keep"}, "prune_random": data | {"prune_keep"},
        "budget_rho": data | {"budget_epochs"}, "budget_rho_es": data | {"budget_epochs"},
        "rs2": data | {"prune_keep"}, "budget_rs2": data | {"budget_epochs"},
        # the web stream's curation methods (prune-once; the oracle reads the side table)
        "oracle": data, "dedup_exact": data, "dedup_near": data,
        "ref_filter": data | {"ref_model"}, "dedup_filter": data | {"ref_model"},
        "budget_dedup_near": data | {"budget_epochs"},
        "budget_ref_filter": data | {"budget_epochs"},
        "budget_dedup_filter": data | {"budget_epochs"},
    }
    assert set(expected) == set(P.METHODS)
    for method, keys in expected.items():
        assert set(P.run_config(cfg, method)) == keys, method

    # a field changes the key of exactly the methods it enters
    key = lambda c, m, seed=0, budget=None: P.run_key(  # noqa: E731
        "mnist1d", m, seed, P.run_config(c, m, budget))
    for field_, value in [("beta1", 0.5), ("burn_in", 0.1), ("eswp_ratio", 0.5), ("B", 256),
                          ("infobatch_ratio", 0.3), ("prune_anneal", 0.5), ("lr", 1e-3),
                          ("noise", 0.2), ("threads", 2), ("rescale_min_keep", 0.2),
                          ("b_ramp", 0.5), ("fresh_epochs", 2.0), ("prune_keep", 0.3),
                          ("ref_model", {**cfg["ref_model"], "width": 8})]:
        other = {**cfg, field_: value}
        for method, keys in expected.items():
            changed = key(cfg, method, budget=1.5) != key(other, method, budget=1.5)
            assert changed == (field_ in keys), (field_, method)
    assert key(cfg, "es", seed=0) != key(cfg, "es", seed=1)
    assert key(cfg, "es") != P.run_key("textlm", "es", 0, P.run_config(cfg, "es"))
    assert key(cfg, "budget_es", budget=2.5) != key(cfg, "budget_es", budget=2.4)
    assert key(cfg, "budget_es", budget=2.5) != key(cfg, "budget_eswp", budget=2.5)


def test_grid_cells_that_differ_from_the_main_configuration_get_their_own_reference_runs(
        tmp_path: Path) -> None:
    exps = by_name(experiments(tmp_path, "--workload", "mnist1d", "--grid", "ratio", "--grid",
                               "prune", "--grid", "betas", "--grid", "fixes",
                               "--prune-ratios", "0.2,0.3", "--ratios", "2,4"))
    main = exps["mnist1d-noise0"]
    uniform = lambda e: P.planned_run(e, "uniform", 0).key  # noqa: E731
    # equal to the main configuration (B = 2b and the default ESWP ratio): the main runs
    for name in ("ratio-2", "prune-0.3"):
        assert "reference" not in exps[name].config and uniform(exps[name]) == uniform(main)
    # a cell that differs: its own uniform runs and budget controls, made under the same machine
    # conditions as the cell's own runs, keyed apart from the main table's
    for name in ("ratio-4", "prune-0.2", "fix-schedule"):
        assert exps[name].config["reference"] == name
        assert uniform(exps[name]) != uniform(main)
        assert "reference" not in P.planned_run(exps[name], "es", 0).config
    assert (P.planned_run(exps["ratio-4"], "budget_es", 0, 2.0).key
            != P.planned_run(main, "budget_es", 0, 2.0).key)
    # the betas cells differ from the main configuration only in ES's settings: uniform is shared
    betas = [e for e in exps.values() if e.group == "betas"]
    assert len(betas) == 12 and all(uniform(e) == uniform(main) for e in betas)
    assert len({P.planned_run(e, "es", 0).key for e in betas}) == 12
    # the longer fixes run differs in its epochs, which key every method
    assert uniform(exps["fix-epochs"]) != uniform(main)
    assert "reference" not in exps["fix-epochs"].config


def test_a_resumed_invocation_runs_exactly_what_is_not_recorded(tmp_path: Path) -> None:
    exp = by_name(experiments(tmp_path, "--workload", "mnist1d",
                              "--methods", "uniform,es,eswp,budget_es"))["mnist1d-noise0"]
    measured = P.measured_runs(exp)
    # seeds outermost, budget controls not among the measured runs
    assert [(r.method, r.seed) for r in measured] == [
        (m, s) for s in (0, 1) for m in ("uniform", "es", "eswp")]
    wall = {"uniform": 10.0, "es": 7.0, "eswp": 5.0}
    store = RunLog(tmp_path / "runs.jsonl")
    for run in measured[:4]:  # killed after seed 0's runs and seed 1's uniform
        store.add(record(exp, run, wall[run.method] + run.seed))
    # the next run's line torn by the kill: ignored on reading, that run redone
    with open(store.path, "a") as f:
        f.write(json.dumps(record(exp, measured[4], 8.0))[:30])
    records = RunLog(store.path).records
    assert set(records) == {r.key for r in measured[:4]}
    assert [r for r in measured if r.key not in records] == measured[4:]
    # the budget control waits for every seed of uniform and es ...
    assert P.budget_cuts(exp, records) == {} and P.budget_runs(exp, {}) == []
    est = P.estimate([exp], records, tmp_path / "no-data")
    assert est["runs"] == len(measured[4:]) + len(exp.seeds)
    # ... then is cut from them; a budget run recorded at another cut is not this one
    for run in measured[4:]:
        store.add(record(exp, run, wall[run.method] + run.seed))
    records = RunLog(store.path).records
    cuts = P.budget_cuts(exp, records)
    assert set(cuts) == {"budget_es"}
    assert cuts["budget_es"]["epochs"] == round(EPOCHS * 7.5 / 10.5, 3)
    budget = P.budget_runs(exp, cuts)
    assert [(r.method, r.seed, r.config["budget_epochs"]) for r in budget] == [
        ("budget_es", s, cuts["budget_es"]["epochs"]) for s in (0, 1)]
    store.add(record(exp, budget[0], 6.0))
    stale = P.planned_run(exp, "budget_es", 1, cuts["budget_es"]["epochs"] + 0.1)
    store.add(record(exp, stale, 6.0))
    records = RunLog(store.path).records
    assert [r for r in measured + budget if r.key not in records] == [budget[1]]
    assert P.estimate([exp], records, tmp_path / "no-data")["runs"] == 1
    # what the tables show: the recorded runs at the current cut, methods outermost
    shown = P.experiment_records(exp, records, cuts)
    assert [(r["method"], r["seed"]) for r in shown] == [
        (m, s) for m in ("uniform", "es", "eswp") for s in (0, 1)] + [("budget_es", 0)]


def test_budget_cut_arithmetic() -> None:
    def records(uniform: list[float], of: list[float], name: str = "es") -> list[dict]:
        return ([{"method": "uniform", "result": {"wall_clock_s": t}} for t in uniform]
                + [{"method": name, "result": {"wall_clock_s": t}} for t in of])

    cut = P.budget_cut(records([10.0, 12.0], [6.0, 8.0]), 10, "es")
    assert cut["epochs"] == round(10 * 7 / 11, 3) == 6.364 and not cut["capped"]
    assert cut["raw_epochs"] == pytest.approx(70 / 11)
    assert (cut["mean_train_s_of"], cut["mean_train_s_uniform"]) == (7.0, 11.0)
    # only the runs of `of` and uniform count
    assert P.budget_cut(records([10.0], [5.0]) + records([], [1.0], "eswp"), 4, "es")["epochs"] == 2.0
    # slower than uniform: capped at the full run
    slow = P.budget_cut(records([10.0], [13.0], "eswp"), 3, "eswp")
    assert slow["epochs"] == 3.0 and slow["capped"] and slow["raw_epochs"] == pytest.approx(3.9)


def test_estimate_counts_a_shared_run_once(tmp_path: Path) -> None:
    # the betas grid's uniform runs are the main table's: priced for the first experiment only
    exps = experiments(tmp_path, "--workload", "mnist1d", "--grid", "betas", "--beta1s", "0.2",
                       "--beta2s", "0.5,0.8", "--methods", "uniform,es", "--grid-seeds", "0")
    est = P.estimate(exps, {}, tmp_path / "no-data")
    parts = est["experiments"]
    assert parts["mnist1d-noise0"]["runs"] == 4           # uniform and es, seeds 0 and 1
    assert parts["betas-0.2-0.5"]["runs"] == 1            # its es; uniform seed 0 is shared
    assert parts["betas-0.2-0.8"]["runs"] == 0            # the main configuration's es, too
    assert est["runs"] == 5
    assert est["seconds"] == pytest.approx(sum(p["seconds"] for p in parts.values()))


def test_a_planned_run_becomes_the_loops_settings(tmp_path: Path) -> None:
    exp = by_name(experiments(tmp_path, "--workload", "mnist1d"))["mnist1d-noise0"]
    c = exp.config
    es = loop_config("es", 1, P.run_config(c, "es"), progress=False)
    assert (es.epochs, es.b, es.B, es.seed, es.budget_epochs) == (EPOCHS, c["b"], c["B"], 1, None)
    assert dict(es.es_options) == {k: c[k] for k in ("beta1", "beta2", "burn_in", "anneal")}
    assert loop_config("eswp", 0, P.run_config(c, "eswp"), False).eswp_ratio == c["eswp_ratio"]
    wide = loop_config("uniform_B", 0, P.run_config(c, "uniform_B"), False)
    assert wide.b == wide.B == c["B"] and loop_method("uniform_B") == "uniform"
    budget = loop_config("budget_es", 0, P.run_config(c, "budget_es", 2.4), False)
    assert (budget.epochs, budget.budget_epochs, budget.b) == (math.ceil(2.4), 2.4, c["b"])
    assert budget.horizon == 2.4 and loop_method("budget_es") == "uniform"


def test_the_variants_grid_shares_the_main_runs_and_gives_each_variant_its_options(
        tmp_path: Path) -> None:
    exps = by_name(experiments(tmp_path, "--workload", "mnist1d", "--grid", "variants",
                               "--b-ramp", "0.5", "--fresh-epochs", "2",
                               "--rescale-min-keep", "0.2"))
    main, variants = exps["mnist1d-noise0"], exps["variants"]
    assert not set(P.VARIANTS) & set(main.methods)  # the default --methods: the first evidence tables
    assert set(P.VARIANTS) <= set(variants.methods)
    for m in ("uniform", "es", "eswp", "infobatch", "random"):
        assert P.planned_run(variants, m, 0).key == P.planned_run(main, m, 0).key, m
    c = variants.config
    got = {m: loop_config(m, 0, P.run_config(c, m), False) for m in P.VARIANTS}
    assert got["es_to_uniform"].b_ramp == got["es_from_uniform"].b_ramp == 0.5
    assert got["es_fresh"].fresh_epochs == 2.0 and got["eswp_rescale"].rescale_min_keep == 0.2
    assert got["eswp_rescale"].eswp_ratio == c["eswp_ratio"]
    assert got["infobatch_es"].infobatch_ratio == c["infobatch_ratio"]
    assert dict(got["infobatch_es"].es_options) == {"beta1": c["beta1"], "beta2": c["beta2"]}
    with pytest.raises(SystemExit):
        experiments(tmp_path, "--grid", "variants", "--b-ramp", "0")


def test_the_recorded_evidence_still_covers_every_run_of_the_issue_7_plan() -> None:
    # new methods and options must not re-key a run already measured: `--all` (as BENCHMARKS.md
    # ran it) finds every run of its experiments other than the variants grid in
    # docs/evidence/runs.jsonl, nothing to redo
    store = RunLog(ROOT / "docs" / "evidence" / "runs.jsonl")
    if not store.records:
        pytest.skip("no recorded evidence runs in this checkout")
    args = P.parse_args(["--all", "--grid-seeds", "0,1", "--out", str(ROOT / "docs" / "evidence")])
    exps = [e for e in P.plan(args) if e.group != "variants"]
    runs = [r for e in exps for r in P.measured_runs(e) + P.budget_runs(
        e, P.budget_cuts(e, store.records))]
    assert len(runs) > 100 and all(r.key in store.records for r in runs)


def test_budget_infobatch_is_cut_to_infobatch_and_needs_it(tmp_path: Path) -> None:
    args = P.parse_args(["--workload", "mnist1d", "--methods", "uniform,infobatch,budget_infobatch",
                         "--out", str(tmp_path)])
    (exp,) = P.plan(args)
    assert "budget_infobatch" in exp.methods
    assert {r.method for r in P.cut_sources(exp, "budget_infobatch")} == {"uniform", "infobatch"}
    with pytest.raises(SystemExit):
        P.parse_args(["--workload", "mnist1d", "--methods", "uniform,budget_infobatch",
                      "--out", str(tmp_path)])


def test_reference_flags_key_only_the_methods_that_read_the_reference(tmp_path: Path) -> None:
    methods = "uniform,es,eswp,infobatch,rho,rho_es,band_low,band_middle,band_high,prune_random"
    base = by_name(experiments(tmp_path, "--workload", "mnist1d", "--methods", methods))
    other = by_name(experiments(tmp_path, "--workload", "mnist1d", "--methods", methods,
                                "--reference-heldout", "500", "--reference-width", "8",
                                "--reference-epochs", "3", "--reference-lr", "1e-3",
                                "--reference-seed", "7"))
    a, o = base["mnist1d-noise0"], other["mnist1d-noise0"]
    assert a.config["ref_model"] == {"heldout": 10000, "width": 16, "epochs": 10, "b": 64,
                                     "lr": 3e-3, "seed": 0, "data_seed": 1042}
    for run_a, run_o in zip(P.measured_runs(a), P.measured_runs(o)):
        assert (run_a.key != run_o.key) == (run_a.method in P.USES_REFERENCE), run_a.method
    # textlm's defaults are its own
    text = by_name(experiments(tmp_path, "--workload", "textlm", "--methods", "uniform,rho"))
    assert text["textlm"].config["ref_model"]["width"] == 64
    assert text["textlm"].config["ref_model"]["heldout"] == 4096
    # the new methods are opt-in: the default --methods is the first tables'
    assert not set(P.REFERENCE_METHODS) & set(P.parse_args(["--all"]).methods)


@pytest.mark.parametrize("flags, named", [
    (["--reference-epochs", "0"], "--reference-epochs"),
    (["--reference-heldout", "0"], "--reference-heldout"),
    (["--reference-seed", "42"], "--reference-seed"),
    (["--prune-keep", "0"], "--prune-keep"),
    (["--methods", "uniform,budget_rho"], "budget_rho"),
])
def test_bad_reference_flags_are_refused_naming_the_flag(
        tmp_path: Path, capsys: pytest.CaptureFixture, flags: list, named: str) -> None:
    with pytest.raises(SystemExit):
        P.parse_args(["--workload", "mnist1d", "--out", str(tmp_path), *flags])
    assert named in capsys.readouterr().err


def test_time_basis_rewrites_every_time_of_a_record_and_leaves_old_records_on_wall():
    from benchtrain.run import on_time_basis

    rec = {"key": "k", "result": {"wall_clock_s": 10.0, "cpu_s": 6.0, "curve": [[5.0, 0.5], [10.0, 0.9]],
                                  "cpu_curve": [[3.0, 0.5], [6.0, 0.9]], "reference_s": 2.0,
                                  "reference_cpu_s": 1.5, "train_wall_clock_s": 8.0}}
    cpu = on_time_basis(rec, "cpu")["result"]
    assert (cpu["wall_clock_s"], cpu["curve"], cpu["reference_s"]) == (6.0, [[3.0, 0.5], [6.0, 0.9]], 1.5)
    assert cpu["train_wall_clock_s"] == 4.5 and cpu["measured_wall_clock_s"] == 10.0
    assert cpu["time_basis"] == "cpu" and rec["result"]["wall_clock_s"] == 10.0  # not mutated
    wall = on_time_basis(rec, "wall")["result"]
    assert (wall["wall_clock_s"], wall["time_basis"]) == (10.0, "wall")
    old = {"key": "o", "result": {"wall_clock_s": 7.0, "curve": [[7.0, 0.8]]}}
    assert on_time_basis(old, "cpu")["result"]["time_basis"] == "wall"
    assert on_time_basis(old, "cpu")["result"]["wall_clock_s"] == 7.0
    with pytest.raises(ValueError, match="time basis"):
        on_time_basis(rec, "gpu")
