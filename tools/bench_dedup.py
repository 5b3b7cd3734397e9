"""Dedup throughput on one core, beside baselines in the same run, and memory per sample.

Samples: the web-like corpus of :mod:`pipelines.webtext` (``--samples`` samples of
``--seq-len`` bytes, built from the stdlib under ``--out``), read once through es-stream into
memory. The process is pinned to one CPU (``sched_setaffinity``) so every figure is one core's.

- **Exact**: :func:`es_stream.dedup.content_digests` + :func:`~es_stream.dedup.exact_groups`
  (BLAKE2b-128 and one sort) against a Python ``dict`` of the sample bytes (first id per
  content) and against xxh3-128 digests (``xxhash``, when installed) with the same sort; the
  decisions are checked equal.
- **Near**: :class:`~es_stream.dedup.MinHasher` signatures + :func:`~es_stream.dedup.near_groups`
  (numpy MinHash, 128 values, LSH 32x4, threshold 0.8) against ``datasketch`` (``MinHash`` with
  the same 128 permutations and 5-byte shingles, ``MinHashLSH`` at threshold 0.8, query then
  insert per sample, the usual streaming use) on ``--baseline-samples`` samples when installed;
  the share of samples on whose drop both agree is printed.
- **Memory**: tracemalloc's peak (numpy reports its buffers to it) during each decision, per
  sample, plus the state kept per sample (digest; signature).
- **End to end** (``--end-to-end``): :func:`es_stream.dedup.corpus_dedup` reading the shards
  with one DataLoader worker.

Each figure is samples per second of wall time and, in brackets, per second of the process's
CPU time (the two agree on an idle machine; on a shared one the CPU figure is one core's).

Goals: >= 200k samples/s exact, >= 20k samples/s near, one core.

    .venv/bin/python tools/bench_dedup.py [--samples 200000] [--seq-len 256]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from es_stream.dedup import (DedupConfig, MinHasher, content_digests,  # noqa: E402
                             corpus_dedup, exact_groups, near_groups)
from pipelines.textlm.data import _read_all  # noqa: E402
from pipelines.webtext import build  # noqa: E402


CPU = {}  # name -> best CPU seconds of the process (the machine may be shared: wall time lies)


def timed(fn, repeats: int, name: str = ""):
    """(best wall seconds of ``repeats`` calls, the last result); the best CPU seconds of the
    process go to ``CPU[name]``."""
    best, best_cpu, out = float("inf"), float("inf"), None
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        out = fn()
        best = min(best, time.perf_counter() - start)
        best_cpu = min(best_cpu, time.process_time() - start_cpu)
    CPU[name] = best_cpu
    return best, out


def rate(n: int, *names: str) -> str:
    return f"{n / sum(CPU[k] for k in names):,.0f}"


def peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def dict_first(samples: list[bytes]) -> np.ndarray:
    first: dict[bytes, int] = {}
    return np.fromiter((first.setdefault(s, i) for i, s in enumerate(samples)), np.int64,
                       count=len(samples))


def xxh_digests(samples: list[bytes]) -> np.ndarray:
    import xxhash

    joined = b"".join([xxhash.xxh3_128_digest(s) for s in samples])
    return np.frombuffer(joined, dtype=np.uint64).reshape(len(samples), 2)


def datasketch_near(samples: list[bytes], threshold: float, num_perm: int, k: int) -> np.ndarray:
    """Drop mask from datasketch: each sample queries the LSH of the kept ones, then is inserted
    when nothing similar was found (the streaming use of MinHashLSH)."""
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    drop = np.zeros(len(samples), bool)
    for i, s in enumerate(samples):
        m = MinHash(num_perm=num_perm, seed=1)
        m.update_batch([s[j:j + k] for j in range(max(1, len(s) - k + 1))])
        if lsh.query(m):
            drop[i] = True
        else:
            lsh.insert(i, m)
    return drop


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/bench_dedup", help="where the corpus is built (cached)")
    p.add_argument("--samples", type=int, default=200_000)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--baseline-samples", type=int, default=10_000,
                   help="samples the datasketch baseline runs on (it is slow)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--end-to-end", action="store_true")
    a = p.parse_args(argv)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    data = build(a.out, samples=a.samples, seq_len=a.seq_len, min_bytes=0)
    samples = [row.tobytes() for row in _read_all(data.corpus, a.seq_len)]
    n = len(samples)
    print(f"{n} samples of {a.seq_len} B (webtext, {data.directory.name}); one core; "
          f"python {platform.python_version()}, numpy {np.__version__}, {platform.processor() or platform.machine()}")

    def exact():
        return exact_groups(content_digests(samples))

    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    t_ex, ours = timed(exact, a.repeats, "exact")
    fresh = [bytes(bytearray(s)) for s in samples]  # bytes cache their hash: time it once, cold
    t_dict, base = timed(lambda: dict_first(fresh), 1, "dict")
    assert np.array_equal(ours, base), "exact decisions differ from the dict baseline"
    print(f"exact  es-stream (blake2b-128 + sort): {n / t_ex:>12,.0f} samples/s [cpu {rate(n, 'exact')}] "
          f"({int((ours != np.arange(n)).sum())} duplicates)")
    print(f"exact  baseline  (python dict of bytes): {n / t_dict:>10,.0f} samples/s [cpu {rate(n, 'dict')}] "
          f"(same decision; holds every sample's bytes, {a.seq_len}+ B/sample)")
    try:
        t_xxh, got = timed(lambda: exact_groups(xxh_digests(samples)), a.repeats, "xxh")
        assert np.array_equal(got, ours)
        print(f"exact  xxh3-128 + sort (alternative):    {n / t_xxh:>10,.0f} samples/s "
              f"[cpu {rate(n, 'xxh')}] (same decision)")
    except ImportError:
        print("exact  xxh3-128: xxhash not installed")
    digests = content_digests(samples)
    ex_peak = peak_bytes(lambda: exact_groups(digests))
    print(f"exact  memory: 16 B/sample kept (digest) + {ex_peak / n:.0f} B/sample peak while "
          "grouping")

    hasher = MinHasher()
    t_sig, sig = timed(lambda: hasher.signatures(samples), a.repeats, "sig")
    t_lsh, keeper = timed(lambda: near_groups(sig), a.repeats, "lsh")
    drop = keeper != np.arange(n)
    print(f"near   es-stream (numpy MinHash 128, LSH 32x4, J>=0.8): {n / (t_sig + t_lsh):>9,.0f} "
          f"samples/s [cpu {rate(n, 'sig', 'lsh')}] (signatures {n / t_sig:,.0f}/s "
          f"[cpu {rate(n, 'sig')}], LSH+verify {n / t_lsh:,.0f}/s [cpu {rate(n, 'lsh')}]; "
          f"{int(drop.sum())} near duplicates, exact ones included)")
    near_peak = peak_bytes(lambda: near_groups(sig))
    print(f"near   memory: {sig.itemsize * sig.shape[1]} B/sample kept (signature) + "
          f"{near_peak / n:.0f} B/sample peak while bucketing")
    exact_cpu, near_cpu = n / CPU["exact"], n / (CPU["sig"] + CPU["lsh"])
    print(f"goals (one core, CPU time): exact {exact_cpu:,.0f} >= 200,000 samples/s: "
          f"{'yes' if exact_cpu >= 200_000 else 'NO'}; near {near_cpu:,.0f} >= 20,000 samples/s: "
          f"{'yes' if near_cpu >= 20_000 else 'NO'}")
    m = min(n, a.baseline_samples)
    try:
        t_ds, ds_drop = timed(lambda: datasketch_near(samples[:m], 0.8, 128, 5), 1, "ds")
        small = near_groups(hasher.signatures(samples[:m])) != np.arange(m)
        print(f"near   baseline  (datasketch MinHash + MinHashLSH, {m} samples): {m / t_ds:>9,.0f} "
              f"samples/s [cpu {rate(m, 'ds')}]; drops {int(ds_drop.sum())} vs es-stream {int(small.sum())}, "
              f"same decision on {100 * (ds_drop == small).mean():.2f}% of samples")
    except ImportError:
        print("near   baseline: datasketch not installed (pip install datasketch)")
    if a.end_to_end:
        for near in (False, True):
            t, res = timed(lambda: corpus_dedup(data.corpus, DedupConfig(near=near), num_workers=1), 1)
            print(f"end to end ({'near' if near else 'exact'}, shards read by 1 worker): "
                  f"{n / t:,.0f} samples/s, kept {res.counts['kept']}")


if __name__ == "__main__":
    main()
