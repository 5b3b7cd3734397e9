"""The command line of ``tools/bench_train.py`` (:func:`build_parser`, :func:`parse_args`):
its flags, their checks (each error names the flag, up front, not hours into an invocation) and
the reference model's configuration they make. The method choices come from the method registry
(:mod:`pipelines.methods`)."""

from __future__ import annotations

import argparse
from typing import Any, Sequence

from pipelines import methods as registry
from pipelines.common import add_reference_args, add_selection_args, floats, ints, parse_methods

from . import ROOT

WORKLOADS = ("mnist1d", "textlm")
#: the web-like stream (pipelines.webtext): opt-in, not part of --all
WEB = ("webtext",)
#: the regimes the paper claims, each an experiment on one of WORKLOADS (see plan.plan())
REGIMES = ("mnist1d-long", "mnist1d-finetune", "textlm-long")
GRIDS = ("betas", "ratio", "prune", "fixes", "variants")
#: the main tables' methods, the default of --methods (the other methods are opt-in, so the
#: committed evidence's run keys stay as they are)
MAIN_METHODS = ("uniform", "uniform_B", "es", "eswp", "loss", "selective_backprop", "infobatch",
                "random", "budget_es", "budget_eswp")


def build_parser() -> argparse.ArgumentParser:
    from pipelines.textlm.__main__ import DEFAULTS as TEXT

    p = argparse.ArgumentParser(
        prog="python tools/bench_train.py",
        description="Multi-seed time-to-quality benchmark of ES/ESWP against uniform training, "
                    "the selection baselines and the budget-matched and random controls.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    what = p.add_argument_group("what to run (at least one)")
    what.add_argument("--workload", action="append", choices=WORKLOADS + REGIMES + WEB, default=[],
                      help="a main comparison or a regime (repeatable): mnist1d-long (MNIST-1D "
                           "to convergence, time to uniform's plateau), mnist1d-finetune "
                           "(fine-tuning a model pre-trained on part of the classes), "
                           "textlm-long (the byte LM, Transformer, more text and epochs), webtext "
                           "(the byte LM on a web-like stream read in part, --web-*)")
    what.add_argument("--regimes", action="store_true",
                      help="every regime: " + ", ".join(REGIMES))
    what.add_argument("--grid", action="append", choices=GRIDS, default=[],
                      help="a sensitivity grid on MNIST-1D (repeatable)")
    what.add_argument("--all", action="store_true",
                      help="the evidence of docs/evidence: mnist1d at every --noise, "
                           "textlm, and every grid (not the regimes: add --regimes)")
    what.add_argument("--dry-run", action="store_true", help="print the plan and estimate only")
    g = p.add_argument_group("common")
    g.add_argument("--methods", default=",".join(MAIN_METHODS), help="comma-separated, from: "
                   + ",".join(registry.benchmark_names()) + " (budget_X needs uniform and X)")
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
    add_reference_args(g)
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
    g = p.add_argument_group("webtext workload: the byte LM on a web-like stream (pipelines.webtext)")
    g.add_argument("--web-mixture", default="default",
                   help="named mixture (pipelines.webtext.train.MIXTURES: default, dupes)")
    g.add_argument("--web-samples", type=int, default=32768, help="samples in the stream")
    g.add_argument("--web-seq-len", type=int, default=128, help="bytes per sample")
    g.add_argument("--web-passes", default="0.25",
                   help="comma-separated training budgets, in passes of uniform over the "
                        "stream (one experiment each): every method takes passes * samples / b "
                        "steps")
    g.add_argument("--web-b", type=int, default=32, help="b")
    g.add_argument("--web-B", type=int, default=64, help="B")
    g.add_argument("--web-lr", type=float, default=3e-3, help="Adam peak LR (cosine)")
    g.add_argument("--web-hidden", type=int, default=64, help="GRU hidden size")
    g.add_argument("--web-embed", type=int, default=32, help="GRU embedding size")
    g.add_argument("--web-eval-sequences", type=int, default=512,
                   help="clean held-out sequences evaluated")
    g.add_argument("--web-per-kind", type=int, default=128,
                   help="held-out sequences per other kind (final per-kind bits/byte)")
    g.add_argument("--web-evals", type=int, default=4, help="held-out evaluations per run")
    g.add_argument("--web-data-seed", type=int, default=0, help="the corpus builder's seed")
    g.add_argument("--web-seed-set", choices=("contiguous", "spread"), default="contiguous",
                   help="the reference's clean seed set: consecutive windows of the unused "
                        "train text (a few files) or windows spread over all of it")
    g.add_argument("--filter-quantile", type=float, default=0.95,
                   help="ref_filter/dedup_filter: keep samples whose reference loss is at most "
                        "this quantile of its losses on clean validation text")
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
    args.methods = parse_methods(parser, args.methods, registry.benchmark_names())
    for m, base in registry.controls().items():
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
    args.web_passes = floats(args.web_passes)
    if not args.web_passes or min(args.web_passes) <= 0 or args.web_samples < 1:
        parser.error("need --web-passes > 0 and --web-samples >= 1")
    if not 0 < args.filter_quantile <= 1:
        parser.error(f"--filter-quantile must be in (0, 1], got {args.filter_quantile}")
    from pipelines.webtext.train import MIXTURES
    if args.web_mixture not in MIXTURES:
        parser.error(f"--web-mixture: choose from {', '.join(MIXTURES)}, got {args.web_mixture!r}")
    for b, B, name in ((args.m1d_b, args.m1d_B, "m1d"), (args.text_b, args.text_B, "text"),
                       (args.web_b, args.web_B, "web")):
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
        b={"mnist1d": args.m1d_b, "webtext": args.web_b}.get(workload, args.text_b)).to_dict()


def check_reference(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``parser.error`` naming the flag for a reference setting that makes no reference."""
    if not 0.0 < args.prune_keep <= 1.0:
        parser.error(f"--prune-keep must be a fraction in (0, 1], got {args.prune_keep}")
    if args.reference_seed == 42:
        parser.error("--reference-seed 42 is the MNIST-1D corpus's generation seed: the held-out "
                     "split would repeat its training samples; give another")
    for workload in WORKLOADS + WEB:
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
