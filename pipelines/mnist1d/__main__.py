"""MNIST-1D: standard training against Evolved Sampling (and baselines) on a sharded corpus.

    python -m pipelines.mnist1d --preset demo --out demo_out/mnist1d
    python -m pipelines.mnist1d --methods uniform,es,random --seeds 0,1,2 --noise 0.2 --out runs/m1d

Builds (or reuses) the corpus in ``OUT/data``, trains one model per (method, seed) through the
shared loop (:mod:`pipelines.loop`, workload :func:`pipelines.mnist1d.train.workload`), prints a
table, and writes ``OUT/results.json`` and ``OUT/accuracy_vs_time.png``; each run's final
scores and pruning manifests go to ``OUT/runs/METHOD-seedS/`` (``scores.npy``, ``manifests/``). From code:
``main([...]) -> dict`` (the same content as results.json).

Presets set defaults; flags given explicitly override them:

* ``demo``: 20000 train / 5000 test, 8 epochs, uniform vs ES vs ESWP, 0 workers. Sized for ``make demo``:
  about 1 minute in all on 2 CPU cores (55 s measured, 14 s of it building the corpus, which is
  cached in ``OUT/data`` for the next run).
* ``full``: 40000 train / 10000 test, 15 epochs.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

from ..common import (add_methods_arg, add_reference_args, add_selection_args, check_batch, ints,
                      parse_methods, check_reference_args, train_pipeline)
from ..report import fmt, plot_curves, runs_table, stats, write_results

PRESETS: dict[str, dict[str, Any]] = {
    "demo": {"methods": "uniform,infobatch,es,eswp", "train": 20000, "test": 5000, "epochs": 8, "workers": 0},
    "full": {"train": 40000, "test": 10000, "epochs": 15},
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipelines.mnist1d",
        description="Train a 1D CNN on MNIST-1D streamed from shards: uniform batches of b "
                    "against selecting b of B per meta-batch (Evolved Sampling and baselines).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="default sizes; explicit flags win "
                   "(demo: " + ", ".join(f"{k}={v}" for k, v in PRESETS["demo"].items()) + ")")
    add_methods_arg(p)
    p.add_argument("--train", type=int, default=40000, help="train samples")
    p.add_argument("--test", type=int, default=10000, help="test samples")
    p.add_argument("--noise", type=float, default=0.0,
                   help="fraction of train labels flipped to another class (symmetric noise)")
    p.add_argument("--data-seed", type=int, default=42, help="seed of data generation and noise")
    p.add_argument("--epochs", type=int, default=10, help="epochs (the same for every method)")
    p.add_argument("--b", type=int, default=64, help="samples back-propagated per step")
    p.add_argument("--B", type=int, default=128, help="meta-batch size for the selection methods")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam peak learning rate (cosine decay)")
    add_selection_args(p)
    add_reference_args(p.add_argument_group(
        "reference model (rho, rho_es, band_*: trained once on a held-out split with the same "
        "label noise, cached in OUT/reference; its cost is in those methods' wall-clock)"))
    p.add_argument("--seeds", default="0", help="comma-separated training seeds")
    p.add_argument("--format", choices=("wds", "mds"), default="wds", help="shard format")
    p.add_argument("--workers", type=int, default=2,
                   help="DataLoader workers (on 2 CPU cores 0 is fastest for this tiny model)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; the model is tiny, so more mostly add overhead")
    p.add_argument("--out", default="out/mnist1d", help="output directory")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = build_parser()
    preset, _ = parser.parse_known_args(argv)
    if preset.preset:
        parser.set_defaults(**PRESETS[preset.preset])
    args = parser.parse_args(argv)
    args.methods = parse_methods(parser, args.methods)
    args.seeds = ints(args.seeds)
    if args.epochs < 1 or args.train < 1 or args.test < 1:
        parser.error("--epochs, --train and --test must be >= 1")
    check_batch(parser, args)
    check_reference_args(parser, args, "mnist1d")
    return args


def summarize(runs: list[dict[str, Any]], methods: list[str]) -> dict[str, dict[str, Any]]:
    """Per method: seeds, mean and std of time, counts and accuracies, and the wall-clock at
    which each seed's test accuracy first reached uniform's mean final accuracy (None if never)."""
    summary: dict[str, dict[str, Any]] = {}
    uniform = [r["final_acc"] for r in runs if r["method"] == "uniform"]
    target = statistics.fmean(uniform) if uniform else None
    for m in methods:
        rs = [r for r in runs if r["method"] == m]
        row: dict[str, Any] = {"seeds": [r["seed"] for r in rs]}
        for key in ("wall_clock_s", "samples_forwarded", "samples_backpropagated", "final_acc",
                    "best_acc"):
            row[key] = stats([float(r[key]) for r in rs])
        if target is not None:
            row["time_to_uniform_final_acc_s"] = [
                next((t for t, a in r["curve"] if a >= target), None) for r in rs]
        summary[m] = row
    return summary


def table(runs: list[dict[str, Any]], methods: list[str], summary: dict[str, Any]) -> str:
    """The printed results table, one row per method (mean ± std over seeds)."""
    def reached_cell(m: str, rs: list[dict[str, Any]]) -> str:
        reached = [t for t in summary[m]["time_to_uniform_final_acc_s"] if t is not None]
        return (fmt(reached, 1) + (f" ({len(reached)}/{len(rs)})" if len(rs) > 1 else "")
                if reached else "never")

    has_target = any("time_to_uniform_final_acc_s" in s for s in summary.values())
    return runs_table(runs, methods, "acc", ("s to uniform acc", reached_cell) if has_target else None)


def plot(runs: list[dict[str, Any]], methods: list[str], path: Path, title: str) -> None:
    """Test accuracy against training wall-clock, one colour per method: the mean over seeds
    with a min..max band (:func:`pipelines.report.plot_curves`)."""
    plot_curves(runs, methods, path, title, "test accuracy")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the pipeline with command-line ``argv`` (default ``sys.argv[1:]``); return the
    results (config, runs, summary, table, paths) also written to ``OUT/results.json``."""
    from ..reference import mnist1d_reference
    from .data import build
    from .train import workload

    args = parse_args(argv)
    started = time.perf_counter()
    out, data, data_s, runs = train_pipeline(
        args, lambda root: build(root, args.train, args.test, args.noise, args.data_seed, args.format),
        lambda d: workload(d.corpus, d.test_x, d.test_y),
        lambda d, s: (f"corpus: {d.corpus} in {d.directory} ({s:.1f} s); "
                      f"{int(d.noisy.sum())} noisy labels; test {len(d.test_y)}"),
        reference=lambda out, d, w: mnist1d_reference(
            out / "data", out / "reference", d, args.noise, args.data_seed, args.reference,
            progress=not args.no_progress)[0])

    summary = summarize(runs, args.methods)
    text = table(runs, args.methods, summary)
    png = out / "accuracy_vs_time.png"
    plot(runs, args.methods, png, f"MNIST-1D, {args.train} train, noise {args.noise:g}, "
         f"{args.epochs} epochs, b={args.b}, B={args.B}")
    results = {"config": {**vars(args), "reference": args.reference.to_dict()},
               "data_dir": str(data.directory), "data_s": data_s,
               "noisy_labels": int(data.noisy.sum()), "runs": runs, "summary": summary,
               "table": text, "plot": str(png), "total_s": time.perf_counter() - started}
    write_results(out, results)
    return results


if __name__ == "__main__":
    main()
