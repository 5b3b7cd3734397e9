"""The es-stream tour behind ``make demo``: ``python -m pipelines.demo --out demo_out``.

1. Builds MNIST-1D (generated offline by the ``mnist1d`` package) as WebDataset and MDS shards
   and indexes both (cached in ``OUT/mnist1d/data``).
2. Streams one epoch of each through ``ESDataset`` with DataLoader workers, checks every id
   arrives once with the sample written for it, and prints samples/s.
3. Trains the pipeline's 1D CNN with uniform batches, InfoBatch-style pruning (the README's
   recommended method), ES and ESWP (``pipelines.mnist1d``, preset ``demo``), prints the table
   and where the plot is.
4. Runs the offline tools on what training left: ``es-stream prune`` from ES's saved scores,
   ``es-stream inspect`` of ESWP's manifests (with a plot), ``es-stream compact``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from es_stream import Corpus, ESDataset, loader
from es_stream.cli import main as es_stream_cli

from .mnist1d import main as mnist1d_main
from .mnist1d.__main__ import PRESETS
from .mnist1d.data import Collate, DecodeWDS, build


def stream(corpus: Corpus, x: np.ndarray, y: np.ndarray, meta_batch: int, workers: int) -> float:
    """One epoch through ESDataset; returns its seconds (worker start-up included). Checks every
    id arrived once, with the x and y written for it."""
    ds = ESDataset(corpus, meta_batch, decode=DecodeWDS() if corpus.format == "wds" else None,
                   collate=Collate(corpus.format), shuffle=True, seed=0)
    start = time.perf_counter()
    batches = [(mb.ids, *mb.data) for mb in loader(ds, num_workers=workers)]
    seconds = time.perf_counter() - start
    ids = torch.cat([b[0] for b in batches]).numpy()
    counts = np.bincount(ids, minlength=len(y))
    if len(ids) != len(y) or not (counts == 1).all():
        raise SystemExit(f"demo: {corpus.format}: {len(ids)} ids for {len(y)} samples, "
                         f"{int((counts == 0).sum())} missing")
    for b_ids, bx, by in batches:
        i = b_ids.numpy()
        if not (np.array_equal(bx[:, 0].numpy(), x[i]) and np.array_equal(by.numpy(), y[i])):
            raise SystemExit(f"demo: {corpus.format}: a meta-batch's data does not match its ids")
    return seconds


def cli(*args: str) -> None:
    print(f"\n$ es-stream {' '.join(args)}", flush=True)
    if es_stream_cli(list(args)) != 0:
        raise SystemExit(f"demo: es-stream {args[0]} failed")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="demo_out", help="output directory")
    p.add_argument("--meta-batch", type=int, default=256, help="meta-batch size of the streaming pass")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the streaming pass")
    args = p.parse_args(argv)
    out = Path(args.out) / "mnist1d"
    sizes = PRESETS["demo"]

    for fmt in ("wds", "mds"):
        data = build(out / "data", sizes["train"], sizes["test"], fmt=fmt)
        x = np.load(data.directory / "arrays.npz")["x"]
        seconds = stream(data.corpus, x, data.y, args.meta_batch, args.workers)
        print(f"demo: {fmt}  {len(data.y)} samples in {seconds:.2f}s  -> "
              f"{len(data.y) / seconds:,.0f} samples/s (meta-batch {args.meta_batch}, "
              f"{args.workers} workers, {data.corpus.num_shards} shards)", flush=True)

    print("\ntraining: uniform vs InfoBatch vs ES vs ESWP (python -m pipelines.mnist1d --preset demo)",
          flush=True)
    results = mnist1d_main(["--preset", "demo", "--out", str(out)])

    runs, index = out / "runs", Path(results["data_dir"]) / "wds.parquet"
    cli("prune", "--scores", str(runs / "es-seed0" / "scores.npy"), "--corpus", str(index),
        "--policy", "es", "--ratio", "0.5", "--out", str(out / "offline-manifests"))
    cli("inspect", str(runs / "eswp-seed0" / "manifests"), "--plot", str(out / "eswp-manifests.png"))
    cli("compact", "--corpus", str(index), "--manifest", str(out / "offline-manifests" / "epoch=00000"),
        "--out", str(out / "compacted"), "--overwrite")  # a re-run replaces its own earlier output


if __name__ == "__main__":
    main()
