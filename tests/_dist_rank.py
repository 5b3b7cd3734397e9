"""One rank of a real multi-process run (gloo on CPU), started by test_distributed.py.

Usage: python _dist_rank.py CORPUS_PARQUET META_BATCH WORKERS EPOCHS OUT_JSON [MANIFESTS]
(rank, world size and rendezvous come from the usual torchrun environment variables).
"""

import json
import sys

import torch
import torch.distributed as dist

from es_stream import Corpus, ESDataset, loader


def main() -> None:
    corpus_path, b, workers, epochs, out = sys.argv[1:6]
    manifests = sys.argv[6] if len(sys.argv) > 6 else None
    dist.init_process_group("gloo")
    ds = ESDataset(Corpus.load(corpus_path), int(b), seed=7, manifests=manifests)
    dl = loader(ds, num_workers=int(workers))
    record = {"rank": dist.get_rank(), "epochs": []}
    for epoch in range(int(epochs)):
        ds.set_epoch(epoch)
        batches = []
        for mb in dl:
            batches.append(mb.ids.tolist())
            # a collective per step, as DDP does: unequal step counts would hang here
            dist.all_reduce(torch.ones(1))
        record["epochs"].append(batches)
    dist.barrier()
    dist.destroy_process_group()
    with open(out, "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    main()
