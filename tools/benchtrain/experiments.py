"""Planning of ``tools/bench_train.py``: what to run and what it costs, no training here.

The command line (:mod:`.cli`: :func:`build_parser`, :func:`parse_args`) becomes experiments
(:func:`plan`): a workload configuration, methods and seeds each. A run is keyed by everything that
determines it (:func:`run_config`, :func:`run_key`): experiments that share a run share its key
and run it once, and a rerun skips every key already recorded. The budget-matched controls are
cut from the measured runs (:func:`budget_cut`); :func:`estimate` prices what is still to run.
What each method needs and reads comes from the method registry (:mod:`pipelines.methods`).
Pure functions of the arguments and the records: tested on their own (tests/test_bench_plan.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines import methods as registry
from pipelines.common import floats, ints

from .cli import (GRIDS, MAIN_METHODS, REGIMES, WEB, WORKLOADS, build_parser,  # noqa: F401
                  check_reference, check_regimes, parse_args, reference_config)

#: every method the benchmark runs (the registry's, uniform_B and the budget controls)
METHODS = registry.benchmark_names()
#: the variants of ES (the variants grid)
VARIANTS = registry.names(group="variant")
#: the budget-matched controls: ``budget_<m>`` -> ``<m>``, uniform cut to m's time
BUDGET = registry.controls()
#: the methods whose time includes a reference model's training and scoring
USES_REFERENCE = registry.names(reference=True)
#: the reference-score methods and their controls (opt-in: not in the default --methods)
REFERENCE_METHODS = (registry.names(group="reference")
                     + tuple(c for c, of in BUDGET.items() if registry.get(of).reference))
#: forward B, back-propagate b
SELECTING = tuple(m.name for m in registry.methods() if m.selects)
#: the variants' options (pipelines.loop.RunConfig fields), each keying only its method(s)
VARIANT_OPTIONS = ("rescale_min_keep", "b_ramp", "fresh_epochs")

#: Measured costs on the 2-core development machine (1 torch thread, 0 workers, load average ~2
#: from other jobs), used only for the up-front estimate: seconds of one uniform run per
#: (sample x epoch), evaluation and loader included, and seconds to build a workload's data once.
#: mnist1d: 40k samples x 10 epochs, 32.6 s training + 3.5 s evaluation; build 20 s per noise
#: level. textlm (defaults): 8192 sequences x 4 epochs, 99.0 s training + 9.8 s evaluation; build
#: 24 s. Rescaled by the uniform runs in runs.jsonl when there are any.
#: textlm-transformer: the textlm-long regime's model (Transformer, width 64, 2 layers), same
#: data and b. Measured in the loop beside the GRU at load ~2 (3,277 sequences, 2 repeats each):
#: 2.6 ms of training per sequence for both, so the GRU's entry; random / uniform 0.85, i.e. a
#: scoring forward costs 0.35 of a training sample (F/T). One uniform run of the regime (65,536
#: sequences x 3 epochs) then trains ~8.5 min, ~10 min with evaluation and loading. Until a
#: Transformer run is recorded, the estimate rescales it like the GRU's runs.
#: The MNIST-1D regimes use the mnist1d entry (same model; measured again at load ~2: 0.103 ms
#: per sample-epoch of training). Pre-training for the fine-tuning regime (10,059 source samples
#: x 10 epochs): 12.4 s of training, 37 s with building its data (load ~3).
TRANSFORMER_COST = 3.3e-3
COSTS = {
    "mnist1d": {"uniform_s_per_sample_epoch": 9.0e-5, "build_s": 20.0},
    "textlm": {"uniform_s_per_sample_epoch": 3.3e-3, "build_s": 25.0},
    "textlm-transformer": {"uniform_s_per_sample_epoch": TRANSFORMER_COST, "build_s": 25.0},
    # webtext (defaults: GRU 128, 128-byte samples): 8,192 samples trained in 15.8 CPU s at
    # load ~6 (per sample trained; _samples counts the budget's samples)
    "webtext": {"uniform_s_per_sample_epoch": 2.0e-3, "build_s": 10.0},
}
#: Relative cost of a method's run against uniform's, for the estimate only (a budget control
#: costs what the method it is cut to costs).
COST_FACTOR = {registry.UNIFORM_B: 0.8, **{m.name: m.cost for m in registry.methods()},
               **{c: registry.get(of).cost for c, of in BUDGET.items()}}
#: a reference model's cost, for the estimate only: its width halves the CNN's channels (the
#: GRU's hidden size is a third), so a training sample costs about this much of the target's;
#: the scoring pass costs one forward (~0.35 of a training sample) per corpus sample
REFERENCE_COST = {"train_per_sample": 0.4, "score_per_sample": 0.35}


# ----------------------------------------------------------------------------- experiments
@dataclass
class Experiment:
    """One comparison: a workload configuration, the methods, the seeds.

    ``config`` holds everything that determines a run besides method and seed; per-method
    overrides (B for uniform_B, the budget cut) are applied by :func:`run_config`."""

    name: str
    title: str
    workload: str
    config: dict[str, Any]
    methods: list[str]
    seeds: list[int]
    group: str = "main"                    # main | betas | ratio | prune | fixes | regimes
    cell: dict[str, Any] = field(default_factory=dict)   # the grid coordinates
    plot: bool = True
    plateau_window: int = 0                # > 0: report the time to uniform's plateau (report.py)


def base_config(args: argparse.Namespace, workload: str, **override: Any) -> dict[str, Any]:
    common = {"beta1": args.beta1, "beta2": args.beta2, "burn_in": args.burn_in,
              "anneal": args.anneal, "eswp_ratio": args.eswp_ratio,
              "infobatch_ratio": args.infobatch_ratio, "prune_anneal": args.prune_anneal,
              "prune_burn_in_epochs": args.prune_burn_in_epochs, "threads": args.threads,
              "workers": args.workers, **{k: getattr(args, k) for k in VARIANT_OPTIONS},
              "ref_model": reference_config(args, workload), "prune_keep": args.prune_keep}
    if workload == "webtext":
        cfg = {"mixture": args.web_mixture, "samples": args.web_samples,
               "seq_len": args.web_seq_len, "data_seed": args.web_data_seed, "passes": 0.25,
               "epochs": 1, "b": args.web_b, "B": args.web_B, "lr": args.web_lr, "arch": "gru",
               "hidden": args.web_hidden, "embed": args.web_embed, "layers": 1,
               "eval_sequences": args.web_eval_sequences, "per_kind": args.web_per_kind,
               "evals_per_run": args.web_evals, "device": args.text_device,
               "filter_quantile": args.filter_quantile}
        if args.web_seed_set != "contiguous":   # keyed only when not the first runs' default
            cfg["seed_set"] = args.web_seed_set
    elif workload == "mnist1d":
        cfg = {"train": args.m1d_train, "test": args.m1d_test, "noise": 0.0, "data_seed": 42,
               "epochs": args.m1d_epochs, "b": args.m1d_b, "B": args.m1d_B, "lr": args.m1d_lr}
    else:
        cfg = {"source": args.text_source, "min_mb": args.text_min_mb, "max_mb": args.text_max_mb,
               "seq_len": args.text_seq_len, "shard_sequences": args.text_shard_sequences,
               "heldout_fraction": 0.05, "data_seed": 0, "train_mb": args.text_train_mb,
               "eval_sequences": args.text_eval_sequences, "epochs": args.text_epochs,
               "b": args.text_b, "B": args.text_B, "lr": args.text_lr, "arch": args.text_arch,
               "hidden": args.text_hidden, "embed": args.text_embed, "layers": args.text_layers,
               "evals_per_epoch": args.text_evals_per_epoch, "device": args.text_device}
    return {**cfg, **common, **override}


def plan(args: argparse.Namespace) -> list[Experiment]:
    """The experiments of this invocation, in the order they run (the most informative first, so
    an interrupted ``--all`` has already produced the main tables)."""
    exps: list[Experiment] = []
    if "mnist1d" in args.workload:
        noises = args.noise if not args.all or args.noise != [0.0] else [0.0, 0.2, 0.4]
        for noise in noises:
            exps.append(Experiment(f"mnist1d-noise{noise:g}", f"MNIST-1D, label noise {noise:g}",
                                   "mnist1d", base_config(args, "mnist1d", noise=noise),
                                   list(args.methods), list(args.seeds)))
    if "textlm" in args.workload:
        exps.append(Experiment("textlm", "byte-level LM on the Python stdlib's text", "textlm",
                               base_config(args, "textlm"), list(args.methods), list(args.seeds)))
        if exps[0].workload == "mnist1d" and len(exps) > 2:   # textlm right after clean MNIST-1D
            exps.insert(1, exps.pop())
    if "webtext" in args.workload:
        for passes in args.web_passes:
            name = (f"webtext-{args.web_mixture}-n{args.web_samples}-p{passes:g}"
                    + ("" if args.web_seed_set == "contiguous" else f"-{args.web_seed_set}-seed"))
            exps.append(Experiment(
                name, f"byte LM on the web-like stream ({args.web_mixture} mixture, "
                f"{args.web_samples} samples), {passes:g} pass(es) of training budget", "webtext",
                base_config(args, "webtext", passes=passes), list(args.methods),
                list(args.seeds), group="web"))
    exps += regimes(args)
    grid_cfg = base_config(args, "mnist1d", noise=args.grid_noise)

    def own_reference(name: str, cfg: dict[str, Any]) -> dict[str, Any]:
        # A grid cell that differs from the main configuration gets its own uniform runs (and
        # budget controls): its time ratios and budget cut then compare runs made under the same
        # machine conditions — a grid may run hours after the main table, when a shared machine
        # is slower. A cell equal to the main configuration reuses the main table's runs.
        return cfg if cfg == grid_cfg else {**cfg, "reference": name}

    if "ratio" in args.grid:
        methods = [m for m in ("uniform", "uniform_B", "es", "eswp", "random", "budget_es",
                               "budget_eswp") if m in args.methods]
        for r in ints(args.ratios):
            exps.append(Experiment(
                f"ratio-{r}", f"MNIST-1D (noise {args.grid_noise:g}), B/b = {r} (b = {args.m1d_b})",
                "mnist1d", own_reference(f"ratio-{r}", {**grid_cfg, "B": r * args.m1d_b}),
                methods, list(args.grid_seeds),
                group="ratio", cell={"ratio": r}))
    if "prune" in args.grid:
        for r in floats(args.prune_ratios):
            exps.append(Experiment(
                f"prune-{r:g}", f"MNIST-1D (noise {args.grid_noise:g}), ESWP ratio {r:g}",
                "mnist1d", own_reference(f"prune-{r:g}", {**grid_cfg, "eswp_ratio": r}),
                ["uniform", "eswp"],
                list(args.grid_seeds), group="prune", cell={"eswp_ratio": r}, plot=False))
    if "betas" in args.grid:
        for b1 in floats(args.beta1s):
            for b2 in floats(args.beta2s):
                exps.append(Experiment(
                    f"betas-{b1:g}-{b2:g}", f"MNIST-1D (noise {args.grid_noise:g}), ES beta1 "
                    f"{b1:g} beta2 {b2:g}", "mnist1d", {**grid_cfg, "beta1": b1, "beta2": b2},
                    ["uniform", "es"], list(args.grid_seeds), group="betas",
                    cell={"beta1": b1, "beta2": b2}, plot=False))
    if "fixes" in args.grid:
        methods = [m for m in ("uniform", "es", "eswp", "budget_es", "budget_eswp")
                   if m in args.methods]
        exps.append(Experiment(
            "fix-schedule", f"MNIST-1D (noise {args.grid_noise:g}), ES burn-in "
            f"{args.fix_burn_in:g} and anneal {args.fix_anneal:g}", "mnist1d",
            own_reference("fix-schedule", {**grid_cfg, "burn_in": args.fix_burn_in,
                                           "anneal": args.fix_anneal}), methods,
            list(args.grid_seeds), group="fixes"))
        # the longer run asks one question (does ES close the gap given more epochs?): ES and
        # its control only, which keeps --all within a session on a 2-core machine
        exps.append(Experiment(
            "fix-epochs", f"MNIST-1D (noise {args.grid_noise:g}), {args.fix_epochs} epochs",
            "mnist1d", {**grid_cfg, "epochs": args.fix_epochs},
            [m for m in methods if m in ("uniform", "es", "budget_es")], list(args.grid_seeds),
            group="fixes"))
    if "variants" in args.grid:
        # the variants beside the runs they vary (shared with the main table when the grid's
        # noise is the main table's): one table on MNIST-1D
        exps.append(Experiment(
            "variants", f"MNIST-1D (noise {args.grid_noise:g}), the selection variants", "mnist1d",
            grid_cfg, ["uniform", "es", "eswp", "infobatch", "random", *VARIANTS],
            list(args.grid_seeds), group="variants"))
    return exps


def pretrain_config(args: argparse.Namespace) -> dict[str, Any]:
    """The pre-training of the fine-tuning regime (a
    :class:`pipelines.mnist1d.pretrain.PretrainConfig`, as a dict: it keys the runs)."""
    from pipelines.mnist1d.pretrain import PretrainConfig

    return PretrainConfig(source_seed=args.ft_source_seed, source_train=args.ft_source_train,
                          source_test=args.m1d_test, classes=tuple(args.ft_classes),
                          epochs=args.ft_pretrain_epochs, b=args.m1d_b,
                          lr=args.ft_pretrain_lr).to_dict()


def regimes(args: argparse.Namespace) -> list[Experiment]:
    """The regime experiments of ``args.workload`` (group ``regimes``), each a workload
    configuration of its own: new run keys, none shared with the main evidence.

    * ``mnist1d-long``: MNIST-1D on ``--long-train`` samples for ``--long-epochs`` epochs, the
      time to uniform's plateau reported (``plateau_window``).
    * ``mnist1d-finetune``: every method fine-tunes, for ``--ft-epochs`` at ``--ft-lr``, the
      model pre-trained once on the source (:func:`pretrain_config`) on ``--ft-train`` samples
      of the target (generation seed 42, every class).
    * ``textlm-long``: the byte LM on ``--tlong-train-mb`` MiB for ``--tlong-epochs`` epochs with
      the ``--tlong-arch`` model.
    """
    exps = []
    methods, seeds = list(args.methods), list(args.seeds)
    if "mnist1d-long" in args.workload:
        exps.append(Experiment(
            "mnist1d-long", f"MNIST-1D to convergence: {args.long_train} samples, "
            f"{args.long_epochs} epochs", "mnist1d",
            base_config(args, "mnist1d", train=args.long_train, epochs=args.long_epochs),
            methods, seeds, group="regimes", plateau_window=args.plateau_window))
    if "mnist1d-finetune" in args.workload:
        classes = ",".join(str(c) for c in args.ft_classes)
        exps.append(Experiment(
            "mnist1d-finetune", f"MNIST-1D fine-tuning: pre-trained on classes {classes} "
            f"(source seed {args.ft_source_seed}), fine-tuned on all 10 for {args.ft_epochs} "
            "epochs", "mnist1d",
            base_config(args, "mnist1d", train=args.ft_train, epochs=args.ft_epochs,
                        lr=args.ft_lr, pretrain=pretrain_config(args)),
            methods, seeds, group="regimes"))
    if "textlm-long" in args.workload:
        exps.append(Experiment(
            "textlm-long", f"byte-level LM, longer: {args.tlong_arch}, {args.tlong_train_mb:g} "
            f"MiB, {args.tlong_epochs} epochs", "textlm",
            base_config(args, "textlm", train_mb=args.tlong_train_mb, epochs=args.tlong_epochs,
                        arch=args.tlong_arch, hidden=args.tlong_hidden,
                        layers=args.tlong_layers, lr=args.tlong_lr),
            methods, seeds, group="regimes"))
    return exps


# ----------------------------------------------------------------------------- run keys
def run_options() -> dict[str, frozenset[str]]:
    """Per benchmark method, the settings of a run's configuration that key its runs among those
    that matter only to some methods (:meth:`pipelines.registry.Method.run_options`): the others'
    run keys leave them out, so that e.g. the betas grid's uniform cells are the main table's
    uniform runs. ``reference`` (a grid cell's own uniform runs: see ``own_reference`` in
    :func:`plan`) keys uniform and the budget controls; the reference model keys only the
    methods that read it (not the random-pruning control, nor a budget control, which is keyed
    by its cut)."""
    own = {m.name: m.run_options() for m in registry.methods()}
    own[registry.UNIFORM_B] = frozenset({"B"})
    own["uniform"] = own["uniform"] | {"reference"}
    own.update({c: frozenset({"reference"}) for c in registry.controls()})
    return own


def run_config(cfg: dict[str, Any], method: str, budget_epochs: float | None = None) -> dict[str, Any]:
    """What determines one run of ``method``: the experiment's configuration without the keys
    that do not matter to it (:func:`run_options`), plus the budget cut of a budget-matched
    control."""
    own = run_options()
    some = frozenset().union(*own.values())
    mine = own.get(method, frozenset())
    out = {k: v for k, v in cfg.items() if k not in some or k in mine}
    if method in registry.controls():
        out["budget_epochs"] = budget_epochs
    return out


def run_key(workload: str, method: str, seed: int, config: dict[str, Any]) -> str:
    """The key of a run in ``runs.jsonl``: a hash of its workload, method, seed and
    :func:`run_config`."""
    blob = json.dumps({"workload": workload, "method": method, "seed": seed, "config": config},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Run:
    """One run of an experiment: what determines it and its key."""

    method: str
    seed: int
    config: dict[str, Any]
    key: str


def planned_run(exp: Experiment, method: str, seed: int,
                budget_epochs: float | None = None) -> Run:
    """The run of ``method`` and ``seed`` in ``exp`` (a budget control: cut at
    ``budget_epochs``)."""
    cfg = run_config(exp.config, method, budget_epochs)
    return Run(method, seed, cfg, run_key(exp.workload, method, seed, cfg))


def measured_runs(exp: Experiment) -> list[Run]:
    """The runs of ``exp`` other than the budget controls, in the order they run: seeds
    outermost, so machine drift spreads over the methods."""
    return [planned_run(exp, m, s) for s in exp.seeds for m in exp.methods if m not in registry.controls()]


def cut_sources(exp: Experiment, method: str) -> list[Run]:
    """The runs the budget control ``method`` is cut from: uniform's and the method it is cut to,
    every seed."""
    return [planned_run(exp, m, s) for m in ("uniform", registry.controls()[method]) for s in exp.seeds]


def budget_cut(records: list[dict[str, Any]], epochs: float, of: str,
               cap: bool = True) -> dict[str, Any]:
    """The epochs of the budget-matched control of ``of``: ``epochs * mean(of's train s) /
    mean(uniform's train s)`` over ``records``, at most ``epochs`` (without ``cap``: uncapped,
    the web stream's budget in passes, where a control may read more than uniform), rounded to
    0.001 epoch (0.0001 pass)."""
    t_of = statistics.fmean(r["result"]["wall_clock_s"] for r in records if r["method"] == of)
    t_uni = statistics.fmean(r["result"]["wall_clock_s"] for r in records if r["method"] == "uniform")
    raw = epochs * t_of / t_uni
    cut = round(min(raw, float(epochs)), 3) if cap else round(raw, 4)
    return {"of": of, "epochs": cut, "raw_epochs": raw, "capped": cap and raw > epochs,
            "mean_train_s_of": t_of, "mean_train_s_uniform": t_uni}


def budget_cuts(exp: Experiment, records: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The cut of each budget control of ``exp`` whose source runs (:func:`cut_sources`) are all
    in ``records`` (by key); the others are left out."""
    cuts = {}
    for method in exp.methods:
        if method in registry.controls():
            sources = cut_sources(exp, method)
            if all(r.key in records for r in sources):
                passes = exp.config.get("passes")   # the web stream: cut in passes
                cuts[method] = budget_cut([records[r.key] for r in sources],
                                          exp.config["epochs"] if passes is None else passes,
                                          registry.controls()[method], cap=passes is None)
    return cuts


def budget_runs(exp: Experiment, cuts: dict[str, dict[str, Any]]) -> list[Run]:
    """The runs of the budget controls of ``exp`` with a cut in ``cuts``, seeds outermost."""
    return [planned_run(exp, m, s, cuts[m]["epochs"])
            for s in exp.seeds for m in exp.methods if m in cuts]


def experiment_records(exp: Experiment, records: dict[str, dict[str, Any]],
                       cuts: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The recorded runs of ``exp`` (budget controls at their cut in ``cuts``), methods
    outermost: the order of its tables."""
    out = []
    for method in exp.methods:
        if method in registry.controls() and method not in cuts:
            continue
        budget = cuts[method]["epochs"] if method in registry.controls() else None
        for seed in exp.seeds:
            run = planned_run(exp, method, seed, budget)
            if run.key in records:
                out.append(records[run.key])
    return out


# ----------------------------------------------------------------------------- estimate
def estimate(exps: list[Experiment], records: dict[str, dict[str, Any]],
             data_root: Path) -> dict[str, Any]:
    """Seconds still to spend: every run not in ``records`` priced from ``COSTS`` (rescaled by
    the uniform runs already measured on this machine), each counted once however many
    experiments share it, plus building data not yet cached. Returns the total and the part of
    each experiment (a shared run counts for the first experiment that needs it)."""
    scale = _cost_scale(records)
    counted: set[str] = set()
    pretrained: set[str] = set()
    references: set[str] = set()
    todo, seconds, builds = 0, 0.0, set()
    parts: dict[str, dict[str, float]] = {}
    for exp in exps:
        part = parts.setdefault(exp.name, {"runs": 0, "seconds": 0.0})
        for run in measured_runs(exp) + _budget_runs_or_placeholders(exp, records):
            if run.key in counted or run.key in records:
                counted.add(run.key)
                continue
            counted.add(run.key)
            kind = cost_kind(exp.workload, exp.config)
            per = (COSTS[kind]["uniform_s_per_sample_epoch"]
                   * scale.get(kind, scale.get(exp.workload, 1.0)))
            # a selecting method's epoch: a no-grad forward of every sample (~1/3 of a
            # training step) plus training on b/B of them; COST_FACTOR is for B = 2b
            spec = _registered(run.method)
            rescale = ((0.35 + exp.config["b"] / exp.config["B"]) / 0.85
                       if spec is not None and spec.selects else 1.0)
            cost = (per * _samples(exp.workload, exp.config) * exp.config["epochs"]
                    * cost_factor(run.method) * rescale)
            todo += 1
            seconds += cost
            part["runs"] += 1
            part["seconds"] += cost
            ident = _data_id(exp)
            if ident not in builds:
                builds.add(ident)
                if not _data_cached(data_root, *ident):
                    seconds += COSTS[exp.workload]["build_s"]
                    part["seconds"] += COSTS[exp.workload]["build_s"]
            pre = json.dumps(exp.config.get("pretrain"), sort_keys=True)
            if "pretrain" in exp.config and pre not in pretrained:
                pretrained.add(pre)   # built once, before the first fine-tuning run needs it
                cost = _pretrain_cost(exp.config["pretrain"], data_root, scale)
                seconds += cost
                part["seconds"] += cost
            ref = json.dumps([_data_id(exp), exp.config.get("ref_model")], sort_keys=True)
            if spec is not None and spec.reference and ref not in references:
                references.add(ref)   # trained and scored once, before its first run
                cost = _reference_cost(exp, per)
                seconds += cost
                part["seconds"] += cost
    return {"runs": todo, "seconds": seconds, "experiments": parts}


def _registered(method: str) -> registry.Method | None:
    """The registry's entry of a benchmark method (None for uniform_B and the controls)."""
    return registry.get(method) if method in registry.names() else None


def cost_factor(method: str) -> float:
    """A run's cost relative to uniform's (the estimate's; :data:`COST_FACTOR` extended to
    methods registered since import)."""
    of = registry.controls().get(method, method)
    return COST_FACTOR[method] if method in COST_FACTOR else registry.get(of).cost


def cost_kind(workload: str, cfg: dict[str, Any]) -> str:
    """The ``COSTS`` entry of a run: its workload, ``textlm-transformer`` for the Transformer LM
    (same data, another model, another cost per sample)."""
    return "textlm-transformer" if workload == "textlm" and cfg.get("arch") == "transformer" else workload


def _reference_cost(exp: Experiment, per: float) -> float:
    """Seconds to train and score a reference model (:data:`REFERENCE_COST`; a cached one is
    counted too: the estimate does not look into the reference cache)."""
    ref = exp.config["ref_model"]
    return per * (REFERENCE_COST["train_per_sample"] * ref["heldout"] * ref["epochs"]
                  + REFERENCE_COST["score_per_sample"] * _samples(exp.workload, exp.config))


def _pretrain_cost(pretrain: dict[str, Any], data_root: Path, scale: dict[str, float]) -> float:
    """Seconds to build the fine-tuning regime's pre-trained model, 0 when it is cached:
    uniform training on the kept source samples (about ``len(classes) / 10`` of those
    generated) plus building the source data."""
    from pipelines.mnist1d.pretrain import PretrainConfig, cache_dir

    config = PretrainConfig.from_dict(pretrain)
    if (cache_dir(data_root / "pretrain", config) / "meta.json").exists():
        return 0.0
    kept = config.source_train * len(config.classes) / 10
    per = COSTS["mnist1d"]["uniform_s_per_sample_epoch"] * scale.get("mnist1d", 1.0)
    return per * kept * config.epochs + COSTS["mnist1d"]["build_s"]


def _cost_scale(records: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Per ``COSTS`` entry (:func:`cost_kind`), this machine's uniform cost over ``COSTS``'
    (median over recorded uniform runs); entries without one are left out."""
    per: dict[str, list[float]] = {}
    for r in records.values():
        if r["method"] == "uniform" and r["workload"] in WORKLOADS + WEB:
            samples = _samples(r["workload"], r["config"]) * r["config"]["epochs"]
            per.setdefault(cost_kind(r["workload"], r["config"]), []).append(r["run_s"] / samples)
    return {kind: statistics.median(v) / COSTS[kind]["uniform_s_per_sample_epoch"]
            for kind, v in per.items()}


def _budget_runs_or_placeholders(exp: Experiment, records: dict[str, dict[str, Any]]) -> list[Run]:
    """The budget controls of ``exp``: at their cut where it is known from ``records``, else
    keyed by the runs they will be cut from (so experiments sharing those count them once)."""
    cuts = budget_cuts(exp, records)
    out = budget_runs(exp, cuts)
    for method in exp.methods:
        if method in registry.controls() and method not in cuts:
            sources = {"cut from": sorted(r.key for r in cut_sources(exp, method))}
            out += [Run(method, s, sources, run_key(exp.workload, method, s, sources))
                    for s in exp.seeds]
    return out


def _samples(workload: str, cfg: dict[str, Any]) -> float:
    if workload == "webtext":   # the samples the budget trains on
        return cfg["samples"] * cfg["passes"] * cfg["seq_len"] / 128
    if workload == "mnist1d":
        return cfg["train"]
    # whole shards of shard_sequences; train_mb 0 = every shard (~30 MiB of stdlib text)
    per_shard = cfg["seq_len"] * cfg["shard_sequences"]
    mb = cfg["train_mb"] or 30.0
    return math.ceil(mb * 2**20 / per_shard) * cfg["shard_sequences"] * (cfg["seq_len"] / 128)


def _data_id(exp: Experiment) -> tuple[str, str]:
    c = exp.config
    if exp.workload == "mnist1d":
        return ("mnist1d", f"mnist1d-n{c['train']}-t{c['test']}-noise{c['noise']:g}-s{c['data_seed']}")
    if exp.workload == "webtext":
        return ("webtext", f"{c['mixture']}-{c['samples']}-{c['seq_len']}-{c['data_seed']}")
    return ("textlm", "")


def _data_cached(root: Path, workload: str, ident: str) -> bool:
    if workload == "webtext":
        return any((root / "webtext").glob("webtext-*/meta.json"))
    if workload == "mnist1d":
        return (root / "mnist1d" / ident / "wds.parquet").exists()
    return any((root / "textlm").glob("textlm-*/meta.json"))

