"""Bytes an epoch of uncompressed MDS shards fetches by range from a server on 127.0.0.1,
unpruned vs pruned, counted by the reader's own fetcher and by the server behind the proxy.

    python tools/bench_remote_mds.py [--samples 4000] [--sample-bytes 4096] [--latency 0.02]

Writes ``--samples`` samples of ``--sample-bytes`` random bytes with ``streaming.MDSWriter``
(uncompressed, about 4 shards), writes an ESWP manifest pruning ``1 - --keep`` of them, serves the
directory with the Range HTTP server behind the fault proxy (``--latency`` seconds per request,
``--bandwidth`` bytes/s per response; tests/servers.py), and reads epoch 1 twice, unpruned and
pruned:

* ``fetcher`` rows: the meta-batches of the epoch's plan read in this process by one
  :class:`~es_stream.remote.mds.RemoteMDSReader`; bytes and requests are its fetcher's
  ``bytes_fetched`` and ``requests`` (shard headers included);
* ``loader`` rows: ``ESDataset`` through ``es_stream.loader`` with 2 workers; bytes and
  requests are what the proxy sent; samples/s and seconds to the first meta-batch.

Needs ``pip install 'es-stream[dev]'`` (obstore, mosaicml-streaming).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))  # the test servers
sys.path.insert(0, os.path.join(HERE, ".."))

from servers import FaultProxy, RangeHTTPServer  # noqa: E402


def _write(directory: str, n: int, sample: int) -> None:
    from streaming import MDSWriter

    # size_limit so that the samples fill about 4 shards
    limit = (n * (sample + 16)) // 4 + 1
    with MDSWriter(out=directory, columns={"bin": "bytes", "cls": "int"},
                   size_limit=limit) as w:
        for i in range(n):
            w.write({"bin": os.urandom(sample), "cls": i % 10})


def pruned_mds(args: argparse.Namespace) -> list[dict]:
    """Print and return one row per (how, epoch): requests, bytes, ratio to unpruned."""
    import torch

    from es_stream import Corpus, ESDataset, ESWPPolicy, Pruner, ScoreStore, loader
    from es_stream.remote.mds import RemoteMDSReader

    n, sample = args.samples, args.sample_bytes
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "mds")
        _write(data, n, sample)
        local = Corpus.from_mds(data)
        store = ScoreStore(local.num_samples)
        store.scatter(torch.arange(n), torch.rand(n, generator=torch.Generator().manual_seed(0)))
        manifests = os.path.join(tmp, "m")
        Pruner(local, store, ESWPPolicy(ratio=1 - args.keep, burn_in_epochs=0, anneal=0.0),
               manifests).on_epoch_end(0, 4)
        with RangeHTTPServer(tmp) as http, FaultProxy(http.port, latency_s=args.latency,
                                                      bandwidth=args.bandwidth) as proxy:
            remote = Corpus.from_mds(f"{proxy.url}/mds")
            print(f"{n} samples of {sample} B in {remote.num_shards} uncompressed MDS shards over "
                  f"http, proxy {args.latency * 1e3:.0f} ms per request; meta-batch 256")
            print(f"{'how':8} {'epoch':9} {'samples':>8} {'requests':>9} {'MB':>7} "
                  f"{'x unpruned':>11} {'samples/s':>10} {'first s':>8}")
            for how in ("fetcher", "loader"):
                base = None
                for name, m in (("unpruned", None), ("pruned", manifests)):
                    ds = ESDataset(remote, 256, seed=0, manifests=m)
                    ds.set_epoch(1)
                    r0, b0 = proxy.requests, proxy.bytes_sent
                    t = time.perf_counter()
                    first, count = None, 0
                    if how == "fetcher":
                        reader = RemoteMDSReader(remote)
                        try:
                            for ids in ds.plan(1).worker_batches(1, 0, 0):
                                shards, _ = remote.locate(ids)
                                reader.read_batch(ids, shards)
                                first = first or time.perf_counter() - t
                                count += len(ids)
                            requests, fetched = reader.fetcher.requests, reader.fetcher.bytes_fetched
                        finally:
                            reader.close()
                    else:
                        # obstore ran here (from_mds): workers by forkserver
                        for mb in loader(ds, num_workers=2, multiprocessing_context="forkserver"):
                            first = first or time.perf_counter() - t
                            count += len(mb)
                        requests, fetched = proxy.requests - r0, proxy.bytes_sent - b0
                    took = time.perf_counter() - t
                    base = base or fetched
                    row = {"how": how, "epoch": name, "samples": count, "requests": requests,
                           "bytes": fetched, "ratio": fetched / base,
                           "samples_s": count / took, "first_s": first}
                    rows.append(row)
                    print(f"{how:8} {name:9} {count:8d} {requests:9d} {fetched / 1e6:7.2f} "
                          f"{row['ratio']:11.2f} {row['samples_s']:10.0f} {first:8.2f}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--sample-bytes", type=int, default=4096)
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--latency", type=float, default=0.02)
    parser.add_argument("--bandwidth", type=float, default=50e6)
    pruned_mds(parser.parse_args())


if __name__ == "__main__":
    main()
