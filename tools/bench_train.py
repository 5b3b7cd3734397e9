"""Time-to-quality evidence (issue 7): ES, ESWP and their peers against uniform training.

    python tools/bench_train.py --workload mnist1d --noise 0,0.2,0.4   # MNIST-1D, 3 noise levels
    python tools/bench_train.py --workload textlm                      # byte LM on stdlib text
    python tools/bench_train.py --grid betas                           # beta1 x beta2 heat map
    python tools/bench_train.py --grid ratio                           # B/b in {2, 4}
    python tools/bench_train.py --grid prune                           # ESWP pruning ratio
    python tools/bench_train.py --grid fixes                           # burn-in/anneal, longer run
    python tools/bench_train.py --all                                  # every one of the above
    python tools/bench_train.py --all --dry-run                        # the plan and its estimate

**The fixes grid** tries, on clean MNIST-1D, what could close a gap between ES and uniform without
tuning for this benchmark: ``fix-schedule`` (the paper's burn-in and annealing: ``--fix-burn-in``
and ``--fix-anneal`` of the steps select uniformly) and ``fix-epochs`` (``--fix-epochs`` epochs,
a longer run where uniform has flattened, so fewer samples back-propagated per epoch may cost
less quality); the first with uniform, ES, ESWP and both budget-matched controls, the second with
uniform, ES and ES's control.

**What one experiment runs.** On the same shards and epoch budget, with every seed of
``--seeds`` (default 0,1,2), each method of ``--methods`` (default all of them):

=================== ===========================================================================
``uniform``         standard training, batches of b (the reference)
``uniform_B``       standard training, batches of B (same peak LR, half the steps at B = 2b)
``es``              Evolved Sampling: no-grad forward on B, ES picks b (beta1, beta2)
``eswp``            ES + ESWP pruning of ``--eswp-ratio`` of the set at epoch ends
``loss``            p proportional to the current loss, b of B
``selective_backprop`` Jiang et al. 2019 (Composer's rule), b of B
``infobatch``       InfoBatch-style pruning (uniform batches of b, below-mean losses pruned)
``random``          the random-selection control: forward on B, b picked uniformly
``budget_es``       the budget-matched control: uniform training cut to ES's wall-clock
``budget_eswp``     the same, cut to ESWP's wall-clock
=================== ===========================================================================

The training loops are the pipelines' own (``pipelines.mnist1d.train.train``,
``pipelines.textlm.train.train``), with their selectors (``make_selector``), so the benchmark
measures exactly what the pipelines run.

**How the budget-matched control is cut.** Uniform and ES (ESWP) run first, every seed. Then
``E_cut = epochs * mean(ES train s) / mean(uniform train s)`` (means over seeds, rounded to 0.001
epoch, at most ``epochs``): the uniform time per epoch is constant, so ``E_cut`` epochs of uniform
take ES's wall-clock. The control trains uniform batches of b for ``E_cut`` epochs — the last
epoch stops part-way — with the cosine learning-rate schedule compressed to span ``E_cut`` epochs
(so it ends at lr 0 like every other run). Its measured wall-clock is reported beside ES's, so the
assumption can be checked in the table.

**What is reported**, per method (mean ± std over seeds): training wall-clock (evaluation
excluded), samples forwarded (read and passed through the model, scoring forwards included) and
back-propagated, final and best quality (MNIST-1D: test accuracy, higher is better; textlm:
held-out bits per byte, lower is better), and time-to-target: the training wall-clock at the
first evaluation whose quality reaches ``target = uniform's mean final quality - tolerance``
(``+ tolerance`` for bits per byte; ``--tolerance-acc`` 0.002, ``--tolerance-bpb`` 0.01), with how
many seeds reached it (summary.json also has the time to uniform's mean final quality itself,
tolerance 0). Each also as a ratio to uniform's mean. The MNIST-1D tolerance is small because
uniform's accuracy curve is flat near its end: at 0.005 uniform itself reached the target half-way
through its run (measured, 40k samples, 10 epochs), which measures early progress, not the end. "lossless" marks a mean final
quality no worse than uniform's mean minus one standard deviation of uniform's seeds.

**Outputs** (``--out``, default ``docs/evidence/``): ``runs.jsonl`` (one JSON line per finished
run, appended as each one ends: an interrupted invocation rerun with the same arguments skips
every run already there — runs are keyed by everything that determines them, so experiments that
share a run, e.g. the grids' reference cells, run it once), ``summary.json`` (every experiment's
configuration, machine, command and summary), ``tables.md`` (all tables), ``<experiment>.png``
(quality against training wall-clock, one colour per method, thin lines per seed, the target
dashed) and ``betas_heatmap.png``. Data are cached in ``--data-dir`` (default
``out/bench_data``, not committed).

**Estimate.** ``--all`` (and any invocation) prints the number of runs to do and an estimate of
the wall time before starting, from per-workload costs measured on the 2-core development machine
(``COSTS``), rescaled by the uniform runs already in ``runs.jsonl`` when there are any.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `pipelines` is not an installed package
    sys.path.insert(0, str(ROOT))

from pipelines.common import (ES_OPTIONS, add_selection_args, parse_methods,  # noqa: E402
                              torch_threads)
from pipelines.common import floats as _floats  # noqa: E402
from pipelines.common import ints as _ints  # noqa: E402
from pipelines.report import stats as _stats  # noqa: E402

WORKLOADS = ("mnist1d", "textlm")
GRIDS = ("betas", "ratio", "prune", "fixes")
METHODS = ("uniform", "uniform_B", "es", "eswp", "loss", "selective_backprop", "infobatch",
           "random", "budget_es", "budget_eswp")
SELECTING = ("es", "eswp", "loss", "selective_backprop", "random")   # forward B, back-propagate b
ES_METHODS = ("es", "eswp")
BUDGET = {"budget_es": "es", "budget_eswp": "eswp"}
LABELS = {"uniform": "uniform (b)", "uniform_B": "uniform (B)", "budget_es": "uniform, ES's budget",
          "budget_eswp": "uniform, ESWP's budget", "selective_backprop": "selective backprop",
          "random": "random (b of B)"}

#: Measured costs on the 2-core development machine (1 torch thread, 0 workers, load average ~2
#: from other jobs), used only for the up-front estimate: seconds of one uniform run per
#: (sample x epoch), evaluation and loader included, and seconds to build a workload's data once.
#: mnist1d: 40k samples x 10 epochs, 32.6 s training + 3.5 s evaluation; build 20 s per noise
#: level. textlm (defaults): 8192 sequences x 4 epochs, 99.0 s training + 9.8 s evaluation; build
#: 24 s. Rescaled by the uniform runs in runs.jsonl when there are any.
COSTS = {
    "mnist1d": {"uniform_s_per_sample_epoch": 9.0e-5, "build_s": 20.0},
    "textlm": {"uniform_s_per_sample_epoch": 3.3e-3, "build_s": 25.0},
}
#: Relative cost of a method's run against uniform's, for the estimate only.
COST_FACTOR = {"uniform": 1.0, "uniform_B": 0.8, "es": 0.9, "eswp": 0.75, "loss": 0.9,
               "selective_backprop": 0.9, "infobatch": 0.85, "random": 0.9, "budget_es": 0.9,
               "budget_eswp": 0.75}


# ----------------------------------------------------------------------------- configuration
def build_parser() -> argparse.ArgumentParser:
    from pipelines.textlm.__main__ import DEFAULTS as TEXT

    p = argparse.ArgumentParser(
        prog="python tools/bench_train.py",
        description="Multi-seed time-to-quality benchmark of ES/ESWP against uniform training, "
                    "the selection baselines and the budget-matched and random controls.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    what = p.add_argument_group("what to run (at least one)")
    what.add_argument("--workload", action="append", choices=WORKLOADS, default=[],
                      help="a main comparison (repeatable)")
    what.add_argument("--grid", action="append", choices=GRIDS, default=[],
                      help="a sensitivity grid on MNIST-1D (repeatable)")
    what.add_argument("--all", action="store_true",
                      help="everything: mnist1d at every --noise, textlm, and every grid")
    what.add_argument("--dry-run", action="store_true", help="print the plan and estimate only")
    g = p.add_argument_group("common")
    g.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from: "
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
    g = p.add_argument_group("selection and pruning (both workloads)")
    add_selection_args(g, help={
        "eswp_ratio": "ESWP: fraction pruned per epoch",
        "infobatch_ratio": "InfoBatch: fraction of below-mean samples pruned",
        "prune_anneal": "ESWP/InfoBatch: fraction of final epochs left unpruned",
        "prune_burn_in_epochs": "ESWP: first epochs left unpruned"})
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
    args.seeds = _ints(args.seeds)
    args.grid_seeds = _ints(args.grid_seeds) if args.grid_seeds is not None else args.seeds
    args.noise = _floats(args.noise)
    if not args.seeds or not args.grid_seeds:
        parser.error("need at least one seed")
    if args.all:
        args.workload = list(WORKLOADS)
        args.grid = list(GRIDS)
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
    return args


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
    group: str = "main"                    # main | betas | ratio | prune | fixes
    cell: dict[str, Any] = field(default_factory=dict)   # the grid coordinates
    plot: bool = True


def base_config(args: argparse.Namespace, workload: str, **override: Any) -> dict[str, Any]:
    common = {"beta1": args.beta1, "beta2": args.beta2, "burn_in": args.burn_in,
              "anneal": args.anneal, "eswp_ratio": args.eswp_ratio,
              "infobatch_ratio": args.infobatch_ratio, "prune_anneal": args.prune_anneal,
              "prune_burn_in_epochs": args.prune_burn_in_epochs, "threads": args.threads,
              "workers": args.workers}
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
        for r in _ints(args.ratios):
            exps.append(Experiment(
                f"ratio-{r}", f"MNIST-1D (noise {args.grid_noise:g}), B/b = {r} (b = {args.m1d_b})",
                "mnist1d", own_reference(f"ratio-{r}", {**grid_cfg, "B": r * args.m1d_b}),
                methods, list(args.grid_seeds),
                group="ratio", cell={"ratio": r}))
    if "prune" in args.grid:
        for r in _floats(args.prune_ratios):
            exps.append(Experiment(
                f"prune-{r:g}", f"MNIST-1D (noise {args.grid_noise:g}), ESWP ratio {r:g}",
                "mnist1d", own_reference(f"prune-{r:g}", {**grid_cfg, "eswp_ratio": r}),
                ["uniform", "eswp"],
                list(args.grid_seeds), group="prune", cell={"eswp_ratio": r}, plot=False))
    if "betas" in args.grid:
        for b1 in _floats(args.beta1s):
            for b2 in _floats(args.beta2s):
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
    return exps


# Keys of a run's configuration that matter only to some methods: left out of the others' run
# keys, so that e.g. the betas grid's uniform cells are the main table's uniform runs.
_ONLY_FOR = {
    "beta1": ES_METHODS, "beta2": ES_METHODS, "burn_in": ES_METHODS, "anneal": ES_METHODS,
    "eswp_ratio": ("eswp",), "prune_burn_in_epochs": ("eswp",),
    "infobatch_ratio": ("infobatch",), "prune_anneal": ("eswp", "infobatch"),
    "B": SELECTING + ("uniform_B",),
    "reference": ("uniform",) + tuple(BUDGET),   # see own_reference in plan()
}


def run_config(cfg: dict[str, Any], method: str, budget_epochs: float | None = None) -> dict[str, Any]:
    """What determines one run of ``method``: the experiment's configuration without the keys
    that do not matter to it, plus the budget cut of a budget-matched control."""
    out = {k: v for k, v in cfg.items() if method in _ONLY_FOR.get(k, (method,))}
    if method in BUDGET:
        out["budget_epochs"] = budget_epochs
    return out


def run_key(workload: str, method: str, seed: int, config: dict[str, Any]) -> str:
    blob = json.dumps({"workload": workload, "method": method, "seed": seed, "config": config},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- running
class Store:
    """``runs.jsonl``: one line per finished run, appended and flushed as it ends. A line cut
    short by a kill is ignored (and that run redone)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: dict[str, dict[str, Any]] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict) and "key" in rec and "result" in rec:
                    self.records[rec["key"]] = rec

    def add(self, rec: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = self.path.read_bytes() if self.path.exists() else b""
        with open(self.path, "a") as f:
            if text and not text.endswith(b"\n"):  # a torn last line: end it, it stays ignored
                f.write("\n")
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records[rec["key"]] = rec


class Data:
    """Built data sets, one per workload configuration, built when first needed."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cache: dict[str, Any] = {}

    def mnist1d(self, cfg: dict[str, Any]):
        from pipelines.mnist1d.data import build

        key = json.dumps(["mnist1d", cfg["train"], cfg["test"], cfg["noise"], cfg["data_seed"]])
        if key not in self.cache:
            self.cache[key] = build(self.root / "mnist1d", cfg["train"], cfg["test"], cfg["noise"],
                                    cfg["data_seed"], "wds")
        return self.cache[key]

    def textlm(self, cfg: dict[str, Any]):
        from pipelines.textlm.__main__ import build_data
        from pipelines.textlm.train import eval_subset

        fields = ("source", "min_mb", "max_mb", "seq_len", "shard_sequences", "heldout_fraction",
                  "data_seed", "train_mb", "eval_sequences")
        key = json.dumps(["textlm"] + [cfg[f] for f in fields])
        if key not in self.cache:
            data = build_data(argparse.Namespace(**cfg), self.root / "textlm")
            self.cache[key] = (data, eval_subset(data.heldout, cfg["eval_sequences"] or None))
        return self.cache[key]


def train_one(data: Data, workload: str, method: str, seed: int, cfg: dict[str, Any],
              progress: bool) -> dict[str, Any]:
    """Train one (method, seed) and return its normalised result."""
    base = "uniform" if method in ("uniform_B",) + tuple(BUDGET) else method
    b = cfg["B"] if method == "uniform_B" else cfg["b"]
    budget = cfg.get("budget_epochs")
    epochs = cfg["epochs"] if budget is None else math.ceil(budget)
    es_options = {k: cfg[k] for k in ES_OPTIONS if k in cfg}
    common = dict(b=b, B=cfg.get("B", b), lr=cfg["lr"], seed=seed, workers=cfg["workers"],
                  progress=progress, es_options=es_options,
                  eswp_ratio=cfg.get("eswp_ratio", 0.3),
                  infobatch_ratio=cfg.get("infobatch_ratio", 0.5),
                  prune_anneal=cfg.get("prune_anneal", 0.125),
                  prune_burn_in_epochs=cfg.get("prune_burn_in_epochs", 1), budget_epochs=budget)
    with torch_threads(cfg["threads"]):
        if workload == "mnist1d":
            from pipelines.mnist1d.train import train

            d = data.mnist1d(cfg)
            r = train(base, d.corpus, d.test_x, d.test_y, epochs, **common)
            n = d.corpus.num_samples
            quality, higher, final, best = "test_acc", True, r["final_acc"], r["best_acc"]
        else:
            from pipelines.textlm.train import train

            d, heldout = data.textlm(cfg)
            r = train(base, d.corpus, heldout, epochs, evals_per_epoch=cfg["evals_per_epoch"],
                      arch=cfg["arch"], hidden=cfg["hidden"], embed=cfg["embed"],
                      layers=cfg["layers"], device=cfg["device"], **common)
            n = d.corpus.num_samples
            quality, higher, final, best = "heldout_bpb", False, r["final_bpb"], r["best_bpb"]
    return {"wall_clock_s": r["wall_clock_s"], "samples_forwarded": r["samples_forwarded"],
            "samples_backpropagated": r["samples_backpropagated"], "steps": r["steps"],
            "epochs": epochs if budget is None else budget, "train_samples": n, "quality": quality,
            "higher_is_better": higher, "final": final, "best": best,
            "curve": [list(p) for p in r["curve"]]}


def budget_cut(records: list[dict[str, Any]], epochs: int, of: str) -> dict[str, Any]:
    """The epochs of the budget-matched control of ``of`` (see the module docstring)."""
    t_of = statistics.fmean(r["result"]["wall_clock_s"] for r in records if r["method"] == of)
    t_uni = statistics.fmean(r["result"]["wall_clock_s"] for r in records if r["method"] == "uniform")
    raw = epochs * t_of / t_uni
    cut = round(min(raw, float(epochs)), 3)
    return {"of": of, "epochs": cut, "raw_epochs": raw, "capped": raw > epochs,
            "mean_train_s_of": t_of, "mean_train_s_uniform": t_uni}


def execute(exp: Experiment, store: Store, data: Data, progress: bool,
            log: Callable[[str], None]) -> dict[str, Any]:
    """Run what is missing of ``exp`` (uniform and the measured methods first, every seed, then
    the budget-matched controls); return ``{"ran": n, "skipped": n, "cuts": {...}}``."""
    ran = skipped = 0
    cuts: dict[str, Any] = {}
    order = [m for m in exp.methods if m not in BUDGET]
    phases = [[(m, None) for m in order]]
    if any(m in BUDGET for m in exp.methods):
        phases.append([(m, BUDGET[m]) for m in exp.methods if m in BUDGET])
    for phase in phases:
        for seed in exp.seeds:           # seeds outermost: machine drift spreads over methods
            for method, of in phase:
                budget = None
                if of is not None:
                    done = [store.records.get(run_key(exp.workload, m, s, run_config(exp.config, m)))
                            for m in ("uniform", of) for s in exp.seeds]
                    if any(r is None for r in done):
                        raise RuntimeError(f"{exp.name}: {method} needs every seed of uniform "
                                           f"and {of} first")
                    cuts[method] = budget_cut(done, exp.config["epochs"], of)
                    budget = cuts[method]["epochs"]
                cfg = run_config(exp.config, method, budget)
                key = run_key(exp.workload, method, seed, cfg)
                if key in store.records:
                    skipped += 1
                    continue
                log(f"[{exp.name}] {method} seed {seed} ...")
                t0 = time.perf_counter()
                result = train_one(data, exp.workload, method, seed, cfg, progress)
                rec = {"key": key, "workload": exp.workload, "method": method, "seed": seed,
                       "config": cfg, "result": result, "run_s": time.perf_counter() - t0,
                       "finished": datetime.datetime.now().isoformat(timespec="seconds"),
                       "machine": machine()}
                store.add(rec)
                ran += 1
                log(f"[{exp.name}] {method} seed {seed}: train {result['wall_clock_s']:.1f} s, "
                    f"final {result['final']:.4f}, best {result['best']:.4f} "
                    f"(run {rec['run_s']:.1f} s)")
    return {"ran": ran, "skipped": skipped, "cuts": cuts}


def experiment_records(exp: Experiment, store: Store, cuts: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for method in exp.methods:
        if method in BUDGET and method not in cuts:
            continue
        cfg = run_config(exp.config, method, cuts[method]["epochs"] if method in BUDGET else None)
        for seed in exp.seeds:
            rec = store.records.get(run_key(exp.workload, method, seed, cfg))
            if rec is not None:
                out.append(rec)
    return out


# ----------------------------------------------------------------------------- summaries
def time_to_target(curve: list[list[float]], target: float, higher: bool) -> float | None:
    """Training wall-clock of the first evaluation at or beyond ``target`` (None: never)."""
    for t, q in curve:
        if (q >= target) if higher else (q <= target):
            return t
    return None


def summarize(exp: Experiment, records: list[dict[str, Any]], tolerance: float) -> dict[str, Any]:
    """Per method: stats over seeds, time-to-target, ratios to uniform, the lossless flag."""
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
        rows[method] = row
    u = rows["uniform"]
    for row in rows.values():
        ratio = {}
        for k in ("wall_clock_s", "samples_forwarded", "samples_backpropagated", "final", "best"):
            ratio[k] = row[k]["mean"] / u[k]["mean"] if u[k]["mean"] else None
        a, b = row["time_to_target_s"]["mean"], u["time_to_target_s"]["mean"]
        ratio["time_to_target_s"] = a / b if a is not None and b else None
        row["ratio_to_uniform"] = ratio
    return {"methods": rows, "target": target, "tolerance": tolerance, "higher_is_better": higher,
            "quality": uniform[0]["result"]["quality"], "scoring_cost": scoring_cost(exp, rows)}


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
    head = ["method", "seeds", "train s", "× unif", "forwarded", "× unif", "backprop", "× unif",
            f"final {q}", f"best {q}", "to target s", "× unif", "lossless"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    digits = 4
    for m, row in s["methods"].items():
        r, t = row["ratio_to_uniform"], row["time_to_target_s"]
        tt = "never" if t["mean"] is None else f"{t['mean']:.1f} ({t['reached']}/{t['of']})"
        lines.append("| " + " | ".join([
            LABELS.get(m, m), str(len(row["seeds"])), _pm(row["wall_clock_s"], 1),
            _x(r["wall_clock_s"]), f"{row['samples_forwarded']['mean']:,.0f}",
            _x(r["samples_forwarded"]), f"{row['samples_backpropagated']['mean']:,.0f}",
            _x(r["samples_backpropagated"]), _pm(row["final"], digits), _pm(row["best"], digits),
            tt, _x(r["time_to_target_s"]), "yes" if row["lossless"] else "no"]) + " |")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"host_cpus": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform()}


def summary_entry(exp: Experiment, records: list[dict[str, Any]], cuts: dict[str, Any],
                  tolerance: float, command: str) -> dict[str, Any]:
    return {"name": exp.name, "title": exp.title, "workload": exp.workload, "group": exp.group,
            "cell": exp.cell, "config": exp.config, "methods": exp.methods, "seeds": exp.seeds,
            "budget_cuts": cuts, "command": command, "machine": machine(),
            "updated": datetime.datetime.now().isoformat(timespec="seconds"),
            "train_samples": records[0]["result"].get("train_samples") if records else None,
            "summary": summarize(exp, records, tolerance),
            "runs": [r["key"] for r in records]}


def describe(entry: dict[str, Any]) -> str:
    c, s = entry["config"], entry["summary"]
    if entry["workload"] == "mnist1d":
        what = (f"{c['train']} train / {c['test']} test samples, noise {c['noise']:g}, 1D CNN, "
                f"{c['epochs']} epochs, Adam {c['lr']:g} cosine, b = {c['b']}, B = {c['B']}")
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
    lines = [what]
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
    for m, cut in entry["budget_cuts"].items():
        lines.append(f"{m}: {cut['epochs']:.3f} epochs = {c['epochs']} x {cut['mean_train_s_of']:.2f} s "
                     f"({cut['of']}) / {cut['mean_train_s_uniform']:.2f} s (uniform)"
                     + (" (capped: slower than uniform)" if cut["capped"] else ""))
    m = entry["machine"]
    lines.append(f"machine: {m['cpu']}, {m['host_cpus']} CPUs, Python {m['python']}, torch "
                 f"{m['torch']}; command: `{entry['command']}`")
    return "\n".join(f"- {x}" for x in lines)


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
    lines += grid_tables(entries)
    path = out / "tables.md"
    path.write_text("\n".join(lines))
    return path


# ----------------------------------------------------------------------------- plots
def plot_experiment(exp: Experiment, records: list[dict[str, Any]], summary: dict[str, Any],
                    path: Path) -> None:
    """Quality against training wall-clock: per method the mean curve (when its seeds have the
    same evaluation points) bold, each seed thin; the target dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, m in enumerate(exp.methods):
        curves = [r["result"]["curve"] for r in records if r["method"] == m]
        if not curves:
            continue
        color = f"C{i % 10}"
        for c in curves:
            ax.plot([p[0] for p in c], [p[1] for p in c], color=color, alpha=0.3, lw=0.8)
        if len({len(c) for c in curves}) == 1:
            t = [statistics.fmean(c[j][0] for c in curves) for j in range(len(curves[0]))]
            q = [statistics.fmean(c[j][1] for c in curves) for j in range(len(curves[0]))]
            ax.plot(t, q, color=color, lw=2, marker="o", ms=3, label=LABELS.get(m, m))
        else:
            ax.plot([], [], color=color, lw=2, label=LABELS.get(m, m))
    if summary.get("target") is not None:
        ax.axhline(summary["target"], color="k", ls="--", lw=1, label="target")
        # zoom on the interesting range: from a bit below the target's neighbourhood
        finals = [r["result"]["final"] for r in records]
        lo, hi = min(finals), max(finals)
        span = max(hi - lo, abs(summary["tolerance"]) * 4, 1e-3)
        if summary["higher_is_better"]:
            ax.set_ylim(lo - 3 * span, hi + span)
        else:
            ax.set_ylim(lo - span, hi + 3 * span)
    ax.set_xlabel("training wall-clock (s, evaluation excluded)")
    ax.set_ylabel("test accuracy" if summary.get("higher_is_better", True)
                  else "held-out bits per byte (lower is better)")
    ax.set_title(exp.title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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


# ----------------------------------------------------------------------------- estimate
def estimate(exps: list[Experiment], store: Store, data_root: Path) -> dict[str, Any]:
    """Seconds still to spend: every run not in ``store`` priced from ``COSTS`` (rescaled by the
    uniform runs already measured on this machine), each counted once however many experiments
    share it, plus building data not yet cached. Returns the total and the part of each
    experiment (a shared run counts for the first experiment that needs it)."""
    scale: dict[str, float] = {}
    for workload in WORKLOADS:
        seen = [r for r in store.records.values()
                if r["workload"] == workload and r["method"] == "uniform"]
        if seen:
            per = [r["run_s"] / (_samples(workload, r["config"]) * r["config"]["epochs"]) for r in seen]
            scale[workload] = statistics.median(per) / COSTS[workload]["uniform_s_per_sample_epoch"]
    counted: set[str] = set()
    todo, seconds, builds = 0, 0.0, set()
    parts: dict[str, dict[str, float]] = {}
    for exp in exps:
        part = parts.setdefault(exp.name, {"runs": 0, "seconds": 0.0})
        for method in exp.methods:
            cfg = run_config(exp.config, method, None)
            for seed in exp.seeds:
                key = run_key(exp.workload, method, seed, cfg)
                if method in BUDGET:  # its cut is not known yet: the runs it is cut from are
                    key = run_key(exp.workload, method, seed, {"cut from": sorted(
                        run_key(exp.workload, m, s, run_config(exp.config, m))
                        for m in ("uniform", BUDGET[method]) for s in exp.seeds)})
                if key in counted:
                    continue
                counted.add(key)
                if method not in BUDGET and key in store.records:
                    continue
                if method in BUDGET and all(
                        run_key(exp.workload, m, s, run_config(exp.config, m)) in store.records
                        for m in ("uniform", BUDGET[method]) for s in exp.seeds):
                    cut = budget_cut([store.records[run_key(exp.workload, m, s, run_config(exp.config, m))]
                                      for m in ("uniform", BUDGET[method]) for s in exp.seeds],
                                     exp.config["epochs"], BUDGET[method])
                    if run_key(exp.workload, method, seed,
                               run_config(exp.config, method, cut["epochs"])) in store.records:
                        continue
                per = COSTS[exp.workload]["uniform_s_per_sample_epoch"] * scale.get(exp.workload, 1.0)
                # a selecting method's epoch: a no-grad forward of every sample (~1/3 of a
                # training step) plus training on b/B of them; COST_FACTOR is for B = 2b
                rescale = ((0.35 + exp.config["b"] / exp.config["B"]) / 0.85
                           if method in SELECTING else 1.0)
                cost = (per * _samples(exp.workload, exp.config) * exp.config["epochs"]
                        * COST_FACTOR[method] * rescale)
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
    return {"runs": todo, "seconds": seconds, "experiments": parts}


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


# ----------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns ``{"experiments": {name: summary entry}, "ran", "skipped",
    "estimate", "out"}`` (the entries are also in ``OUT/summary.json``)."""
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python tools/bench_train.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    store = Store(out / "runs.jsonl")
    exps = plan(args)
    est = estimate(exps, store, Path(args.data_dir))
    print(f"bench_train: {len(exps)} experiment(s), {est['runs']} run(s) to do "
          f"({len(store.records)} finished run(s) in {store.path}); estimated "
          f"{est['seconds'] / 60:.0f} min of wall time (costs measured on the 2-core development "
          f"machine; see COSTS)", flush=True)
    if args.dry_run:
        for exp in exps:
            part = est["experiments"][exp.name]
            print(f"  {exp.name}: {', '.join(exp.methods)} x seeds {exp.seeds}: "
                  f"{part['runs']} run(s) to do, ~{part['seconds'] / 60:.1f} min")
        return {"experiments": {}, "ran": 0, "skipped": 0, "estimate": est, "out": str(out)}

    def log(msg: str) -> None:
        print(msg, flush=True)

    summary_path = out / "summary.json"
    entries: dict[str, dict[str, Any]] = (json.loads(summary_path.read_text())
                                          if summary_path.exists() else {})
    data = Data(Path(args.data_dir))
    ran = skipped = 0
    started = time.perf_counter()
    for exp in exps:
        res = execute(exp, store, data, not args.no_progress, log)
        ran, skipped = ran + res["ran"], skipped + res["skipped"]
        records = experiment_records(exp, store, res["cuts"])
        tol = args.tolerance_acc if exp.workload == "mnist1d" else args.tolerance_bpb
        entry = summary_entry(exp, records, res["cuts"], tol, command)
        if exp.plot and records:
            png = out / f"{exp.name}.png"
            plot_experiment(exp, records, entry["summary"], png)
            entry["plot"] = str(png)
        entries[exp.name] = entry
        if plot_heatmap(entries, out / "betas_heatmap.png"):
            pass
        summary_path.write_text(json.dumps(entries, indent=1))
        tables = write_tables(out, entries)
        if exp.group in ("main", "fixes"):
            print(f"\n## {exp.title}\n{describe(entry)}\n\n{markdown_table(entry)}\n", flush=True)
    print(f"bench_train: ran {ran}, skipped {skipped} already finished, in "
          f"{(time.perf_counter() - started) / 60:.1f} min; tables: {out / 'tables.md'}; "
          f"summary: {summary_path}; runs: {store.path}", flush=True)
    return {"experiments": {e.name: entries[e.name] for e in exps}, "ran": ran,
            "skipped": skipped, "estimate": est, "out": str(out)}


if __name__ == "__main__":
    main()
