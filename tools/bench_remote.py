"""Remote reads on 127.0.0.1: which client, which coalescing gap, how many bytes pruning saves.

    python tools/bench_remote.py clients   # ranged-GET throughput: obstore vs boto3 vs fsspec
    python tools/bench_remote.py gap       # seconds/requests/bytes per coalescing gap, 20 ms RTT
    python tools/bench_remote.py pruned    # bytes fetched by a pruned vs an unpruned epoch
    python tools/bench_remote.py epoch     # ESDataset epochs over https:// tar shards, 20 ms
    python tools/bench_remote.py compare   # es-stream vs webdataset by URL vs StreamingDataset

Every server is real and local (tests/servers.py: moto's S3 API, a Range HTTP server, the
fault proxy adding latency and a bandwidth cap); each section prints its figures side by side
from one run. Needs ``pip install 'es-stream[dev]'`` (obstore, moto, boto3).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))  # the test servers
sys.path.insert(0, os.path.join(HERE, ".."))

from servers import FaultProxy, RangeHTTPServer, S3Server  # noqa: E402


def _ranges(size: int, n: int, length: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, size - length, n).tolist()


def _timed(fn, offsets, threads: int) -> float:
    t = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(fn, offsets))
    return time.perf_counter() - t


def clients(args: argparse.Namespace) -> None:
    """Ranged GETs of ``--length`` bytes, ``--threads`` in flight, by each client, against the
    same servers (moto S3 for obstore and boto3; the Range HTTP server for obstore and fsspec's
    aiohttp HTTP filesystem, which is what fsspec offers without s3fs)."""
    import boto3
    import fsspec
    import obstore

    from es_stream.remote import open_store

    size, n, length = args.size, args.requests, args.length
    blob = os.urandom(size)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, S3Server() as s3, RangeHTTPServer(tmp) as http:
        with open(os.path.join(tmp, "blob.bin"), "wb") as f:
            f.write(blob)
        s3.upload_dir("bench", tmp)
        os.environ.update(s3.env())
        offsets = _ranges(size, n, length)
        store, path = open_store("s3://bench/blob.bin")
        boto = boto3.client("s3", endpoint_url=s3.url, region_name="us-east-1")
        hstore, hpath = open_store(f"{http.url}/blob.bin")
        hfs = fsspec.filesystem("http")
        cases = {
            "s3  obstore": lambda o: obstore.get_range(store, path, start=o, length=length),
            "s3  boto3": lambda o: boto.get_object(Bucket="bench", Key="blob.bin",
                                                   Range=f"bytes={o}-{o + length - 1}")["Body"].read(),
            "http obstore": lambda o: obstore.get_range(hstore, hpath, start=o, length=length),
            "http fsspec": lambda o: hfs.cat_file(f"{http.url}/blob.bin", start=o, end=o + length),
        }
        for name, fn in cases.items():
            assert bytes(fn(offsets[0])) == blob[offsets[0]:offsets[0] + length], name
            fn(offsets[1])  # warm connections
            best = min(_timed(fn, offsets, args.threads) for _ in range(args.repeat))
            rows.append((name, n / best, n * length / best / 1e6))
    print(f"{n} ranged GETs of {length} B, {args.threads} in flight, best of {args.repeat}")
    print(f"{'client':14} {'req/s':>8} {'MB/s':>8}")
    for name, rps, mbs in rows:
        print(f"{name:14} {rps:8.0f} {mbs:8.1f}")


def _pruned_layout(n: int, sample: int, keep: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Offsets of the kept samples of a shard of ``n`` samples of ``sample`` bytes."""
    kept = np.sort(np.random.default_rng(seed).permutation(n)[:int(n * keep)])
    return kept * sample, np.full(len(kept), sample)


def gap(args: argparse.Namespace) -> None:
    """Read the kept half of a shard's samples through the proxy (``--latency`` per request,
    ``--bandwidth`` per response) with each coalescing gap: seconds, requests, bytes."""
    from es_stream.remote import RangeFetcher

    n, sample = args.samples, args.sample_bytes
    with tempfile.TemporaryDirectory() as tmp, RangeHTTPServer(tmp) as http:
        with open(os.path.join(tmp, "shard.bin"), "wb") as f:
            f.write(os.urandom(n * sample))
        with FaultProxy(http.port, latency_s=args.latency, bandwidth=args.bandwidth) as proxy:
            url = f"{proxy.url}/shard.bin"
            offs, sizes = _pruned_layout(n, sample, args.keep, 0)
            print(f"{n} samples of {sample} B, {args.keep:.0%} kept at random; proxy "
                  f"{args.latency * 1e3:.0f} ms per request, {args.bandwidth / 1e6:.0f} MB/s per "
                  f"response; {args.threads} in flight")
            print(f"{'gap':>9} {'seconds':>8} {'requests':>9} {'MB fetched':>11} {'x kept bytes':>13}")
            for g in (0, 4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20):
                with RangeFetcher(gap=g, max_in_flight=args.threads) as f:
                    t = time.perf_counter()
                    f.read_ranges([url] * len(offs), offs, sizes)
                    took = time.perf_counter() - t
                print(f"{g:9d} {took:8.2f} {f.requests:9d} {f.bytes_fetched / 1e6:11.2f} "
                      f"{f.bytes_fetched / sizes.sum():13.2f}")


def pruned(args: argparse.Namespace) -> None:
    """Bytes and requests an epoch's reads fetch, unpruned vs 50% pruned, at the default gap
    and at gap 0 (the range fetcher alone; the full loader comparison needs the reader hook)."""
    from es_stream.remote import DEFAULT_GAP, RangeFetcher

    n, sample = args.samples, args.sample_bytes
    with tempfile.TemporaryDirectory() as tmp, RangeHTTPServer(tmp) as http:
        with open(os.path.join(tmp, "shard.bin"), "wb") as f:
            f.write(os.urandom(n * sample))
        url = f"{http.url}/shard.bin"
        print(f"{'case':22} {'requests':>9} {'MB fetched':>11} {'x unpruned':>11}")
        for g in sorted({0, DEFAULT_GAP, 16 << 10}):
            base = None
            for keep in (1.0, 0.5):
                offs, sizes = _pruned_layout(n, sample, keep, 1)
                with RangeFetcher(gap=g) as f:
                    # one meta-batch of 256 samples at a time, as the reader would fetch them
                    for i in range(0, len(offs), 256):
                        f.read_ranges([url] * len(offs[i:i + 256]), offs[i:i + 256],
                                      sizes[i:i + 256])
                base = base or f.bytes_fetched
                print(f"{f'gap {g} keep {keep:.0%}':22} {f.requests:9d} "
                      f"{f.bytes_fetched / 1e6:11.2f} {f.bytes_fetched / base:11.2f}")


def epoch(args: argparse.Namespace) -> None:
    """One ESDataset epoch over tar shards served by the Range HTTP server behind the proxy
    (``--latency`` per request), unpruned and 50%-pruned (an ESWP manifest), 2 workers: bytes
    and requests the server answered, samples/s, time to the first meta-batch."""
    import torch
    import webdataset as wds

    from es_stream import Corpus, ESDataset, ESWPPolicy, Pruner, ScoreStore, loader
    from es_stream.remote.tar import remote_corpus

    n, sample = args.samples, args.sample_bytes
    with tempfile.TemporaryDirectory() as tmp:
        shards = os.path.join(tmp, "shards")
        os.makedirs(shards)
        with wds.ShardWriter(os.path.join(shards, "s-%04d.tar"), maxcount=n // 4, verbose=0) as w:
            for i in range(n):
                w.write({"__key__": f"{i:08d}", "bin": os.urandom(sample), "cls": i % 10})
        local = Corpus.from_webdataset(shards)
        store = ScoreStore(local.num_samples)
        store.scatter(torch.arange(n), torch.rand(n, generator=torch.Generator().manual_seed(0)))
        Pruner(local, store, ESWPPolicy(ratio=0.5, burn_in_epochs=0, anneal=0.0),
               os.path.join(tmp, "m")).on_epoch_end(0, 4)
        with RangeHTTPServer(shards) as http, FaultProxy(http.port, latency_s=args.latency,
                                                        bandwidth=args.bandwidth) as proxy:
            remote = remote_corpus(local, [f"{proxy.url}/{os.path.basename(s.name)}"
                                           for s in local.shards])
            print(f"{n} samples of {sample} B in 4 tar shards over http, proxy "
                  f"{args.latency * 1e3:.0f} ms per request; meta-batch 256, 2 workers")
            print(f"{'case':10} {'samples':>8} {'requests':>9} {'MB':>7} {'x unpruned':>11} "
                  f"{'samples/s':>10} {'first s':>8}")
            base = None
            for name, manifests in (("unpruned", None), ("pruned", os.path.join(tmp, "m"))):
                ds = ESDataset(remote, 256, seed=0, manifests=manifests)
                ds.set_epoch(1)
                r0, b0 = proxy.requests, proxy.bytes_sent
                t = time.perf_counter()
                first, count = None, 0
                for mb in loader(ds, num_workers=2):
                    first = first or time.perf_counter() - t
                    count += len(mb)
                took = time.perf_counter() - t
                fetched = proxy.bytes_sent - b0
                base = base or fetched
                print(f"{name:10} {count:8d} {proxy.requests - r0:9d} {fetched / 1e6:7.2f} "
                      f"{fetched / base:11.2f} {count / took:10.0f} {first:8.2f}")


def _write_both(root: str, n: int, sample: int, shards: int) -> tuple[str, str]:
    """The same ``n`` samples as WebDataset tar shards and as MDS shards under ``root``."""
    import webdataset as wds
    from streaming import MDSWriter

    tar_dir, mds_dir = os.path.join(root, "tar"), os.path.join(root, "mds")
    os.makedirs(tar_dir)
    rng = np.random.default_rng(0)
    per = -(-n // shards)
    with wds.ShardWriter(os.path.join(tar_dir, "s-%04d.tar"), maxcount=per, verbose=0) as tw, \
            MDSWriter(out=mds_dir, columns={"key": "str", "bin": "bytes"},
                      size_limit=per * (sample + 64)) as mw:
        for i in range(n):
            payload = rng.bytes(sample)
            tw.write({"__key__": f"{i:08d}", "bin": payload})
            mw.write({"key": f"{i:08d}", "bin": payload})
    return tar_dir, mds_dir


def _epoch_figures(proxy, batches) -> tuple[int, int, int, float, float]:
    """(samples, requests, bytes, seconds, seconds to the first batch) of one pass over the
    iterable ``batches`` (each item: how many samples it holds)."""
    r0, b0 = proxy.requests, proxy.bytes_sent
    t = time.perf_counter()
    first, count = None, 0
    for size in batches:
        first = first or time.perf_counter() - t
        count += size
    return count, proxy.requests - r0, proxy.bytes_sent - b0, time.perf_counter() - t, first


def compare(args: argparse.Namespace) -> None:
    """One epoch over the same samples in moto's S3 API behind the fault proxy (``--latency``
    per request, ``--link`` bytes/s shared by every response, as one network link), cold cache
    each, 2 DataLoader workers, batches of 256: es-stream unpruned and 50%-pruned (tar shards
    by ``s3://``), webdataset reading the tar shards by URL (``pipe:curl`` of presigned URLs),
    and StreamingDataset with ``remote=s3://`` over an MDS copy of the same samples."""
    import shutil

    import torch
    from streaming import StreamingDataset
    from torch.utils.data import DataLoader
    import webdataset as wds

    from es_stream import Corpus, ESDataset, ESWPPolicy, Pruner, ScoreStore, loader
    from es_stream.remote.tar import remote_corpus

    n, sample, shards = args.samples, args.sample_bytes, args.shards
    with tempfile.TemporaryDirectory() as tmp:
        tar_dir, mds_dir = _write_both(tmp, n, sample, shards)
        cache = os.path.join(tmp, "cache")
        os.environ["ES_STREAM_CACHE"] = cache  # before any worker server starts
        local = Corpus.from_webdataset(tar_dir)
        store = ScoreStore(local.num_samples)
        store.scatter(torch.arange(n), torch.rand(n, generator=torch.Generator().manual_seed(0)))
        Pruner(local, store, ESWPPolicy(ratio=0.5, burn_in_epochs=0, anneal=0.0),
               os.path.join(tmp, "m")).on_epoch_end(0, 4)

        run_ids = iter(range(1 << 30))
        smds = [os.path.join(tmp, "smds")]

        def fresh() -> None:
            # a new local directory per run: streaming keeps what it downloaded in shared
            # memory keyed by it, which a removed directory would contradict
            from streaming.base.util import clean_stale_shared_memory

            clean_stale_shared_memory()
            shutil.rmtree(cache, ignore_errors=True)
            os.makedirs(cache)
            smds[0] = os.path.join(tmp, f"smds-{next(run_ids)}")

        rows = []
        with contextlib.ExitStack() as stack:
            if args.server == "s3":
                s3 = stack.enter_context(S3Server())
                tar_urls = s3.upload_dir("bench", tar_dir, prefix="tar")
                s3.upload_dir("bench", mds_dir, prefix="mds")
                upstream = s3.port
            else:  # StreamingDataset has no http(s) remote: it is left out
                upstream = stack.enter_context(RangeHTTPServer(tmp)).port
            proxy = stack.enter_context(FaultProxy(upstream, latency_s=args.latency,
                                                   link_bandwidth=args.link))
            if args.server == "s3":
                import boto3

                os.environ.update(s3.env(proxy.url))
                os.environ["S3_ENDPOINT_URL"] = proxy.url  # what streaming reads
                remote = remote_corpus(local, tar_urls, storage_options={"endpoint": proxy.url})
                client = boto3.client("s3", endpoint_url=proxy.url, region_name="us-east-1",
                                      aws_access_key_id="testing", aws_secret_access_key="testing")
                wds_urls = [client.generate_presigned_url(
                    "get_object", Params={"Bucket": "bench", "Key": u.split("/", 3)[3]})
                    for u in tar_urls]
            else:
                wds_urls = [f"{proxy.url}/tar/{os.path.basename(s.name)}" for s in local.shards]
                remote = remote_corpus(local, wds_urls)

            def es(manifests, block_size=1 << 18):
                ds = ESDataset(remote, 256, seed=0, manifests=manifests, block_size=block_size)
                ds.set_epoch(1)
                return (len(mb) for mb in loader(ds, num_workers=2))

            def webdataset():
                ds = wds.WebDataset([f"pipe:curl -s -f '{u}'" for u in wds_urls],
                                    shardshuffle=False, empty_check=False).shuffle(1000)
                dl = DataLoader(ds.batched(256, partial=True), batch_size=None, num_workers=2)
                return (len(b[0]) if isinstance(b, (list, tuple)) else len(b["__key__"])
                        for b in dl)

            def streaming():
                ds = StreamingDataset(remote="s3://bench/mds", local=smds[0],
                                      batch_size=256, shuffle=True, shuffle_seed=0)
                dl = DataLoader(ds, batch_size=256, num_workers=2)
                return (len(b["key"]) for b in dl)

            cases = [("es-stream unpruned", lambda: es(None)),
                     ("es-stream 50% pruned", lambda: es(os.path.join(tmp, "m"))),
                     # shuffle blocks of 2 shards: a meta-batch draws from 2 or 3 shards, so
                     # downloads overlap reading instead of all coming first
                     ("es-stream unpruned, blocks", lambda: es(None, 2 * n // shards)),
                     ("webdataset by URL", webdataset)]
            if args.server == "s3":
                cases.append(("StreamingDataset remote=", streaming))
            for name, make in cases:
                runs = []
                for _ in range(args.repeat):
                    fresh()
                    runs.append(_epoch_figures(proxy, make()))
                rows.append((name, *min(runs, key=lambda r: r[3])))
        where = "moto's S3 API" if args.server == "s3" else "the Range HTTP server"
        print(f"{n} samples of {sample} B in {shards} shards in {where}; proxy "
              f"{args.latency * 1e3:.0f} ms per request, link {args.link / 1e6:.0f} MB/s; "
              f"batches of 256, 2 workers, cold cache, best of {args.repeat}")
        print(f"{'reader':26} {'samples':>8} {'requests':>9} {'MB':>7} {'seconds':>8} "
              f"{'samples/s':>10} {'first s':>8}")
        for name, count, requests, fetched, took, first in rows:
            print(f"{name:26} {count:8d} {requests:9d} {fetched / 1e6:7.1f} {took:8.2f} "
                  f"{count / took:10.0f} {first:8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("section", choices=["clients", "gap", "pruned", "epoch", "compare"])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--size", type=int, default=4 << 20, help="object bytes (clients)")
    parser.add_argument("--length", type=int, default=256 << 10)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--sample-bytes", type=int, default=4096)
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--latency", type=float, default=0.02)
    parser.add_argument("--bandwidth", type=float, default=50e6)
    parser.add_argument("--link", type=float, default=100e6,
                        help="bytes/s shared by all responses (compare)")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--server", choices=["s3", "http"], default="s3",
                        help="compare: moto's S3 API (all four readers) or the Range HTTP "
                             "server (no StreamingDataset: it has no http remote)")
    args = parser.parse_args()
    {"clients": clients, "gap": gap, "pruned": pruned, "epoch": epoch,
     "compare": compare}[args.section](args)


if __name__ == "__main__":
    main()
