"""Read throughput of es-stream against the raw readers it sits on.

The same ``--samples`` samples (a random ``--payload``-byte ``bin`` plus an int ``cls``) are
written once as WebDataset tar shards (``webdataset.ShardWriter``) and once as an MDS dataset
(``streaming.MDSWriter``), 2000 samples a shard (fewer when that would leave a worker without a
shard). Then, for each DataLoader worker count in ``--workers``, one full epoch is read by:

* ``webdataset``: ``webdataset.WebDataset(urls, shardshuffle=False)`` in two settings, batched
  inside the pipeline (``.batched(B)``, ``DataLoader(batch_size=None)``) and batched by the
  DataLoader (``batch_size=B``); shards are split over workers by webdataset's default
  ``split_by_worker``. The faster of the two is the reference ``vs wds`` divides by.
* ``streaming``: ``streaming.StreamingDataset(local=..., batch_size=B, shuffle=False)`` through
  ``DataLoader(batch_size=B)``, with the default ``predownload`` (8 B) and with
  ``predownload=N`` (the whole epoch: its download/ready thread then stops polling early, which
  is much faster for a local dataset). The faster is the reference ``vs sd`` divides by. A fresh
  instance is built (untimed) for every run; ``clean_stale_shared_memory()`` is called once
  first, which also frees the shared memory of any *other* StreamingDataset running on this
  machine, so do not run the bench beside a job that uses one.
* ``limit: tar offset-slice`` (with ``workers=0`` only): no reader at all: each tar shard read
  whole by one ``read()`` and every sample's ``bin`` and ``cls`` sliced out by the offsets of
  the es-stream index, in shard order — the ceiling the disk and the index allow a tar reader in
  one process; the report gives each es-stream/wds row as a fraction of it.
* ``es-stream/wds`` and ``es-stream/mds``: :class:`es_stream.ESDataset` over the indexed tar and
  MDS corpora (``shuffle=False``, the raw readers' sequential order), through
  :func:`es_stream.loader`. ``--es-shuffle`` adds rows with ``shuffle=True``, es-stream's default
  (block-shuffled, random reads).

``--only-es`` leaves out the raw readers (minutes at 100k samples: webdataset runs at ~6k
samples/s here), for a quick look at es-stream's own worker scaling; the ``vs`` columns are then
empty.

Every reader does the same per-sample work: payload bytes and the ``cls`` int out of the
sample, and one shared collate into ``(uint8[B, payload], int64[B])`` tensors. Only the
iteration is timed (writing and indexing are not): each run builds a fresh DataLoader with
``persistent_workers=False`` and times from ``iter()`` to exhaustion, so worker start-up is in
every number alike. The best of ``--repeats`` runs is reported, with the CPU seconds it took in
this process (``main cpu``) and in its DataLoader workers (``workers cpu``, the children's
times, which the OS adds once the loader has joined them): on a machine with few cores the sum
over the epoch's wall-clock says how many cores the reader kept busy, so a worker count that does
not scale shows whether the cores ran out or the process waited. ``cls`` holds the sample's index,
so after every run the bench checks that each of the N samples arrived exactly once (and, for
es-stream, that each batch's ids match its samples) and exits non-zero if not.

Run from the repository root::

    .venv/bin/python tools/bench_stream.py
    .venv/bin/python tools/bench_stream.py --samples 100000 --workers 0,2,4 --es-shuffle
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch.utils.data import DataLoader

import es_stream

SHARD_SAMPLES = 2000  # samples a shard (fewer when --samples leaves fewer shards than workers)
MARKER = ".es_bench_data"  # marks a --dir subfolder this script wrote, so it may replace it
LIMIT = "limit: tar offset-slice"  # the row of offset_slicing_limit

Batch = tuple[torch.Tensor, torch.Tensor]  # (payload uint8[B, P], cls int64[B])


# ------------------------------------------------------------------ per-sample work (shared)
def collate(samples: list[tuple[bytes, int]]) -> Batch:
    """The one collate every reader uses: payloads -> uint8[B, P], labels -> int64[B]."""
    payload = np.frombuffer(b"".join(s[0] for s in samples), dtype=np.uint8)
    labels = torch.tensor([s[1] for s in samples], dtype=torch.int64)
    return torch.from_numpy(payload.reshape(len(samples), -1).copy()), labels


def decode_wds(sample: dict[str, Any]) -> tuple[bytes, int]:
    """A tar sample (``{"bin": bytes, "cls": b"123", ...}``) -> ``(payload, label)``."""
    return sample["bin"], int(sample["cls"])


def decode_mds(sample: dict[str, Any]) -> tuple[bytes, int]:
    """An MDS sample (``{"bin": bytes, "cls": int}``, typed by MDSWriter) -> ``(payload, label)``."""
    return sample["bin"], sample["cls"]


def wds_tuple(sample: tuple[bytes, bytes]) -> tuple[bytes, int]:
    """What ``WebDataset.to_tuple("bin", "cls")`` yields -> ``(payload, label)``."""
    return sample[0], int(sample[1])


def mds_collate(samples: list[dict[str, Any]]) -> Batch:
    return collate([decode_mds(s) for s in samples])


def wds_collate(samples: list[tuple[bytes, bytes]]) -> Batch:
    return collate([wds_tuple(s) for s in samples])


# ------------------------------------------------------------------------------ data
def prepare_dir(path: Path) -> Path:
    """An empty ``path``: created, or replaced when an earlier run of this bench wrote it."""
    if path.exists():
        if not (path / MARKER).exists():
            sys.exit(f"bench: {path} exists and was not written by this bench; choose another --dir")
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def write_corpora(root: Path, n: int, payload: int, per_shard: int,
                  seed: int = 0) -> tuple[Path, Path]:
    """Write the same n samples as WebDataset shards (``root/wds``) and MDS (``root/mds``),
    ``per_shard`` samples a shard."""
    import webdataset as wds
    from streaming import MDSWriter

    rng = np.random.default_rng(seed)
    wds_dir, mds_dir = prepare_dir(root / "wds"), prepare_dir(root / "mds")
    # MDS: per sample the payload, its 4 B length, the 8 B int and a 4 B offset; per shard a
    # sample count and the column config (JSON), under 1 KiB
    size_limit = per_shard * (payload + 16) + 1024
    with wds.ShardWriter(str(wds_dir / "shard-%06d.tar"), maxcount=per_shard, verbose=0) as tw, \
            MDSWriter(out=str(mds_dir / "data"), columns={"bin": "bytes", "cls": "int"},
                      size_limit=size_limit) as mw:
        for i in range(n):
            blob = rng.bytes(payload)
            tw.write({"__key__": f"{i:09d}", "bin": blob, "cls": i})
            mw.write({"bin": blob, "cls": i})
    for d in (wds_dir, mds_dir):
        (d / MARKER).touch()
    return wds_dir, mds_dir / "data"


# ---------------------------------------------------------------------------- timing
@dataclass
class Result:
    reader: str
    workers: int
    seconds: float  # best of the repeats
    samples: int
    cpu_main: float = math.nan  # CPU seconds of that run in this process
    cpu_workers: float = math.nan  # ... and in its DataLoader workers

    @property
    def rate(self) -> float:
        return self.samples / self.seconds


def check_once(n: int, labels: list[torch.Tensor], what: str) -> None:
    """Fail loudly unless the labels seen are exactly 0..n-1, each once."""
    seen = torch.cat(labels).numpy() if labels else np.zeros(0, np.int64)
    counts = np.bincount(seen, minlength=n) if seen.size else np.zeros(n, np.int64)
    if seen.size != n or len(counts) != n or not (counts == 1).all():
        missing, repeated = int((counts[:n] == 0).sum()), int((counts > 1).sum())
        sys.exit(f"bench: FAILED {what}: saw {seen.size} samples for {n} "
                 f"({missing} missing, {repeated} seen more than once)")


def time_epoch(make_loader: Callable[[], Iterable[Any]], unpack: Callable[[Any], Batch],
               n: int, what: str, repeats: int) -> tuple[float, float, float]:
    """Best wall-clock seconds of one full epoch over ``repeats`` fresh loaders, with that run's
    CPU seconds in this process and in its workers, checking the exactly-once property after
    each (outside the timed region)."""
    best = (math.inf, math.nan, math.nan)
    for _ in range(repeats):
        loader = make_loader()
        labels: list[torch.Tensor] = []
        before, start = os.times(), time.perf_counter()
        for batch in loader:
            labels.append(unpack(batch)[1])
        elapsed = time.perf_counter() - start
        # the exhausted iterator has joined its workers (persistent_workers=False), so their
        # CPU time is in the children's fields now
        after = os.times()
        check_once(n, labels, what)
        if elapsed < best[0]:
            # (os.times counts in clock ticks: a difference can come out as -0.0)
            best = (elapsed, max(0.0, after.user + after.system - before.user - before.system),
                    max(0.0, after.children_user + after.children_system
                        - before.children_user - before.children_system))
        del loader
        gc.collect()
    return best


def offset_slicing_limit(corpus: es_stream.Corpus, meta_batch: int) -> Iterable[Batch]:
    """The ceiling for reading tar shards in this process: each shard read whole by one
    ``read()``, each sample's ``bin`` and ``cls`` sliced out of that buffer by the offsets the
    es-stream index holds, batched with the shared collate. No header check, no sample dict,
    no DataLoader: what the disk, the index and the per-sample work allow."""
    t = corpus.tar
    bin_code, cls_code = t.suffixes.index("bin"), t.suffixes.index("cls")
    batch: list[tuple[bytes, int]] = []
    for shard, first in enumerate(corpus.shard_starts[:-1].tolist()):
        with open(corpus.local_path(shard), "rb") as f:
            data = f.read()
        count = int(corpus.shard_counts[shard])
        ptr = t.member_ptr[first:first + count + 1]
        members = np.arange(int(ptr[0]), int(ptr[-1]))
        starts = (np.repeat(t.offsets[first:first + count], np.diff(ptr))
                  + t.member_offset[members]).tolist()
        ends = (np.asarray(starts) + t.member_size[members]).tolist()
        codes = t.member_suffix[members].tolist()
        last = set((ptr[1:] - 1 - ptr[0]).tolist())  # each sample's last member
        payload, label = b"", 0
        for j, (code, start, end) in enumerate(zip(codes, starts, ends)):
            if code == bin_code:
                payload = data[start:end]
            elif code == cls_code:
                label = int(data[start:end])
            if j in last:
                batch.append((payload, label))
                if len(batch) == meta_batch:
                    yield collate(batch)
                    batch = []
    if batch:
        yield collate(batch)


def as_batch(batch: Batch) -> Batch:
    """The raw readers' batches are already ``(payload, labels)``."""
    return batch


def es_unpack(what: str) -> Callable[[es_stream.MetaBatch], Batch]:
    def unpack(mb: es_stream.MetaBatch) -> Batch:
        if not torch.equal(mb.ids, mb.data[1]):
            sys.exit(f"bench: FAILED {what}: meta-batch ids do not match its samples' labels")
        return mb.data
    return unpack


def bench(wds_dir: Path, mds_dir: Path, n: int, meta_batch: int, workers: list[int],
          repeats: int, es_shuffle: bool, only_es: bool = False) -> list[Result]:
    import webdataset as wds
    from streaming import StreamingDataset
    from streaming.base.util import clean_stale_shared_memory

    urls = sorted(str(p) for p in wds_dir.glob("*.tar"))
    wds_corpus = es_stream.Corpus.from_webdataset(wds_dir)
    mds_corpus = es_stream.Corpus.from_mds(mds_dir)
    assert wds_corpus.num_samples == mds_corpus.num_samples == n

    def wds_in_pipeline() -> wds.WebDataset:
        return (wds.WebDataset(urls, shardshuffle=False).to_tuple("bin", "cls")
                .batched(meta_batch, collation_fn=wds_collate, partial=True))

    def make_sd(predownload: int | None) -> StreamingDataset:
        # one StreamingDataset per timed run: its barrier file lock, once taken by this process
        # (num_workers=0), cannot be used by forked workers; the previous run's instance is
        # gone by now (time_epoch collects it), so its local dir is free again
        return StreamingDataset(local=str(mds_dir), batch_size=meta_batch, shuffle=False,
                                predownload=predownload)

    # leftovers of a crashed run on the same --dir would block StreamingDataset's local dir
    clean_stale_shared_memory()
    results: list[Result] = []
    for nw in workers:  # the loaders below are built and consumed within this iteration
        runs: list[tuple[str, Callable[[], Iterable[Any]], Callable[[Any], Batch]]] = [
            ("webdataset .batched", lambda: DataLoader(
                wds_in_pipeline(), batch_size=None, num_workers=nw), as_batch),
            ("webdataset DL-batch", lambda: DataLoader(
                wds.WebDataset(urls, shardshuffle=False).to_tuple("bin", "cls"),
                batch_size=meta_batch, num_workers=nw, collate_fn=wds_collate), as_batch),
            ("streaming", lambda: DataLoader(
                make_sd(None), batch_size=meta_batch, num_workers=nw,
                collate_fn=mds_collate), as_batch),
            ("streaming predl=N", lambda: DataLoader(
                make_sd(n), batch_size=meta_batch, num_workers=nw,
                collate_fn=mds_collate), as_batch),
        ]
        if only_es:
            runs = []
        if nw == 0:  # a single-process ceiling: the same for every worker count's table
            runs.append((LIMIT, lambda: offset_slicing_limit(wds_corpus, meta_batch), as_batch))
        for shuffle in [False, True] if es_shuffle else [False]:
            for fmt, corpus, decode in (("wds", wds_corpus, decode_wds), ("mds", mds_corpus, decode_mds)):
                name = f"es-stream/{fmt}" + (" shuffle" if shuffle else "")
                ds = es_stream.ESDataset(corpus, meta_batch, decode=decode, collate=collate,
                                         shuffle=shuffle)
                runs.append((name, lambda ds=ds: es_stream.loader(
                    ds, num_workers=nw, persistent_workers=False, pin_memory=False),
                    es_unpack(name)))
        for name, make, unpack in runs:
            seconds, cpu_main, cpu_workers = time_epoch(make, unpack, n, f"{name} workers={nw}",
                                                        repeats)
            results.append(Result(name, nw, seconds, n, cpu_main, cpu_workers))
            print(f"  {name:<22} workers={nw}  {n / seconds:>10,.0f} samples/s", flush=True)
    return results


# ----------------------------------------------------------------------------- report
def table(results: list[Result]) -> str:
    """Readers side by side, with ratios to the best raw webdataset and the best raw streaming
    setting at the same worker count, and the CPU each run used (cores busy = CPU / seconds)."""
    rows = [f"{'reader':<22} {'workers':>7} {'seconds':>8} {'samples/s':>10} {'vs wds':>7} {'vs sd':>7}"
            f" {'main cpu':>8} {'workers cpu':>11} {'cores':>5}",
            "-" * 94]
    for nw in sorted({r.workers for r in results}):
        group = [r for r in results if r.workers == nw]
        wds_best = max((r.rate for r in group if r.reader.startswith("webdataset")), default=math.nan)
        sd_best = max((r.rate for r in group if r.reader.startswith("streaming")), default=math.nan)
        for r in group:
            rows.append(f"{r.reader:<22} {nw:>7} {r.seconds:>8.3f} {r.rate:>10,.0f} "
                        f"{r.rate / wds_best:>6.2f}x {r.rate / sd_best:>6.2f}x "
                        f"{r.cpu_main:>8.2f} {r.cpu_workers:>11.2f} "
                        f"{(r.cpu_main + r.cpu_workers) / r.seconds:>5.2f}")
    limit = [r.rate for r in results if r.reader == LIMIT]
    if limit:
        rows.append("")
        for r in results:
            if r.reader.startswith("es-stream/wds"):
                rows.append(f"{r.reader} workers={r.workers}: {r.rate / limit[0]:.2f}x the "
                            "offset-slicing limit")
    for name in sorted({r.reader for r in results if r.reader.startswith("es-stream")}):
        rate = {r.workers: r.rate for r in results if r.reader == name}
        if 0 in rate:
            rows.extend(f"{name} workers={w} / workers=0: {rate[w] / rate[0]:.2f}x"
                        for w in sorted(rate) if w)
    return "\n".join(rows)


def machine_line() -> str:
    import streaming
    import webdataset

    cpus = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cpus
    return (f"machine: {cpus} CPUs ({usable} usable), {platform.machine()}, "
            f"python {platform.python_version()}, torch {torch.__version__}, "
            f"webdataset {webdataset.__version__}, streaming {streaming.__version__}, "
            f"es-stream {es_stream.__version__}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=20000, help="samples in the corpus")
    p.add_argument("--payload", type=int, default=1024, help="bytes of random payload a sample")
    p.add_argument("--meta-batch", type=int, default=256, help="batch / meta-batch size B")
    p.add_argument("--workers", default="0,2", help="comma-separated DataLoader worker counts")
    p.add_argument("--repeats", type=int, default=3, help="epochs timed per reader; best is kept")
    p.add_argument("--dir", default=None, help="where to write the shards (default: a temp dir, "
                   "removed afterwards)")
    p.add_argument("--only-es", action="store_true",
                   help="time only es-stream and the offset-slicing limit (no raw readers)")
    p.add_argument("--es-shuffle", action="store_true",
                   help="also time es-stream with shuffle=True (its default)")
    args = p.parse_args(argv)
    args.workers = [int(w) for w in args.workers.split(",") if w.strip()]
    if args.samples < 1 or args.payload < 1 or args.meta_batch < 1 or args.repeats < 1 \
            or not args.workers or min(args.workers) < 0:
        p.error("--samples, --payload, --meta-batch, --repeats must be >= 1 and --workers >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print(machine_line())
    where = contextlib.nullcontext(args.dir) if args.dir else \
        tempfile.TemporaryDirectory(prefix="es-bench-")
    with where as directory:
        root = Path(directory)
        t0 = time.perf_counter()
        # webdataset splits whole shards over workers: at least one shard for every worker
        per_shard = min(SHARD_SAMPLES, math.ceil(args.samples / max(args.workers + [1])))
        wds_dir, mds_dir = write_corpora(root, args.samples, args.payload, per_shard)
        n_tar, n_mds = len(list(wds_dir.glob("*.tar"))), len(list(mds_dir.glob("*.mds")))
        print(f"data: {args.samples} samples x {args.payload} B -> {n_tar} tar shards, "
              f"{n_mds} MDS shards under {root} (written in {time.perf_counter() - t0:.1f}s)")
        print(f"timing: one full epoch from a fresh DataLoader per run (persistent_workers=False, "
              f"worker start-up included), best of {args.repeats}; B={args.meta_batch}; "
              f"every reader decodes bin+cls and uses the same collate")
        results = bench(wds_dir, mds_dir, args.samples, args.meta_batch, args.workers,
                        args.repeats, args.es_shuffle, args.only_es)
    print()
    print(table(results))
    print(f"\nall readers saw each of the {args.samples} samples exactly once in every run")


if __name__ == "__main__":
    main()
