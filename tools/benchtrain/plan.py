"""Planning of ``tools/bench_train.py``: what to run and what it costs, no training here.

The command line (:func:`build_parser`, :func:`parse_args`) becomes experiments
(:func:`plan`): a workload configuration, methods and seeds each. A run is keyed by everything that
determines it (:func:`run_config`, :func:`run_key`): experiments that share a run share its key
and run it once, and a rerun skips every key already recorded. The budget-matched controls are
cut from the measured runs (:func:`budget_cut`); :func:`estimate` prices what is still to run.
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
from typing import Any, Sequence

from pipelines.common import add_selection_args, floats, ints, parse_methods

from . import ROOT

WORKLOADS = ("mnist1d", "textlm")
#: the regimes the paper claims, each an experiment on one of WORKLOADS (see plan())
REGIMES = ("mnist1d-long", "mnist1d-finetune", "textlm-long")
GRIDS = ("betas", "ratio", "prune", "fixes", "variants")
#: the main tables' methods (issue 7), the default of --methods
MAIN_METHODS = ("uniform", "uniform_B", "es", "eswp", "loss", "selective_backprop", "infobatch",
                "random", "budget_es", "budget_eswp")
#: the method variants of "Selection that pays" (pipelines.loop.VARIANTS): the variants grid
VARIANTS = ("eswp_rescale", "infobatch_es", "es_reweight", "es_to_uniform", "es_from_uniform",
            "es_fresh")
#: controls beyond issue 7's: uniform cut to InfoBatch's wall-clock (InfoBatch was the one method
#: near lossless there, so its time saving needs the same budget-matched bar as ES's), and to
#: the two unbiased pruning variants' (the candidates for the recommended default)
EXTRA_CONTROLS = ("budget_infobatch", "budget_infobatch_es", "budget_eswp_rescale")
#: the reference-score methods (issue "Reference scores"; pipelines.loop): RHO-LOSS online
#: selection (top-b, and the ES rule on the reducible loss), offline band pruning at keep
#: --prune-keep and the random-pruning control at the same keep; pruning once what the reference
#: predicts worse than chance (``prune_chance``: no keep fraction, no noise rate); and uniform
#: cut to RHO-LOSS's and to chance-pruning's time (reference included). Opt-in: not in the
#: default --methods.
BANDS = ("band_low", "band_middle", "band_high")
USES_REFERENCE = ("rho", "rho_es") + BANDS + ("prune_chance",)  # reference cost in their time
KEEP_FRACTION = BANDS + ("prune_random",)         # prune-once manifests, keep --prune-keep
REFERENCE_METHODS = USES_REFERENCE + ("prune_random", "budget_rho", "budget_prune_chance")
METHODS = MAIN_METHODS + VARIANTS + EXTRA_CONTROLS + REFERENCE_METHODS
# forward B, back-propagate b
SELECTING = ("es", "eswp", "loss", "selective_backprop", "random", "eswp_rescale", "es_reweight",
             "es_to_uniform", "es_from_uniform", "es_fresh", "rho", "rho_es")
ES_METHODS = ("es", "eswp") + VARIANTS           # ES's betas
ES_SELECTING = tuple(m for m in ES_METHODS if m in SELECTING)  # ES's burn-in and anneal
BUDGET = {"budget_es": "es", "budget_eswp": "eswp", "budget_infobatch": "infobatch",
          "budget_rho": "rho", "budget_infobatch_es": "infobatch_es",
          "budget_eswp_rescale": "eswp_rescale", "budget_prune_chance": "prune_chance"}
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
}
#: Relative cost of a method's run against uniform's, for the estimate only.
COST_FACTOR = {"uniform": 1.0, "uniform_B": 0.8, "es": 0.9, "eswp": 0.75, "loss": 0.9,
               "selective_backprop": 0.9, "infobatch": 0.85, "random": 0.9, "budget_es": 0.9,
               "budget_eswp": 0.75, "eswp_rescale": 0.75, "infobatch_es": 0.85,
               "es_reweight": 0.9, "es_to_uniform": 0.9, "es_from_uniform": 0.9, "es_fresh": 0.8,
               "budget_infobatch": 0.85, "budget_infobatch_es": 0.85,
               "budget_eswp_rescale": 0.75, "rho": 0.9, "rho_es": 0.9, "band_low": 0.5,
               "band_middle": 0.5, "band_high": 0.5, "prune_random": 0.5, "budget_rho": 0.9,
               "prune_chance": 0.65, "budget_prune_chance": 0.65}
#: a reference model's cost, for the estimate only: its width halves the CNN's channels (the
#: GRU's hidden size is a third), so a training sample costs about this much of the target's;
#: the scoring pass costs one forward (~0.35 of a training sample) per corpus sample
REFERENCE_COST = {"train_per_sample": 0.4, "score_per_sample": 0.35}


# ----------------------------------------------------------------------------- configuration
def build_parser() -> argparse.ArgumentParser:
    from pipelines.textlm.__main__ import DEFAULTS as TEXT

    p = argparse.ArgumentParser(
        prog="python tools/bench_train.py",
        description="Multi-seed time-to-quality benchmark of ES/ESWP against uniform training, "
                    "the selection baselines and the budget-matched and random controls.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    what = p.add_argument_group("what to run (at least one)")
    what.add_argument("--workload", action="append", choices=WORKLOADS + REGIMES, default=[],
                      help="a main comparison or a regime (repeatable): mnist1d-long (MNIST-1D "
                           "to convergence, time to uniform's plateau), mnist1d-finetune "
                           "(fine-tuning a model pre-trained on part of the classes), "
                           "textlm-long (the byte LM, Transformer, more text and epochs)")
    what.add_argument("--regimes", action="store_true",
                      help="every regime: " + ", ".join(REGIMES))
    what.add_argument("--grid", action="append", choices=GRIDS, default=[],
                      help="a sensitivity grid on MNIST-1D (repeatable)")
    what.add_argument("--all", action="store_true",
                      help="the issue-7 evidence of docs/evidence: mnist1d at every --noise, "
                           "textlm, and every grid (not the regimes: add --regimes)")
    what.add_argument("--dry-run", action="store_true", help="print the plan and estimate only")
    g = p.add_argument_group("common")
    g.add_argument("--methods", default=",".join(MAIN_METHODS), help="comma-separated, from: "
                   + ",".join(METHODS) + " (budget_X needs uniform and X)")
    g.add_argument("--seeds", default="0,1,2", help="training seeds")
    g.add_argument("--out", default=str(ROOT / "docs" / "evidence"), help="output directory")
    g.add_argument("--data-dir", default=str(ROOT / "out" / "bench_data"), help="data cache")
    g.add_argument("--threads", type=int, default=1, help="torch threads")
    g.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    g.add_argument("--tolerance-acc", type=float, default=0.002,
                   help="MNIST-1D target = uniform's mean final accuracy minus this")
    g.add_argument("--tolerance-bpb", type=float, default=0.01,
                   help="textlm target = uniform's mean final bits/byte plus this")
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    g.add_argument("--time", choices=("cpu", "wall"), default="cpu",
                   help="time basis of every ratio, budget cut and curve: cpu = the training "
                        "process's CPU seconds (its wall-clock on an idle core, much less inflated "
                        "by other load than wall-clock, not immune to it: compare runs made "
                        "under the same load; runs recorded before it was measured stay on "
                        "wall-clock), wall = wall-clock as measured")
    g = p.add_argument_group("selection and pruning (both workloads)")
    add_selection_args(g, help={
        "eswp_ratio": "ESWP: fraction pruned per epoch",
        "infobatch_ratio": "InfoBatch: fraction of below-mean samples pruned",
        "prune_anneal": "ESWP/InfoBatch: fraction of final epochs left unpruned",
        "prune_burn_in_epochs": "ESWP: first epochs left unpruned"})
    g.add_argument("--rescale-min-keep", type=float, default=0.1,
                   help="eswp_rescale: smallest keep probability (weights <= 1/it)")
    g.add_argument("--b-ramp", type=float, default=0.75,
                   help="es_to_uniform/es_from_uniform: fraction of training over which b moves")
    g.add_argument("--fresh-epochs", type=float, default=1.0,
                   help="es_fresh: a score updated within this many epochs is not re-scored")
    g = p.add_argument_group(
        "reference model (rho, rho_es, band_*; defaults per workload: "
        "pipelines.reference.DEFAULTS)")
    g.add_argument("--reference-heldout", type=int, default=None,
                   help="held-out samples it trains on (MNIST-1D: generated with "
                        "--reference-seed and the same label noise; textlm: sequences of the "
                        "train shards after those trained on) [mnist1d 10000, textlm 4096]")
    g.add_argument("--reference-width", type=int, default=None,
                   help="its size: MNIST-1D CNN width (the target's 32), textlm GRU hidden size "
                        "(the target's --text-hidden) [mnist1d 16, textlm 64]")
    g.add_argument("--reference-epochs", type=int, default=None,
                   help="its training epochs [mnist1d 10, textlm 2]")
    g.add_argument("--reference-lr", type=float, default=None,
                   help="its Adam peak LR (cosine) [3e-3]")
    g.add_argument("--reference-seed", type=int, default=1042,
                   help="MNIST-1D: generation seed of the held-out split (not the corpus's 42)")
    g.add_argument("--prune-keep", type=float, default=0.5,
                   help="band_* and prune_random: fraction of the corpus kept, decided once")
    g = p.add_argument_group("mnist1d workload")
    g.add_argument("--noise", default="0", help="comma-separated label-noise fractions")
    g.add_argument("--m1d-train", type=int, default=40000, help="train samples")
    g.add_argument("--m1d-test", type=int, default=10000, help="test samples")
    g.add_argument("--m1d-epochs", type=int, default=10, help="epochs")
    g.add_argument("--m1d-b", type=int, default=64, help="b")
    g.add_argument("--m1d-B", type=int, default=128, help="B")
    g.add_argument("--m1d-lr", type=float, default=3e-3, help="Adam peak LR (cosine)")
    g = p.add_argument_group("textlm workload (see python -m pipelines.textlm --help)")
    g.add_argument("--text-source", default=None, help="text directory (default: the stdlib)")
    g.add_argument("--text-min-mb", type=float, default=TEXT["min_mb"], help="minimum text collected")
    g.add_argument("--text-max-mb", type=float, default=TEXT["max_mb"], help="cap on text collected")
    g.add_argument("--text-seq-len", type=int, default=TEXT["seq_len"], help="bytes per sequence")
    g.add_argument("--text-shard-sequences", type=int, default=TEXT["shard_sequences"],
                   help="sequences per shard")
    g.add_argument("--text-train-mb", type=float, default=TEXT["train_mb"],
                   help="MiB of train shards trained on (0: all)")
    g.add_argument("--text-eval-sequences", type=int, default=TEXT["eval_sequences"],
                   help="held-out sequences evaluated (0: all)")
    g.add_argument("--text-epochs", type=int, default=TEXT["epochs"], help="epochs")
    g.add_argument("--text-b", type=int, default=TEXT["b"], help="b")
    g.add_argument("--text-B", type=int, default=TEXT["B"], help="B")
    g.add_argument("--text-lr", type=float, default=TEXT["lr"], help="Adam peak LR (cosine)")
    g.add_argument("--text-arch", default=TEXT["arch"], choices=("gru", "transformer"), help="model")
    g.add_argument("--text-hidden", type=int, default=TEXT["hidden"], help="hidden size / width")
    g.add_argument("--text-embed", type=int, default=TEXT["embed"], help="GRU embedding size")
    g.add_argument("--text-layers", type=int, default=TEXT["layers"], help="layers")
    g.add_argument("--text-evals-per-epoch", type=int, default=TEXT["evals_per_epoch"],
                   help="held-out evaluations per epoch")
    g.add_argument("--text-device", default="cpu", help="torch device")
    g = p.add_argument_group("regime mnist1d-long (test set, b, B, lr: the --m1d-* flags)")
    g.add_argument("--long-train", type=int, default=20000, help="train samples")
    g.add_argument("--long-epochs", type=int, default=40, help="epochs (>= 40: to convergence)")
    g.add_argument("--plateau-window", type=int, default=5,
                   help="uniform's plateau = the mean of its last this many evaluations")
    g = p.add_argument_group("regime mnist1d-finetune (test set, b, B: the --m1d-* flags)")
    g.add_argument("--ft-train", type=int, default=20000, help="target train samples")
    g.add_argument("--ft-epochs", type=int, default=10, help="fine-tuning epochs")
    g.add_argument("--ft-lr", type=float, default=1e-3, help="fine-tuning Adam peak LR (cosine)")
    g.add_argument("--ft-classes", default="0,1,2,3,4",
                   help="classes of the pre-training source (0-9: the whole task, other samples)")
    g.add_argument("--ft-source-seed", type=int, default=7,
                   help="generation seed of the source set (the target's is 42)")
    g.add_argument("--ft-source-train", type=int, default=20000,
                   help="source samples generated, before keeping --ft-classes")
    g.add_argument("--ft-pretrain-epochs", type=int, default=10, help="pre-training epochs")
    g.add_argument("--ft-pretrain-lr", type=float, default=3e-3, help="pre-training Adam peak LR")
    g = p.add_argument_group("regime textlm-long (the other settings: the --text-* flags)")
    g.add_argument("--tlong-train-mb", type=float, default=8.0, help="MiB of train shards")
    g.add_argument("--tlong-epochs", type=int, default=3, help="epochs")
    g.add_argument("--tlong-arch", default="transformer", choices=("gru", "transformer"),
                   help="model")
    g.add_argument("--tlong-hidden", type=int, default=64, help="width")
    g.add_argument("--tlong-layers", type=int, default=2, help="layers")
    g.add_argument("--tlong-lr", type=float, default=TEXT["lr"], help="Adam peak LR (cosine)")
    g = p.add_argument_group("grids (MNIST-1D)")
    g.add_argument("--grid-noise", type=float, default=0.0, help="label noise of the grids")
    g.add_argument("--grid-seeds", default=None, help="seeds of the grids (default: --seeds)")
    g.add_argument("--beta1s", default="0,0.2,0.5,0.8", help="betas grid: beta1 values")
    g.add_argument("--beta2s", default="0.5,0.8,0.95", help="betas grid: beta2 values")
    g.add_argument("--ratios", default="2,4", help="ratio grid: B/b values (b = --m1d-b)")
    g.add_argument("--prune-ratios", default="0.2,0.3,0.5", help="prune grid: ESWP ratios")
    g.add_argument("--fix-burn-in", type=float, default=0.1, help="fixes grid: ES burn-in fraction")
    g.add_argument("--fix-anneal", type=float, default=0.1, help="fixes grid: ES anneal fraction")
    g.add_argument("--fix-epochs", type=int, default=20, help="fixes grid: epochs of the longer run")
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.methods = parse_methods(parser, args.methods, METHODS)
    for m, base in BUDGET.items():
        if m in args.methods and not {"uniform", base} <= set(args.methods):
            parser.error(f"{m} is cut to {base}'s wall-clock: --methods needs uniform and {base}")
    if "uniform" not in args.methods:
        parser.error("--methods needs uniform: it is the reference of every ratio and target")
    args.seeds = ints(args.seeds)
    args.grid_seeds = ints(args.grid_seeds) if args.grid_seeds is not None else args.seeds
    args.noise = floats(args.noise)
    if not args.seeds or not args.grid_seeds:
        parser.error("need at least one seed")
    if args.all:
        args.workload = list(WORKLOADS) + [w for w in args.workload if w in REGIMES]
        args.grid = list(GRIDS)
    if args.regimes:
        args.workload += [r for r in REGIMES if r not in args.workload]
    if not args.workload and not args.grid:
        parser.error("nothing to run: give --workload, --grid or --all")
    for b, B, name in ((args.m1d_b, args.m1d_B, "m1d"), (args.text_b, args.text_B, "text")):
        if not 1 <= b <= B:
            parser.error(f"need 1 <= --{name}-b <= --{name}-B, got {b}, {B}")
    # checked here, not at the fixes grid's first ES run an hour into --all
    if not (0 <= args.fix_burn_in and 0 <= args.fix_anneal and args.fix_burn_in + args.fix_anneal <= 1):
        parser.error(f"need --fix-burn-in, --fix-anneal >= 0 with a sum <= 1, got "
                     f"{args.fix_burn_in}, {args.fix_anneal}")
    if args.fix_epochs < 1:
        parser.error(f"need --fix-epochs >= 1, got {args.fix_epochs}")
    check_regimes(parser, args)
    check_reference(parser, args)
    for flag, value, ok in (
            ("--rescale-min-keep", args.rescale_min_keep, 0 < args.rescale_min_keep <= 1),
            ("--b-ramp", args.b_ramp, 0 < args.b_ramp <= 1),
            ("--fresh-epochs", args.fresh_epochs, args.fresh_epochs > 0)):
        if not ok:
            parser.error(f"{flag} is out of range, got {value}: need (0, 1] for --rescale-min-keep "
                         "and --b-ramp, > 0 for --fresh-epochs")
    return args


def reference_config(args: argparse.Namespace, workload: str) -> dict[str, Any]:
    """The reference model of ``workload`` (a :class:`pipelines.reference.ReferenceConfig` as
    a dict: it keys the runs of the methods that read it, and only theirs)."""
    from pipelines.reference import ReferenceConfig

    return ReferenceConfig.for_workload(
        workload, heldout=args.reference_heldout, width=args.reference_width,
        epochs=args.reference_epochs, lr=args.reference_lr, data_seed=args.reference_seed,
        b=args.m1d_b if workload == "mnist1d" else args.text_b).to_dict()


def check_reference(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``parser.error`` naming the flag for a reference setting that makes no reference."""
    if not 0.0 < args.prune_keep <= 1.0:
        parser.error(f"--prune-keep must be a fraction in (0, 1], got {args.prune_keep}")
    if args.reference_seed == 42:
        parser.error("--reference-seed 42 is the MNIST-1D corpus's generation seed: the held-out "
                     "split would repeat its training samples; give another")
    for workload in WORKLOADS:
        try:
            reference_config(args, workload)
        except ValueError as e:
            parser.error(str(e))


def check_regimes(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``parser.error`` naming the flag for a regime setting that makes no run (checked up
    front, not when the regime's turn comes hours into an invocation)."""
    from pipelines.mnist1d.pretrain import PretrainConfig

    for flag in ("long_train", "long_epochs", "plateau_window", "ft_train", "ft_epochs",
                 "ft_source_train", "ft_pretrain_epochs", "tlong_epochs", "tlong_hidden",
                 "tlong_layers"):
        if getattr(args, flag) < 1:
            parser.error(f"need --{flag.replace('_', '-')} >= 1, got {getattr(args, flag)}")
    if args.plateau_window > args.long_epochs:
        parser.error(f"--plateau-window ({args.plateau_window}) is more evaluations than "
                     f"--long-epochs ({args.long_epochs}) makes")
    if args.tlong_train_mb <= 0:
        parser.error(f"need --tlong-train-mb > 0, got {args.tlong_train_mb}")
    try:
        args.ft_classes = ints(args.ft_classes)
        PretrainConfig(classes=tuple(args.ft_classes))
    except ValueError as e:
        parser.error(f"--ft-classes: {e}")


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
    if workload == "mnist1d":
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
    configuration of its own: new run keys, none shared with the issue-7 evidence.

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
# Keys of a run's configuration that matter only to some methods: left out of the others' run
# keys, so that e.g. the betas grid's uniform cells are the main table's uniform runs.
_ONLY_FOR = {
    "beta1": ES_METHODS + ("rho_es",), "beta2": ES_METHODS + ("rho_es",),
    "burn_in": ES_SELECTING + ("rho_es",), "anneal": ES_SELECTING + ("rho_es",),
    "eswp_ratio": ("eswp", "eswp_rescale"), "prune_burn_in_epochs": ("eswp", "eswp_rescale"),
    "infobatch_ratio": ("infobatch", "infobatch_es"),
    "prune_anneal": ("eswp", "infobatch", "eswp_rescale", "infobatch_es"),
    "B": SELECTING + ("uniform_B",),
    "rescale_min_keep": ("eswp_rescale",), "b_ramp": ("es_to_uniform", "es_from_uniform"),
    "fresh_epochs": ("es_fresh",),
    "reference": ("uniform",) + tuple(BUDGET),   # see own_reference in plan()
    # the reference model keys only the methods that read it (not the random-pruning control,
    # nor RHO-LOSS's budget control, which is keyed by its cut)
    "ref_model": USES_REFERENCE, "prune_keep": KEEP_FRACTION,
}


def run_config(cfg: dict[str, Any], method: str, budget_epochs: float | None = None) -> dict[str, Any]:
    """What determines one run of ``method``: the experiment's configuration without the keys
    that do not matter to it, plus the budget cut of a budget-matched control."""
    out = {k: v for k, v in cfg.items() if method in _ONLY_FOR.get(k, (method,))}
    if method in BUDGET:
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
    return [planned_run(exp, m, s) for s in exp.seeds for m in exp.methods if m not in BUDGET]


def cut_sources(exp: Experiment, method: str) -> list[Run]:
    """The runs the budget control ``method`` is cut from: uniform's and ``BUDGET[method]``'s,
    every seed."""
    return [planned_run(exp, m, s) for m in ("uniform", BUDGET[method]) for s in exp.seeds]


def budget_cut(records: list[dict[str, Any]], epochs: int, of: str) -> dict[str, Any]:
    """The epochs of the budget-matched control of ``of``: ``epochs * mean(of's train s) /
    mean(uniform's train s)`` over ``records``, at most ``epochs``, rounded to 0.001 epoch."""
    t_of = statistics.fmean(r["result"]["wall_clock_s"] for r in records if r["method"] == of)
    t_uni = statistics.fmean(r["result"]["wall_clock_s"] for r in records if r["method"] == "uniform")
    raw = epochs * t_of / t_uni
    cut = round(min(raw, float(epochs)), 3)
    return {"of": of, "epochs": cut, "raw_epochs": raw, "capped": raw > epochs,
            "mean_train_s_of": t_of, "mean_train_s_uniform": t_uni}


def budget_cuts(exp: Experiment, records: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The cut of each budget control of ``exp`` whose source runs (:func:`cut_sources`) are all
    in ``records`` (by key); the others are left out."""
    cuts = {}
    for method in exp.methods:
        if method in BUDGET:
            sources = cut_sources(exp, method)
            if all(r.key in records for r in sources):
                cuts[method] = budget_cut([records[r.key] for r in sources],
                                          exp.config["epochs"], BUDGET[method])
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
        if method in BUDGET and method not in cuts:
            continue
        budget = cuts[method]["epochs"] if method in BUDGET else None
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
            rescale = ((0.35 + exp.config["b"] / exp.config["B"]) / 0.85
                       if run.method in SELECTING else 1.0)
            cost = (per * _samples(exp.workload, exp.config) * exp.config["epochs"]
                    * COST_FACTOR[run.method] * rescale)
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
            if run.method in USES_REFERENCE and ref not in references:
                references.add(ref)   # trained and scored once, before its first run
                cost = _reference_cost(exp, per)
                seconds += cost
                part["seconds"] += cost
    return {"runs": todo, "seconds": seconds, "experiments": parts}


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
        if r["method"] == "uniform" and r["workload"] in WORKLOADS:
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
        if method in BUDGET and method not in cuts:
            sources = {"cut from": sorted(r.key for r in cut_sources(exp, method))}
            out += [Run(method, s, sources, run_key(exp.workload, method, s, sources))
                    for s in exp.seeds]
    return out


def _samples(workload: str, cfg: dict[str, Any]) -> float:
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
    return ("textlm", "")


def _data_cached(root: Path, workload: str, ident: str) -> bool:
    if workload == "mnist1d":
        return (root / "mnist1d" / ident / "wds.parquet").exists()
    return any((root / "textlm").glob("textlm-*/meta.json"))

