"""Byte-level LM on real text: standard training against Evolved Sampling (and baselines).

    python -m pipelines.textlm --out out/textlm
    python -m pipelines.textlm --methods uniform,es,eswp,random --seeds 0,1,2 --out out/textlm

Collects the Python standard library's ``.py``/``.rst``/``.txt`` files on this machine (>= 20 MB,
sorted paths), splits them by file into train and held-out text, cuts both into fixed-length byte
sequences written as WebDataset shards (cached in ``OUT/data``, see
:mod:`pipelines.textlm.data`), then trains one small GRU language model per (method, seed) on the
first ``--train-mb`` of the train shards, streamed through ``es_stream.ESDataset``. Per-sample
loss: mean next-byte cross-entropy of a sequence. Quality: held-out bits per byte (lower is
better), evaluated on ``--eval-sequences`` held-out sequences (timer paused).

Prints a table and writes ``OUT/results.json`` and ``OUT/bpb_vs_time.png``. From code:
``main([...]) -> dict`` (the content of results.json).

The defaults are sized for a 2-core CPU: one uniform run of the default configuration trains in
about two minutes (see ``tools/bench_train.py``, which runs the multi-seed comparison).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

from ..mnist1d.train import METHODS
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
    p.add_argument("--methods", default="uniform,es", help=f"comma-separated, from: {','.join(METHODS)}")
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
    g.add_argument("--beta1", type=float, default=0.2, help="ES weight EMA coefficient")
    g.add_argument("--beta2", type=float, default=0.8, help="ES score EMA coefficient")
    g.add_argument("--burn-in", type=float, default=0.0, help="ES: fraction of steps uniform first")
    g.add_argument("--anneal", type=float, default=0.0, help="ES: fraction of steps uniform last")
    g.add_argument("--eswp-ratio", type=float, default=0.3, help="eswp: fraction pruned per epoch")
    g.add_argument("--infobatch-ratio", type=float, default=0.5,
                   help="infobatch: fraction of below-mean-loss samples pruned per epoch")
    g.add_argument("--prune-anneal", type=float, default=0.125,
                   help="eswp/infobatch: fraction of final epochs left unpruned")
    g.add_argument("--prune-burn-in-epochs", type=int, default=1,
                   help="eswp: first epochs left unpruned (scores need one pass first)")
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
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or not args.methods:
        parser.error(f"unknown method(s) {unknown}; choose from {','.join(METHODS)}")
    args.seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    if args.epochs < 1 or args.seq_len < 2 or args.eval_sequences < 0 or args.train_mb < 0:
        parser.error("need --epochs >= 1, --seq-len >= 2, --eval-sequences >= 0, --train-mb >= 0")
    if not 1 <= args.b <= args.B:
        parser.error(f"need 1 <= b <= B, got b={args.b}, B={args.B}")
    return args


def _fmt(values: list[float], digits: int) -> str:
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(runs: list[dict[str, Any]], methods: list[str]) -> str:
    """One row per method (mean ± std over seeds); bits per byte: lower is better."""
    head = ["method", "seeds", "train s", "backprop", "forwarded", "final bpb", "best bpb"]
    rows = [head]
    for m in methods:
        rs = [r for r in runs if r["method"] == m]
        rows.append([m, ",".join(str(r["seed"]) for r in rs),
                     _fmt([r["wall_clock_s"] for r in rs], 1),
                     _fmt([r["samples_backpropagated"] for r in rs], 0),
                     _fmt([r["samples_forwarded"] for r in rs], 0),
                     _fmt([r["final_bpb"] for r in rs], 4), _fmt([r["best_bpb"] for r in rs], 4)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot(runs: list[dict[str, Any]], methods: list[str], path: Path, title: str) -> None:
    """Held-out bits per byte against training wall-clock, one colour per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, m in enumerate(methods):
        for j, r in enumerate(rs for rs in runs if rs["method"] == m):
            t, q = zip(*r["curve"]) if r["curve"] else ((), ())
            ax.plot(t, q, marker="o", ms=3, color=f"C{i}", alpha=0.9 if j == 0 else 0.5,
                    label=m if j == 0 else None)
    ax.set_xlabel("training wall-clock (s, evaluation excluded)")
    ax.set_ylabel("held-out bits per byte (lower is better)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    import torch

    from .train import eval_subset, train

    args = parse_args(argv)
    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, args.threads))
    try:
        t0 = time.perf_counter()
        data = build_data(args, out / "data")
        data_s = time.perf_counter() - t0
        heldout = eval_subset(data.heldout, args.eval_sequences or None)
        m = data.meta
        print(f"corpus: {m['files']} files, {m['bytes'] / 2**20:.1f} MiB from {m['source']} "
              f"(Python {m['python']}); training on {data.train_shards}/{data.total_train_shards} "
              f"train shards = {data.corpus.num_samples} sequences of {args.seq_len} B "
              f"({data.train_bytes / 2**20:.2f} MiB); held-out: {m['heldout_files']} files, "
              f"{len(data.heldout)} sequences, {len(heldout)} evaluated ({data_s:.1f} s)", flush=True)
        es_options = {"beta1": args.beta1, "beta2": args.beta2, "burn_in": args.burn_in,
                      "anneal": args.anneal}
        runs = []
        for method in args.methods:
            for seed in args.seeds:
                r = train(method, data.corpus, heldout, args.epochs, b=args.b, B=args.B,
                          lr=args.lr, seed=seed, workers=args.workers,
                          progress=not args.no_progress, es_options=es_options,
                          eswp_ratio=args.eswp_ratio, infobatch_ratio=args.infobatch_ratio,
                          prune_anneal=args.prune_anneal,
                          prune_burn_in_epochs=args.prune_burn_in_epochs,
                          run_dir=str(out / "runs" / f"{method}-seed{seed}"),
                          evals_per_epoch=args.evals_per_epoch, arch=args.arch,
                          hidden=args.hidden, embed=args.embed, layers=args.layers,
                          device=args.device)
                print(f"{method:>18} seed {seed}: {r['wall_clock_s']:.1f} s, final bpb "
                      f"{r['final_bpb']:.4f}, best {r['best_bpb']:.4f} ({r['params']} params)",
                      flush=True)
                runs.append(r)
    finally:
        torch.set_num_threads(threads)

    text = table(runs, args.methods)
    png = out / "bpb_vs_time.png"
    plot(runs, args.methods, png, f"byte LM ({args.arch} {args.hidden}), "
         f"{data.train_bytes / 2**20:.2f} MiB of stdlib text, {args.epochs} epochs, "
         f"b={args.b}, B={args.B}")
    results = {"config": vars(args), "data_dir": str(data.directory), "data_s": data_s,
               "corpus": data.meta, "train_shards": data.train_shards,
               "train_sequences": data.corpus.num_samples, "eval_sequences": len(heldout),
               "runs": runs, "table": text, "plot": str(png),
               "total_s": time.perf_counter() - started}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print()
    print(text)
    print(f"\nplot: {png}\nresults: {out / 'results.json'}\ntotal: {results['total_s']:.1f} s")
    return results


if __name__ == "__main__":
    main()
