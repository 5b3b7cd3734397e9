"""What pruning saves, and what its manifests cost.

Part 1, epoch time under pruning. The same ``--samples`` samples (``--payload`` random bytes plus
an int) are written as WebDataset and MDS shards (``bench_stream.write_corpora``) and indexed. A
store of random scores is turned into epoch-1 manifests by :class:`es_stream.ESWPPolicy` at each
ratio in ``--ratios``; then one epoch of ``ESDataset(..., manifests=...)`` (es-stream's default
shuffle, ``--meta-batch``) is timed per (format, workers, ratio), best of ``--repeats``, with persistent workers warmed by an
untimed epoch 0 as in training, against the unpruned epoch (no manifests) in the same run. Goal: epoch time / unpruned <=
(1 - r) + 0.05 for MDS and (1 - r) + 0.10 for WebDataset. Every run checks that exactly the kept
ids arrived, once each.

Part 2, manifests at scale: ``--manifest-samples`` (10M) scores in ``--manifest-shards`` shards:
time to decide and write one epoch's manifests (ESWP and InfoBatch), time to read them back as
the loader does (``read_epoch``), and bytes per sample on disk. The corpus of part 2 is
described in memory (shard names and counts, no shard files): writing and reading manifests never
touches shards. Goals: written in <= 10 s, <= 5 bytes per sample.

    .venv/bin/python tools/bench_prune.py
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_stream import collate, decode_mds, decode_wds, write_corpora  # noqa: E402

from es_stream import (Corpus, ESDataset, ESWPPolicy, InfoBatchPolicy, Pruner,  # noqa: E402
                       ScoreStore, ShardInfo, loader)
from es_stream.manifest import read_epoch  # noqa: E402


def random_store(n: int, seed: int = 0) -> ScoreStore:
    store = ScoreStore(n)
    rng = np.random.default_rng(seed)
    for a in range(0, n, 1 << 22):  # in chunks: 10M float64 randoms at once would be 80 MB
        b = min(n, a + (1 << 22))
        store.scatter(torch.arange(a, b), torch.from_numpy(rng.random(b - a, dtype=np.float32) + 1e-3))
    return store


def time_epoch(corpus: Corpus, manifests: str | None, expected: np.ndarray, meta_batch: int,
               workers: int, repeats: int) -> float:
    """Best seconds of epoch 1 over ``repeats`` fresh loaders, each warmed by an untimed epoch 0
    first: as in training, persistent workers are started once, not every epoch (the epoch's
    manifest is read when it starts, inside the timed region). Exits unless exactly
    ``expected`` ids arrived once each."""
    decode = decode_wds if corpus.format == "wds" else decode_mds
    best = math.inf
    for _ in range(repeats):
        ds = ESDataset(corpus, meta_batch, decode=decode, collate=collate, manifests=manifests)
        dl = loader(ds, num_workers=workers)  # persistent workers when workers > 0
        for _mb in dl:  # epoch 0: no manifest, untimed warm-up
            pass
        ds.set_epoch(1)
        ids = []
        start = time.perf_counter()
        for mb in dl:
            ids.append(mb.ids)
        best = min(best, time.perf_counter() - start)
        del dl
        got = np.sort(torch.cat(ids).numpy())
        if not np.array_equal(got, expected):
            sys.exit(f"bench: FAILED {corpus.format} workers={workers}: {len(got)} ids arrived, "
                     f"{len(expected)} expected")
    return best


def epoch_times(args: argparse.Namespace, root: Path) -> None:
    per_shard = max(1, min(2000, args.samples // 4))
    wds_dir, mds_dir = write_corpora(root, args.samples, args.payload, per_shard)
    corpora = {"wds": Corpus.from_webdataset(wds_dir), "mds": Corpus.from_mds(mds_dir)}
    ratios = [float(r) for r in args.ratios.split(",")]
    print(f"part 1: epoch time, {args.samples:,} samples of {args.payload} B, meta-batch "
          f"{args.meta_batch}, best of {args.repeats}")
    head = (f"{'format':<6} {'workers':>7} {'ratio':>5} {'kept':>8} {'epoch s':>8} {'samples/s':>10} "
            f"{'vs unpruned':>11} {'goal':>6}  ok")
    print(head + "\n" + "-" * len(head))
    for fmt, corpus in corpora.items():
        store = random_store(args.samples)  # the same scores, one store per corpus (Pruner binds it)
        slack = 0.05 if fmt == "mds" else 0.10
        manifests = {}
        for r in ratios:
            if r > 0:
                out = root / f"manifests-{fmt}-{r}"
                Pruner(corpus, store, ESWPPolicy(r, anneal=0.0, burn_in_epochs=0), out).write(1, 2)
                manifests[r] = str(out)
        for workers in (int(w) for w in args.workers.split(",")):
            base = None
            for r in ratios:
                m = manifests.get(r)
                expected = (read_epoch(m, 1, corpus.fingerprint, corpus.shard_counts).kept_ids
                            if m else np.arange(corpus.num_samples))
                s = time_epoch(corpus, m, expected, args.meta_batch, workers, args.repeats)
                base = s if r == 0 else base
                rel = s / base if base else float("nan")
                goal = (1 - r) + slack
                print(f"{fmt:<6} {workers:>7} {r:>5.2f} {len(expected):>8} {s:>8.3f} "
                      f"{len(expected) / s:>10,.0f} {rel:>11.3f} {goal:>6.2f}  "
                      f"{'yes' if rel <= goal else 'NO'}", flush=True)
    print()


def _peak_rss_gib() -> float:
    """This process's peak resident memory (ru_maxrss: KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def manifest_costs(args: argparse.Namespace, root: Path) -> None:
    n, shards = args.manifest_samples, args.manifest_shards
    counts = np.full(shards, n // shards)
    counts[: n % shards] += 1
    corpus = Corpus("mds", [ShardInfo(f"virtual/shard.{i:05d}.mds", int(c), -1, -1)
                            for i, c in enumerate(counts)])
    store = random_store(n)
    # the goals: 10M samples written in <= 10 s, 1e9 in <= 5 minutes;
    # <= 5 bytes a sample on disk
    goal_s = 10.0 if n <= 10_000_000 else 300.0
    print(f"part 2: manifests for {n:,} samples in {shards} shards (ok: written in <= {goal_s:g} s, "
          "<= 5 bytes a sample)")
    head = f"{'policy':<10} {'ratio':>5} {'write s':>8} {'read s':>7} {'bytes':>12} {'B/sample':>9}  ok"
    print(head + "\n" + "-" * len(head))
    for policy in (ESWPPolicy(0.3, anneal=0.0, burn_in_epochs=0), InfoBatchPolicy(0.5, anneal=0.0)):
        out = root / f"manifests-{policy.name}"
        start = time.perf_counter()
        Pruner(corpus, store, policy, out).write(1, 2)
        write_s = time.perf_counter() - start
        start = time.perf_counter()
        keep = read_epoch(out, 1, corpus.fingerprint, corpus.shard_counts)
        read_s = time.perf_counter() - start
        size = sum(f.stat().st_size for f in (out / "epoch=00001").iterdir())
        ok = write_s <= goal_s and size / n <= 5
        print(f"{policy.name:<10} {policy.ratio:>5.2f} {write_s:>8.2f} {read_s:>7.2f} {size:>12,} "
              f"{size / n:>9.2f}  {'yes' if ok else 'NO'}  (kept {keep.kept_fraction:.3f}; "
              f"peak RSS so far {_peak_rss_gib():.1f} GiB)", flush=True)
        del keep  # the next policy's read must not stack on this one (9 GB at 1e9 samples)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=100_000, help="part 1 corpus size")
    p.add_argument("--payload", type=int, default=1024)
    p.add_argument("--meta-batch", type=int, default=256)
    p.add_argument("--ratios", default="0,0.3,0.5,0.7")
    p.add_argument("--workers", default="0,2")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--manifest-samples", type=int, default=10_000_000)
    p.add_argument("--manifest-shards", type=int, default=1000)
    p.add_argument("--skip-epochs", action="store_true", help="only part 2")
    args = p.parse_args(argv)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}, "
          f"torch {torch.__version__}\n")
    with tempfile.TemporaryDirectory(prefix="es-bench-prune-") as tmp:
        if not args.skip_epochs:
            epoch_times(args, Path(tmp))
        manifest_costs(args, Path(tmp))


if __name__ == "__main__":
    main()
