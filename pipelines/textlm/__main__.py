"""Byte-level LM on real text: standard training against Evolved Sampling (and baselines).

    python -m pipelines.textlm --out out/textlm
    python -m pipelines.textlm --methods uniform,es,eswp,random --seeds 0,1,2 --out out/textlm

Collects the Python standard library's ``.py``/``.rst``/``.txt`` files on this machine (>= 20 MB,
sorted paths), splits them by file into train and held-out text, cuts both into fixed-length byte
sequences written as WebDataset shards (cached in ``OUT/data``, see
:mod:`pipelines.textlm.data`), then trains one small GRU language model per (method, seed) on the
first ``--train-mb`` of the train shards, streamed through ``es_stream.ESDataset``, in the
shared loop (:mod:`pipelines.loop`, workload :func:`pipelines.textlm.train.workload`). Per-sample
loss: mean next-byte cross-entropy of a sequence. Quality: held-out bits per byte (lower is
better), evaluated on ``--eval-sequences`` held-out sequences (timer paused).

Prints a table and writes ``OUT/results.json`` and ``OUT/bpb_vs_time.png``. From code:
``main([...]) -> dict`` (the content of results.json).

The defaults are sized for a 2-core CPU: one uniform run of the default configuration trains in
about two minutes (see ``tools/bench_train.py``, which runs the multi-seed comparison).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Sequence

from ..common import (add_methods_arg, add_reference_args, add_selection_args, check_batch, ints,
                      parse_methods, check_reference_args, train_pipeline)
from ..report import plot_curves, runs_table, write_results
from .train import ARCHS

#: defaults shared with tools/bench_train.py (the ``textlm`` workload)
DEFAULTS: dict[str, Any] = {
    "min_mb": 20.0, "max_mb": None, "seq_len": 128, "heldout_fraction": 0.05, "data_seed": 0,
    "shard_sequences": 2048, "train_mb": 1.0, "eval_sequences": 1024, "epochs": 4, "b": 32,
    "B": 64, "lr": 3e-3, "arch": "gru", "hidden": 192, "embed": 48, "layers": 1,
    "evals_per_epoch": 2,
}


def build_parser() -> argparse.ArgumentParser:
    d = DEFAULTS
    p = argparse.ArgumentParser(
        prog="python -m pipelines.textlm",
        description="Pre-train a small byte-level language model on the Python standard "
                    "library's text streamed from WebDataset shards: uniform batches of b against "
                    "selecting b of B sequences per meta-batch (Evolved Sampling and baselines).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_methods_arg(p)
    g = p.add_argument_group("corpus")
    g.add_argument("--source", default=None,
                   help="directory to collect *.py/*.rst/*.txt from (default: this Python's stdlib)")
    g.add_argument("--min-mb", type=float, default=d["min_mb"],
                   help="refuse to build from less text than this (MiB)")
    g.add_argument("--max-mb", type=float, default=d["max_mb"],
                   help="collect only the sorted prefix of files up to this many MiB")
    g.add_argument("--seq-len", type=int, default=d["seq_len"], help="bytes per sequence (sample)")
    g.add_argument("--heldout-fraction", type=float, default=d["heldout_fraction"],
                   help="fraction of the text held out, whole files")
    g.add_argument("--data-seed", type=int, default=d["data_seed"],
                   help="seed of the file permutation (split, shard contents)")
    g.add_argument("--shard-sequences", type=int, default=d["shard_sequences"],
                   help="sequences per tar shard")
    g.add_argument("--train-mb", type=float, default=d["train_mb"],
                   help="train on the first train shards holding this many MiB (whole shards; "
                        "0: every train shard)")
    g.add_argument("--eval-sequences", type=int, default=d["eval_sequences"],
                   help="held-out sequences evaluated, evenly spaced over the held-out split (0: all)")
    g = p.add_argument_group("model and training")
    g.add_argument("--arch", choices=ARCHS, default=d["arch"], help="model")
    g.add_argument("--hidden", type=int, default=d["hidden"], help="GRU hidden size / Transformer width")
    g.add_argument("--embed", type=int, default=d["embed"], help="GRU byte embedding size")
    g.add_argument("--layers", type=int, default=d["layers"], help="layers")
    g.add_argument("--epochs", type=int, default=d["epochs"], help="epochs (the same for every method)")
    g.add_argument("--b", type=int, default=d["b"], metavar="b",
                   help="sequences back-propagated per step")
    g.add_argument("--B", type=int, default=d["B"], metavar="B",
                   help="meta-batch size for the selection methods")
    g.add_argument("--lr", type=float, default=d["lr"], help="Adam peak learning rate (cosine decay)")
    g.add_argument("--evals-per-epoch", type=int, default=d["evals_per_epoch"],
                   help="held-out evaluations per epoch (timer paused)")
    add_selection_args(g)
    add_reference_args(p.add_argument_group(
        "reference model (rho, rho_es, band_*: a GRU trained once on train shards not trained "
        "on, cached in OUT/reference; its cost is in those methods' wall-clock)"))
    g = p.add_argument_group("run")
    g.add_argument("--seeds", default="0", help="comma-separated training seeds")
    g.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    g.add_argument("--threads", type=int, default=1, help="torch threads")
    g.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    g.add_argument("--out", default="out/textlm", help="output directory")
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.methods = parse_methods(parser, args.methods)
    args.seeds = ints(args.seeds)
    if args.epochs < 1 or args.seq_len < 2 or args.eval_sequences < 0 or args.train_mb < 0:
        parser.error("need --epochs >= 1, --seq-len >= 2, --eval-sequences >= 0, --train-mb >= 0")
    check_batch(parser, args)
    check_reference_args(parser, args, "textlm")
    return args


def table(runs: list[dict[str, Any]], methods: list[str]) -> str:
    """One row per method (mean ± std over seeds); bits per byte: lower is better."""
    return runs_table(runs, methods, "bpb")


def plot(runs: list[dict[str, Any]], methods: list[str], path: Path, title: str) -> None:
    """Held-out bits per byte against training wall-clock, one colour per method."""
    plot_curves(runs, methods, path, title, "held-out bits per byte (lower is better)")


def build_data(args: argparse.Namespace, root: Path, log: Any = print):
    """The corpus for ``args`` (see :func:`pipelines.textlm.data.build`)."""
    from .data import MB, build

    return build(root, source=args.source, min_bytes=int(args.min_mb * MB),
                 max_bytes=None if args.max_mb is None else int(args.max_mb * MB),
                 seq_len=args.seq_len, heldout_fraction=args.heldout_fraction, seed=args.data_seed,
                 shard_sequences=args.shard_sequences,
                 train_bytes=None if not args.train_mb else int(args.train_mb * MB), log=log)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the pipeline with command-line ``argv`` (default ``sys.argv[1:]``); return the
    results (config, corpus, runs, table, paths), also written to ``OUT/results.json``."""
    from ..reference import textlm_reference
    from .train import eval_subset, workload

    args = parse_args(argv)
    started = time.perf_counter()

    def build(root: Path) -> tuple[Any, Any]:
        data = build_data(args, root)
        return data, eval_subset(data.heldout, args.eval_sequences or None)

    def describe(built: tuple[Any, Any], seconds: float) -> str:
        data, heldout = built
        m = data.meta
        return (f"corpus: {m['files']} files, {m['bytes'] / 2**20:.1f} MiB from {m['source']} "
                f"(Python {m['python']}); training on {data.train_shards}/"
                f"{data.total_train_shards} train shards = {data.corpus.num_samples} sequences of "
                f"{args.seq_len} B ({data.train_bytes / 2**20:.2f} MiB); held-out: "
                f"{m['heldout_files']} files, {len(data.heldout)} sequences, {len(heldout)} "
                f"evaluated ({seconds:.1f} s)")

    out, (data, heldout), data_s, runs = train_pipeline(
        args, build, lambda built: workload(built[0].corpus, built[1], args.arch, args.hidden,
                                            args.embed, args.layers, device=args.device),
        describe, evals_per_epoch=args.evals_per_epoch,
        reference=lambda out, built, w: textlm_reference(
            out / "reference", built[0], built[1], w, args.reference,
            progress=not args.no_progress)[0])

    text = table(runs, args.methods)
    png = out / "bpb_vs_time.png"
    plot(runs, args.methods, png, f"byte LM ({args.arch} {args.hidden}), "
         f"{data.train_bytes / 2**20:.2f} MiB of stdlib text, {args.epochs} epochs, "
         f"b={args.b}, B={args.B}")
    results = {"config": {**vars(args), "reference": args.reference.to_dict()},
               "data_dir": str(data.directory), "data_s": data_s,
               "corpus": data.meta, "train_shards": data.train_shards,
               "train_sequences": data.corpus.num_samples, "eval_sequences": len(heldout),
               "runs": runs, "table": text, "plot": str(png),
               "total_s": time.perf_counter() - started}
    write_results(out, results)
    return results


if __name__ == "__main__":
    main()
