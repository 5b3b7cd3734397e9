"""Reporting of ``tools/bench_train.py``: per-experiment statistics over seeds (time-to-target,
ratios to uniform, the lossless flag, the scoring forward's cost), the summary entries of
``summary.json``, the markdown tables of ``tables.md`` and the plots."""

from __future__ import annotations

import datetime
import math
import statistics
from pathlib import Path
from typing import Any

from es_stream.atomic import atomic_write
from pipelines import methods as registry
from pipelines.report import plot_curves
from pipelines.report import stats as _stats

from .experiments import Experiment
from .run import machine

#: table labels of the methods (the others are shown by name)
LABELS = registry.labels()


# ----------------------------------------------------------------------------- summaries
def time_to_target(curve: list[list[float]], target: float, higher: bool) -> float | None:
    """Training wall-clock of the first evaluation at or beyond ``target`` (None: never)."""
    for t, q in curve:
        if (q >= target) if higher else (q <= target):
            return t
    return None


def plateau(curves: list[list[list[float]]], window: int) -> float:
    """Uniform's plateau quality: the mean over seeds of the mean of each seed's last ``window``
    evaluations (all of a shorter curve). Averaging over the window, not reading the final
    evaluation alone, keeps one lucky or unlucky last evaluation from setting the target."""
    if window < 1 or not curves or not all(curves):
        raise ValueError(f"a plateau needs window >= 1 and non-empty curves, got window "
                         f"{window} and {len(curves)} curve(s)")
    return statistics.fmean(statistics.fmean(q for _, q in c[-window:]) for c in curves)


def learned_by_epoch(runs: list[dict[str, Any]]) -> list[float] | None:
    """The mean over ``runs`` (results) of each epoch's ``learned_fraction``, over the epochs
    every run has (None when a run did not record it: runs from before it was measured)."""
    fractions = [r.get("learned_fraction") for r in runs]
    if not fractions or any(not f for f in fractions):
        return None
    return [statistics.fmean(f[i] for f in fractions) for i in range(min(map(len, fractions)))]


def summarize(exp: Experiment, records: list[dict[str, Any]], tolerance: float) -> dict[str, Any]:
    """Per method: stats over seeds, time-to-target, ratios to uniform, the lossless flag, the
    per-epoch fraction of samples already learned (where recorded) and, for an experiment with
    a ``plateau_window``, the time to uniform's plateau (:func:`plateau`)."""
    uniform = [r for r in records if r["method"] == "uniform"]
    if not uniform:
        return {"methods": {}, "target": None}
    higher = uniform[0]["result"]["higher_is_better"]
    u_final = _stats([r["result"]["final"] for r in uniform])
    target = u_final["mean"] - tolerance if higher else u_final["mean"] + tolerance
    rows: dict[str, Any] = {}
    for method in exp.methods:
        rs = [r["result"] for r in records if r["method"] == method]
        if not rs:
            continue
        row: dict[str, Any] = {"seeds": [r["seed"] for r in records if r["method"] == method]}
        for k in ("wall_clock_s", "samples_forwarded", "samples_backpropagated", "final", "best",
                  "epochs"):
            row[k] = _stats([float(r[k]) for r in rs])
        ttt = [time_to_target(r["curve"], target, higher) for r in rs]
        reached = [t for t in ttt if t is not None]
        row["time_to_target_s"] = {"per_seed": ttt, "reached": len(reached), "of": len(rs),
                                   "mean": statistics.fmean(reached) if reached else None}
        exact = [time_to_target(r["curve"], u_final["mean"], higher) for r in rs]
        row["time_to_uniform_mean_final_s"] = {
            "per_seed": exact, "reached": sum(t is not None for t in exact), "of": len(rs)}
        worse = (u_final["mean"] - row["final"]["mean"]) if higher else (row["final"]["mean"] - u_final["mean"])
        row["lossless"] = worse <= u_final["std"]
        row["final_minus_uniform"] = row["final"]["mean"] - u_final["mean"]
        learned = learned_by_epoch(rs)
        if learned is not None:
            row["learned_fraction"] = learned
        if all("backpropagated_by_kind" in r for r in rs):   # the web stream's side table
            row.update(kinds_summary(rs))
        if any("reference_s" in r for r in rs):   # included in wall_clock_s and the curves
            for k in ("reference_s", "reference_train_s", "reference_score_s"):
                row[k] = _stats([float(r.get(k, 0.0)) for r in rs])
        rows[method] = row
    plateau_entry = None
    if exp.plateau_window:
        value = plateau([r["result"]["curve"] for r in uniform], exp.plateau_window)
        plateau_entry = {"window": exp.plateau_window, "value": value,
                         "target": value - tolerance if higher else value + tolerance}
        for method, row in rows.items():
            ttp = [time_to_target(r["result"]["curve"], plateau_entry["target"], higher)
                   for r in records if r["method"] == method]
            reached = [t for t in ttp if t is not None]
            row["time_to_plateau_s"] = {"per_seed": ttp, "reached": len(reached), "of": len(ttp),
                                        "mean": statistics.fmean(reached) if reached else None}
    u = rows["uniform"]
    for row in rows.values():
        ratio = {}
        for k in ("wall_clock_s", "samples_forwarded", "samples_backpropagated", "final", "best"):
            ratio[k] = row[k]["mean"] / u[k]["mean"] if u[k]["mean"] else None
        for k in ("time_to_target_s", "time_to_plateau_s"):
            if k in row:
                a, b = row[k]["mean"], u[k]["mean"]
                ratio[k] = a / b if a is not None and b else None
        row["ratio_to_uniform"] = ratio
    out = {"methods": rows, "target": target, "tolerance": tolerance, "higher_is_better": higher,
           "quality": uniform[0]["result"]["quality"], "scoring_cost": scoring_cost(exp, rows)}
    if plateau_entry is not None:
        out["plateau"] = plateau_entry
    start = uniform[0]["result"].get("start")
    if start is not None:   # fine-tuning: what the pre-trained model knew of the target
        out["start"] = start
    return out


def kinds_summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over seeds of what a web-stream run trained on: ``trained_share`` (share of the
    back-propagated samples of each kind), ``kept_share`` (a prune-once method: share of each
    kind's samples it kept), ``final_metrics`` (held-out bits per byte per kind)."""
    def mean_of(dicts: list[dict[str, float]]) -> dict[str, float]:
        return {k: statistics.fmean(d[k] for d in dicts) for k in dicts[0]}

    trained = [{k: v / max(1, sum(r["backpropagated_by_kind"].values()))
                for k, v in r["backpropagated_by_kind"].items()} for r in results]
    out: dict[str, Any] = {"trained_share": mean_of(trained)}
    if all("kept_by_kind" in r and "samples_by_kind" in r for r in results):
        out["kept_share"] = mean_of([{k: v / max(1, r["samples_by_kind"][k])
                                      for k, v in r["kept_by_kind"].items()} for r in results])
    if all("final_metrics" in r for r in results):
        out["final_metrics"] = mean_of([r["final_metrics"] for r in results])
    return out


def web_goals(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per method of a web-stream experiment, the goals' figures: ``time_ratio`` (mean over
    seeds of the time at which it first reached uniform's mean final bits/byte, over uniform's
    mean time; None when a seed never did), ``ahead_of_control`` (its budget control's mean
    final minus its own) against ``twice_spread`` (twice the larger std of the two), and
    ``gap_closed`` ((control - method) / (control - oracle)). Without a control, uniform stands
    in (a method whose cost is uniform's, such as the oracle's, is its own control)."""
    rows = summary["methods"]
    if "uniform" not in rows:
        return {}
    u_time = rows["uniform"]["wall_clock_s"]["mean"]
    oracle = rows.get("oracle", {}).get("final", {}).get("mean")
    out = {}
    for m, row in rows.items():
        if m.startswith(registry.BUDGET_PREFIX):
            continue
        t = row["time_to_uniform_mean_final_s"]["per_seed"]
        control = rows.get(registry.BUDGET_PREFIX + m, rows["uniform"])
        c, f = control["final"], row["final"]
        ahead = c["mean"] - f["mean"]
        g = {"time_ratio": (statistics.fmean(t) / u_time if all(x is not None for x in t)
                            else None),
             "control": (registry.BUDGET_PREFIX + m) if control is not rows["uniform"]
             else "uniform", "ahead_of_control": ahead,
             "twice_spread": 2 * max(c["std"], f["std"]),
             # the share of the control-to-oracle gap closed; None where the control is at or
             # past the oracle (no gap to close)
             "gap_closed": (ahead / (c["mean"] - oracle)
                            if oracle is not None and c["mean"] > oracle else None)}
        g["met"] = {"time": g["time_ratio"] is not None and g["time_ratio"] <= 0.5,
                    "ahead": ahead > g["twice_spread"],
                    "gap": g["gap_closed"] is not None and g["gap_closed"] >= 0.8}
        out[m] = g
    return out


def web_table(entry: dict[str, Any]) -> str:
    """The web stream's second table: per method, what it kept and trained on of each kind, the
    held-out bits/byte per kind, and the goals' figures (:func:`web_goals`)."""
    s = entry["summary"]
    rows = s.get("methods", {})
    if not rows or "trained_share" not in rows.get("uniform", {}):
        return ""
    kinds = list(rows["uniform"]["trained_share"])
    short = {"clean": "clean", "html": "html", "binary": "bin", "base64": "b64",
             "exact_dup": "exact", "near_dup": "near", "template": "tmpl", "random": "rand"}
    goals = web_goals(s)
    head = (["method", "× unif time", "to unif final × unif", "ahead of control (2×spread)",
             "gap closed"] + [f"kept {short.get(k, k)}" for k in kinds]
            + [f"trained {short.get(k, k)}" for k in kinds]
            + [f"bpb {short.get(k, k)}" for k in kinds])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, row in rows.items():
        g = goals.get(m)
        cells = [LABELS.get(m, m), _x(row["ratio_to_uniform"]["wall_clock_s"])]
        if g is None:
            cells += ["", "", ""]
        else:
            cells += [_x(g["time_ratio"]) if g["time_ratio"] is not None else "never (some seed)",
                      f"{g['ahead_of_control']:+.4f} vs {g['control']} "
                      f"({g['twice_spread']:.4f})",
                      "— (control at or past the oracle)" if g["gap_closed"] is None
                      else f"{100 * g['gap_closed']:.0f}%"]
        kept = row.get("kept_share")
        cells += [f"{100 * kept[k]:.0f}%" if kept else "all" for k in kinds]
        cells += [f"{100 * row['trained_share'][k]:.0f}%" for k in kinds]
        fm = row.get("final_metrics", {})
        cells += [f"{fm[f'bpb_{k}']:.2f}" if f"bpb_{k}" in fm else "—" for k in kinds]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def scoring_cost(exp: Experiment, rows: dict[str, Any]) -> dict[str, float] | None:
    """What the no-grad scoring forward costs, read off the random control's wall-clock.

    Random forwards all n samples and trains n b/B of them in n/B steps; uniform trains n in n/b
    steps. With F the time of a scoring forward per sample and T uniform's training time per
    sample (per-step overheads included), ``random / uniform = F/T + b/B``, so
    ``F/T = random/uniform - b/B``. The paper's cost model takes F/T ~ 1/3 (a forward against a
    forward + backward ~ 1 + 2); a smaller F/T means a cheaper scoring forward than assumed.
    ``selection_overhead`` is ES's wall-clock over random's: what scoring and choosing by ES
    adds to choosing at random (same forwards, same backprops)."""
    if "random" not in rows or "uniform" not in rows:
        return None
    r = rows["random"]["wall_clock_s"]["mean"] / rows["uniform"]["wall_clock_s"]["mean"]
    frac = exp.config["b"] / exp.config["B"]
    out = {"random_over_uniform": r, "b_over_B": frac, "forward_over_train_per_sample": r - frac}
    if "es" in rows:
        out["selection_overhead"] = (rows["es"]["wall_clock_s"]["mean"]
                                     / rows["random"]["wall_clock_s"]["mean"])
    return out


def _pm(stats: dict[str, float], digits: int) -> str:
    if not stats["std"]:
        return f"{stats['mean']:.{digits}f}"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def _x(ratio: float | None) -> str:
    return "—" if ratio is None else f"{ratio:.2f}x"


def markdown_table(entry: dict[str, Any]) -> str:
    """The markdown table of one experiment's summary entry."""
    s = entry["summary"]
    if not s.get("methods"):
        return "(no uniform run yet)"
    q = "acc" if s["higher_is_better"] else "bpb"
    # the reference model's cost, a column of its own where a method paid one (it is also in
    # "train s" and "to target s": the reference is trained and scored before the first step)
    has_ref = any("reference_s" in row for row in s["methods"].values())
    head = ["method", "seeds", "train s", "× unif", "forwarded", "× unif", "backprop", "× unif",
            f"final {q}", f"best {q}", "to target s", "× unif", "lossless"]
    if has_ref:
        head.insert(3, "of it ref s")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    digits = 4
    for m, row in s["methods"].items():
        r, t = row["ratio_to_uniform"], row["time_to_target_s"]
        tt = "never" if t["mean"] is None else f"{t['mean']:.1f} ({t['reached']}/{t['of']})"
        cells = [
            LABELS.get(m, m), str(len(row["seeds"])), _pm(row["wall_clock_s"], 1),
            _x(r["wall_clock_s"]), f"{row['samples_forwarded']['mean']:,.0f}",
            _x(r["samples_forwarded"]), f"{row['samples_backpropagated']['mean']:,.0f}",
            _x(r["samples_backpropagated"]), _pm(row["final"], digits), _pm(row["best"], digits),
            tt, _x(r["time_to_target_s"]), "yes" if row["lossless"] else "no"]
        if has_ref:
            cells.insert(3, f"{row['reference_s']['mean']:.1f}" if "reference_s" in row else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_entry(exp: Experiment, records: list[dict[str, Any]], cuts: dict[str, Any],
                  tolerance: float, command: str) -> dict[str, Any]:
    """The entry of ``exp`` in summary.json: its configuration, budget cuts, command, machine,
    summary (:func:`summarize`) and run keys."""
    return {"name": exp.name, "title": exp.title, "workload": exp.workload, "group": exp.group,
            "cell": exp.cell, "config": exp.config, "methods": exp.methods, "seeds": exp.seeds,
            "budget_cuts": cuts, "command": command, "machine": machine(),
            "updated": datetime.datetime.now().isoformat(timespec="seconds"),
            "train_samples": records[0]["result"].get("train_samples") if records else None,
            "summary": summarize(exp, records, tolerance),
            "time_basis": sorted({r["result"].get("time_basis", "wall") for r in records}),
            "runs": [r["key"] for r in records]}


def _time_basis_line(bases: list[str]) -> str:
    """What the seconds of an experiment's table are (see ``benchtrain.run.on_time_basis``)."""
    if bases == ["cpu"]:
        return ("times: CPU seconds of the training process (its wall-clock on an idle core; "
                "much less inflated by other load than wall-clock, not immune to it)")
    if bases == ["wall"]:
        return "times: wall-clock seconds as measured"
    return ("times: MIXED — some runs on CPU seconds, some (recorded before CPU time was) on "
            "wall-clock; compare with care")


def describe(entry: dict[str, Any]) -> str:
    """The bullet list above an experiment's table: configuration, target, scoring cost, budget
    cuts, machine and command."""
    c, s = entry["config"], entry["summary"]
    if entry["workload"] == "mnist1d":
        model = "1D CNN fine-tuned from a pre-trained one" if "pretrain" in c else "1D CNN"
        what = (f"{c['train']} train / {c['test']} test samples, noise {c['noise']:g}, {model}, "
                f"{c['epochs']} epochs, Adam {c['lr']:g} cosine, b = {c['b']}, B = {c['B']}")
    elif entry["workload"] == "webtext":
        n = entry.get("train_samples")
        what = (f"{c['arch']} LM (hidden {c['hidden']}, embedding {c['embed']}), a web-like "
                f"stream of {n} samples of {c['seq_len']} B ({c['mixture']} mixture, builder "
                f"seed {c['data_seed']}); budget {c['passes']:g} pass(es) of uniform over it = "
                f"{math.ceil(c['passes'] * n / c['b'])} steps of b = {c['b']} for every method "
                f"(B = {c['B']} read per step by the selecting ones), Adam {c['lr']:g} cosine; "
                f"quality: clean held-out bits/byte on {c['eval_sequences']} sequences "
                f"({c['evals_per_run']} evaluations per run)")
    else:
        n = entry.get("train_samples")
        size = (f"{n} train sequences = {n * c['seq_len'] / 2**20:.2f} MiB" if n else
                f"{c['train_mb']:g} MiB of train shards")
        what = (f"{c['arch']} LM (hidden {c['hidden']}, {c['layers']} layer), sequences of "
                f"{c['seq_len']} B, {size}, {c['epochs']} epochs, "
                f"Adam {c['lr']:g} cosine, b = {c['b']}, B = {c['B']}, "
                f"{c['eval_sequences']} held-out sequences evaluated")
    what += (f"; ES beta1 {c['beta1']:g}, beta2 {c['beta2']:g}, burn-in {c['burn_in']:g}, "
             f"anneal {c['anneal']:g}; ESWP ratio {c['eswp_ratio']:g}; InfoBatch ratio "
             f"{c['infobatch_ratio']:g}; {c['threads']} torch thread(s), {c['workers']} workers")
    lines = [what, _time_basis_line(entry.get("time_basis", ["wall"]))]
    if s.get("target") is not None:
        sign = "minus" if s["higher_is_better"] else "plus"
        lines.append(f"target = uniform's mean final {s['quality']} {sign} {s['tolerance']:g} "
                     f"= {s['target']:.4f}")
    sc = s.get("scoring_cost")
    if sc:
        lines.append(f"scoring forward per sample = {sc['forward_over_train_per_sample']:.2f} of "
                     f"uniform's training time per sample (random / uniform wall-clock "
                     f"{sc['random_over_uniform']:.2f} minus b/B {sc['b_over_B']:.2f}; the paper's "
                     f"cost model assumes ~0.33)"
                     + (f"; ES / random wall-clock {sc['selection_overhead']:.2f}"
                        if "selection_overhead" in sc else ""))
    p = s.get("plateau")
    if p:
        lines.append(f"plateau = mean over uniform's seeds of its last {p['window']} evaluations "
                     f"= {p['value']:.4f}; time to plateau: first evaluation at or beyond "
                     f"{p['target']:.4f} (plateau {'minus' if s['higher_is_better'] else 'plus'} "
                     f"{s['tolerance']:g})")
    st = s.get("start")
    if st:
        pre = c["pretrain"]
        lines.append(f"pre-trained once on {st['source_train_samples']} source samples (classes "
                     f"{','.join(map(str, pre['classes']))}, generation seed "
                     f"{pre['source_seed']}), {pre['epochs']} epochs, Adam {pre['lr']:g}: "
                     f"{st['pretrain_s']:.1f} s of training ({st['pretrain_total_s']:.1f} s with "
                     f"its data), source test accuracy {st['source_acc']:.4f}, counted in no "
                     f"method's wall-clock; at the start of fine-tuning: target test accuracy "
                     f"{st['test_acc']:.4f}, target train samples classified correctly "
                     f"{st['correct']:.3f}, with loss below ln 2 {st['learned']:.3f}")
    refs = {m: row for m, row in s.get("methods", {}).items() if "reference_s" in row}
    if refs:
        row = next(iter(refs.values()))
        ref = c["ref_model"]
        if entry["workload"] == "webtext":
            lines.append(
                f"reference model: a GRU of hidden size {ref['width']} trained on a clean seed set "
                f"of {c['ref_model']['heldout']} windows of unused train text for "
                f"{c['ref_model']['epochs']} epochs in {row['reference_train_s']['mean']:.1f} s; "
                f"the stream scored (and 512 clean validation windows, the filter's bound: "
                f"the {c['filter_quantile']:g} quantile of their losses) in "
                f"{row['reference_score_s']['mean']:.1f} s; counted in full in the time of "
                f"{', '.join(refs)}; random pruning keeps {c['prune_keep']:g}")
        else:
            lines.append(f"reference model (RHO-LOSS's protocol: a held-out split with the same label "
                       f"noise, no clean label): {ref['heldout']} held-out samples, width "
                       f"{ref['width']}, {ref['epochs']} epochs; trained in "
                       f"{row['reference_train_s']['mean']:.1f} s and the corpus scored in "
                       f"{row['reference_score_s']['mean']:.1f} s, counted in full in the time "
                       f"(and time to target) of {', '.join(refs)}; the bands and random pruning "
                       f"keep {c['prune_keep']:g} of the corpus, decided once, and train "
                       f"{c['epochs']} epochs over it (the same training compute for each)")
    for m, cut in entry["budget_cuts"].items():
        if "passes" in c:
            lines.append(f"{m}: {cut['epochs']:.4f} passes = {c['passes']:g} x "
                         f"{cut['mean_train_s_of']:.2f} s ({cut['of']}) / "
                         f"{cut['mean_train_s_uniform']:.2f} s (uniform)")
            continue
        lines.append(f"{m}: {cut['epochs']:.3f} epochs = {c['epochs']} x {cut['mean_train_s_of']:.2f} s "
                     f"({cut['of']}) / {cut['mean_train_s_uniform']:.2f} s (uniform)"
                     + (" (capped: slower than uniform)" if cut["capped"] else ""))
    m = entry["machine"]
    lines.append(f"machine: {m['cpu']}, {m['host_cpus']} CPUs, Python {m['python']}, torch "
                 f"{m['torch']}; command: `{entry['command']}`")
    return "\n".join(f"- {x}" for x in lines)


def diagnostics_table(entry: dict[str, Any]) -> str:
    """The regimes' second table: per method, the final quality's distance to uniform's, the
    fraction of samples already learned (loss below the workload's threshold, over the samples
    read) in the first, middle and last epoch, and the time to uniform's plateau where there is
    one. With the scoring forward's cost (in :func:`describe`), what decides whether selection
    can pay: a cheap scoring forward and many samples already learned."""
    s = entry["summary"]
    if not s.get("methods"):
        return "(no uniform run yet)"
    has_plateau = "plateau" in s
    head = ["method", "final − uniform", "learned: first epoch", "middle epoch", "last epoch"]
    if has_plateau:
        head += ["to plateau s", "× unif"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, row in s["methods"].items():
        learned = row.get("learned_fraction")
        cells = [LABELS.get(m, m), f"{row['final_minus_uniform']:+.4f}"]
        cells += (["—"] * 3 if not learned else
                  [f"{learned[0]:.3f}", f"{learned[(len(learned) - 1) // 2]:.3f}",
                   f"{learned[-1]:.3f}"])
        if has_plateau:
            t = row["time_to_plateau_s"]
            cells += ["never" if t["mean"] is None else f"{t['mean']:.1f} ({t['reached']}/{t['of']})",
                      _x(row["ratio_to_uniform"].get("time_to_plateau_s"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _time_to_uniform_final(row: dict[str, Any], uniform_s: float) -> float | None:
    """Mean over the seeds that reached uniform's mean final quality of the wall-clock to it, as
    a fraction of uniform's mean wall-clock (None: no seed reached it)."""
    reached = [t for t in row["time_to_uniform_mean_final_s"]["per_seed"] if t is not None]
    return statistics.fmean(reached) / uniform_s if reached and uniform_s else None


def goals_table(entries: dict[str, dict[str, Any]]) -> list[str]:
    """The goals of the reference-score methods, per main experiment that ran a reference method,
    one row per method. Label noise (an MNIST-1D experiment at noise p > 0, with the clean one
    in ``entries``): the fraction of the accuracy noise costs uniform that the method wins back,
    ``(final - uniform_p) / (uniform_0 - uniform_p)``, and the wall-clock (reference included)
    to reach uniform_p's mean final accuracy over uniform_p's; met when >= 0.5 and <= 0.6x.
    Clean MNIST-1D and the byte LM: lossless and <= 0.8x of uniform's wall-clock. The bands
    also against random pruning at the same keep (final minus prune_random's)."""
    from .experiments import REFERENCE_METHODS

    main = [e for e in entries.values() if e["group"] == "main"
            and any(m in REFERENCE_METHODS for m in e["summary"].get("methods", {}))]
    if not main:
        return []
    clean = {e["config"]["train"]: e for e in entries.values() if e["group"] == "main"
             and e["workload"] == "mnist1d" and e["config"]["noise"] == 0
             and "uniform" in e["summary"].get("methods", {})}
    head = ["experiment", "method", "final − uniform", "noise cost won back",
            "to uniform's final × unif", "vs random pruning", "goal"]
    out = ["## Goals (reference scores)", "",
           "Noise: won back >= 0.5 of the accuracy label noise costs uniform and uniform's final "
           "accuracy in <= 0.6x its wall-clock (reference included). Clean MNIST-1D and the byte "
           "LM: lossless in <= 0.8x. Bands: final minus random pruning's at the same keep.", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in main:
        rows = e["summary"]["methods"]
        u = rows.get("uniform")
        if u is None:
            continue
        noisy = e["workload"] == "mnist1d" and e["config"]["noise"] > 0
        ref = clean.get(e["config"]["train"]) if noisy else None
        cost = (ref["summary"]["methods"]["uniform"]["final"]["mean"] - u["final"]["mean"]
                if ref is not None else None)
        for m, row in rows.items():
            if m == "uniform":
                continue
            ratio = _time_to_uniform_final(row, u["wall_clock_s"]["mean"])
            won = row["final_minus_uniform"] / cost if cost and cost > 0 else None
            if noisy:
                met = won is not None and won >= 0.5 and ratio is not None and ratio <= 0.6
            else:
                met = row["lossless"] and row["ratio_to_uniform"]["wall_clock_s"] <= 0.8
            rnd = rows.get("prune_random")
            vs = (f"{row['final']['mean'] - rnd['final']['mean']:+.4f}"
                  if m.startswith("band_") and rnd is not None else "")
            out.append("| " + " | ".join([
                e["name"], LABELS.get(m, m), f"{row['final_minus_uniform']:+.4f}",
                "—" if won is None else f"{won:.2f}", _x(ratio), vs,
                "yes" if met else "no"]) + " |")
    out.append("")
    return out


def grid_tables(entries: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown for the grids: B/b and pruning-ratio rows, the betas matrix."""
    out = []
    ratio = sorted((e for e in entries.values() if e["group"] == "ratio"),
                   key=lambda e: e["cell"]["ratio"])
    if ratio:
        out += ["## Grid: B/b", "", "b fixed; B = ratio x b. Each cell as in the main tables.", ""]
        head = ["B/b", "method", "train s", "× unif", "final acc", "to target s", "× unif", "lossless"]
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for e in ratio:
            for m, row in e["summary"].get("methods", {}).items():
                t = row["time_to_target_s"]
                out.append("| " + " | ".join([
                    str(e["cell"]["ratio"]), LABELS.get(m, m), _pm(row["wall_clock_s"], 1),
                    _x(row["ratio_to_uniform"]["wall_clock_s"]), _pm(row["final"], 4),
                    "never" if t["mean"] is None else f"{t['mean']:.1f} ({t['reached']}/{t['of']})",
                    _x(row["ratio_to_uniform"]["time_to_target_s"]),
                    "yes" if row["lossless"] else "no"]) + " |")
        out.append("")
    prune = sorted((e for e in entries.values() if e["group"] == "prune"),
                   key=lambda e: e["cell"]["eswp_ratio"])
    if prune:
        out += ["## Grid: ESWP pruning ratio", ""]
        head = ["ratio", "train s", "× unif", "forwarded × unif", "final acc", "to target s",
                "× unif", "lossless"]
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for e in prune:
            row = e["summary"].get("methods", {}).get("eswp")
            if row is None:
                continue
            t = row["time_to_target_s"]
            out.append("| " + " | ".join([
                f"{e['cell']['eswp_ratio']:g}", _pm(row["wall_clock_s"], 1),
                _x(row["ratio_to_uniform"]["wall_clock_s"]),
                _x(row["ratio_to_uniform"]["samples_forwarded"]), _pm(row["final"], 4),
                "never" if t["mean"] is None else f"{t['mean']:.1f} ({t['reached']}/{t['of']})",
                _x(row["ratio_to_uniform"]["time_to_target_s"]),
                "yes" if row["lossless"] else "no"]) + " |")
        out.append("")
    betas = [e for e in entries.values() if e["group"] == "betas"]
    if betas:
        b1s = sorted({e["cell"]["beta1"] for e in betas})
        b2s = sorted({e["cell"]["beta2"] for e in betas})
        cell = {(e["cell"]["beta1"], e["cell"]["beta2"]): e for e in betas}
        u = next((e["summary"]["methods"]["uniform"] for e in betas
                  if "uniform" in e["summary"].get("methods", {})), None)
        out += ["## Grid: ES beta1 x beta2 (final test accuracy of ES, mean ± std over seeds)", ""]
        if u is not None:
            out += [f"uniform (b): {_pm(u['final'], 4)}. Heat map: `betas_heatmap.png`.", ""]
        out += ["| beta1 \\ beta2 | " + " | ".join(f"{b:g}" for b in b2s) + " |",
                "|" + "---|" * (len(b2s) + 1)]
        for b1 in b1s:
            vals = []
            for b2 in b2s:
                row = cell.get((b1, b2), {}).get("summary", {}).get("methods", {}).get("es")
                vals.append("—" if row is None else _pm(row["final"], 4))
            out.append(f"| {b1:g} | " + " | ".join(vals) + " |")
        out.append("")
    return out


def write_tables(out: Path, entries: dict[str, dict[str, Any]]) -> Path:
    """Write ``out/tables.md``: every main and fixes experiment's table, then the grids."""
    lines = ["# Training benchmarks: ES, ESWP and peers against uniform training", "",
             "Written by `tools/bench_train.py` from `runs.jsonl` (see its docstring for the "
             "definitions). Times are training wall-clock in seconds, evaluation excluded; "
             "mean ± std over seeds; `× unif` is the ratio of means to uniform (b). "
             "`to target s`: mean over the seeds that reached the target (how many, of how many).",
             ""]
    def section(e: dict[str, Any], heading: str) -> list[str]:
        out = [f"{heading} {e['title']} (`{e['name']}`)", "", describe(e), "", markdown_table(e), ""]
        if e.get("plot"):
            out += [f"![{e['name']}]({Path(e['plot']).name})", ""]
        return out

    for e in entries.values():
        if e["group"] == "main":
            lines += section(e, "##")
    fixes = [e for e in entries.values() if e["group"] == "fixes"]
    if fixes:
        lines += ["## Fixes tried", ""]
    for e in fixes:
        lines += section(e, "###")
    # groups whose tables each get a second table below them: (group, title, intro, table)
    for group, title, intro, extra in (
            ("regimes", "## Regimes",
             "Below each table: the final quality's distance to uniform's, the fraction of "
             "the samples read that were already learned (loss below ln 2: classified "
             "correctly / under 1 bit per byte) in the first, middle and last epoch, and "
             "the time to uniform's plateau where there is one.", diagnostics_table),
            ("web", "## The web-like stream",
             "Below each table: per method, the share of each kind's samples it kept "
             "(prune-once methods), the share of each kind among the samples it trained "
             "on, the held-out bits/byte per kind, and the goals' figures: time to "
             "uniform's final bits/byte over uniform's time, lead over the budget-matched "
             "control (uniform where the method has none) against twice the seeds' "
             "spread, and the share of the control-to-oracle gap closed.", web_table)):
        chosen = [e for e in entries.values() if e["group"] == group]
        if chosen:
            lines += [title, "", intro, ""]
        for e in chosen:
            sec = section(e, "###")
            lines += sec[:6] + [extra(e), ""] + sec[6:]
    for e in entries.values():
        if e["group"] == "variants":
            lines += section(e, "##")
    lines += goals_table(entries)
    lines += grid_tables(entries)
    path = out / "tables.md"
    write_text(path, "\n".join(lines))
    return path


def write_text(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` atomically: the next invocation reads summary.json back, so a
    kill mid-write must leave the old file, not half of the new one."""
    with atomic_write(path) as tmp:
        Path(tmp).write_text(text)


# ----------------------------------------------------------------------------- plots
#: a method whose mean final is this many tolerances beyond the target is left off the zoomed
#: quality axis of an experiment's plot (and named in its title)
OFF_AXIS_TOLERANCES = 25


def plot_experiment(exp: Experiment, records: list[dict[str, Any]], summary: dict[str, Any],
                    path: Path) -> None:
    """Quality against training wall-clock through :func:`pipelines.report.plot_curves` (one
    plotting implementation: mean over seeds, min..max band, each evaluation a dot), with the
    target dashed and the axis zoomed on the finals' neighbourhood."""
    runs = [{"method": r["method"], "curve": r["result"]["curve"],
             "time_basis": r["result"].get("time_basis", "wall")} for r in records]
    ylim, title = None, exp.title
    if summary.get("target") is not None:
        # zoom on the interesting range: from a bit below the target's neighbourhood, leaving
        # off the axis a method that ends far from it (one collapsed method would otherwise
        # squeeze every other curve into a sliver); the title names it and its final
        far = OFF_AXIS_TOLERANCES * abs(summary["tolerance"])
        sign = 1 if summary["higher_is_better"] else -1
        mean_final = {m: statistics.fmean(r["result"]["final"] for r in records if r["method"] == m)
                      for m in {r["method"] for r in records}}
        off = sorted(m for m, f in mean_final.items() if sign * (summary["target"] - f) > far)
        shown = [r for r in records if r["method"] not in off] or records
        finals = [r["result"]["final"] for r in shown]
        lo, hi = min(finals), max(finals)
        span = max(hi - lo, abs(summary["tolerance"]) * 4, 1e-3)
        ylim = ((lo - 3 * span, hi + span) if summary["higher_is_better"]
                else (lo - span, hi + 3 * span))
        # ... but not past the data: an accuracy axis down to -0.2 is empty space
        qs = [q for r in shown for _, q in r["result"]["curve"]] + [summary["target"]]
        pad = 0.05 * (max(qs) - min(qs) or 1e-3)
        ylim = (max(ylim[0], min(qs) - pad), min(ylim[1], max(qs) + pad))
        if off and len(shown) < len(records):
            title += " — the zoom ignores, far from the target: " + ", ".join(
                f"{LABELS.get(m, m)} (final {mean_final[m]:.4g})" for m in off)
    ylabel = ("test accuracy" if summary.get("higher_is_better", True)
              else "held-out bits per byte (lower is better)")
    bases = {r.get("time_basis", "wall") for r in runs}
    xlabel = ("training time (CPU seconds of the process, evaluation excluded)" if bases == {"cpu"}
              else "training wall-clock (s, evaluation excluded)" if bases == {"wall"}
              else "training time (s; MIXED: CPU seconds and wall-clock)")
    plot_curves(runs, [m for m in exp.methods if any(r["method"] == m for r in runs)], path,
                title, ylabel, labels=LABELS, target=summary.get("target"), ylim=ylim,
                xlabel=xlabel)


def plot_heatmap(entries: dict[str, dict[str, Any]], path: Path) -> bool:
    """ES's mean final accuracy over the beta1 x beta2 grid, annotated with mean and std."""
    betas = [e for e in entries.values() if e["group"] == "betas"]
    if not betas:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    b1s = sorted({e["cell"]["beta1"] for e in betas})
    b2s = sorted({e["cell"]["beta2"] for e in betas})
    grid = np.full((len(b1s), len(b2s)), np.nan)
    std = np.full_like(grid, np.nan)
    uniform = None
    for e in betas:
        rows = e["summary"].get("methods", {})
        uniform = rows.get("uniform", {}).get("final", uniform)
        if "es" in rows:
            i, j = b1s.index(e["cell"]["beta1"]), b2s.index(e["cell"]["beta2"])
            grid[i, j], std[i, j] = rows["es"]["final"]["mean"], rows["es"]["final"]["std"]
    fig, ax = plt.subplots(figsize=(1.5 * len(b2s) + 2, 1.1 * len(b1s) + 1.5))
    im = ax.imshow(grid, cmap="viridis", origin="lower", aspect="auto")
    for i in range(len(b1s)):
        for j in range(len(b2s)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.4f}\n±{std[i, j]:.4f}", ha="center", va="center",
                        fontsize=8, color="w" if grid[i, j] < np.nanmean(grid) else "k")
    ax.set_xticks(range(len(b2s)), [f"{b:g}" for b in b2s])
    ax.set_yticks(range(len(b1s)), [f"{b:g}" for b in b1s])
    ax.set_xlabel("beta2 (score EMA)")
    ax.set_ylabel("beta1 (weight EMA)")
    title = "ES final test accuracy (MNIST-1D)"
    if uniform is not None:
        title += f"; uniform {uniform['mean']:.4f} ± {uniform['std']:.4f}"
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True

