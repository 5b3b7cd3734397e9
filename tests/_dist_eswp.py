"""One rank of a real multi-process ESWP run (gloo on CPU), started by test_distributed.py.

Usage: python _dist_eswp.py CORPUS_PARQUET META_BATCH B WORKERS EPOCHS OUT_DIR [--memmap]
Each epoch: stream this rank's meta-batches, select with ES on deterministic per-(id, epoch)
losses, then Pruner.on_epoch_end (rank merge, decision on rank 0, barrier). Writes, per epoch,
the ids trained and selected and the store after the epoch end, to OUT_DIR/rank{R}-*.
"""

import json
import sys

import numpy as np
import torch
import torch.distributed as dist

from es_stream import Corpus, ESDataset, ESSelector, ESWPPolicy, Pruner, ScoreStore, loader


def losses_of(ids: torch.Tensor, epoch: int) -> torch.Tensor:
    """A deterministic stand-in for a model's per-sample loss, different every epoch."""
    return ((ids.double() * 0.6180339 + epoch * 0.37) % 1.0 + 0.05).float()


class CountingPruner(Pruner):
    writes = 0

    def write(self, epoch, total_epochs):
        CountingPruner.writes += 1
        super().write(epoch, total_epochs)


def main() -> None:
    corpus_path, big_b, b, workers, epochs, out = sys.argv[1:7]
    big_b, b, workers, epochs = int(big_b), int(b), int(workers), int(epochs)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    corpus = Corpus.load(corpus_path)
    ds = ESDataset(corpus, big_b, seed=11, manifests=f"{out}/manifests")
    store = (ScoreStore.open(f"{out}/rank{rank}-live.npy", corpus.num_samples, buffer_size=7)
             if "--memmap" in sys.argv else ScoreStore(corpus.num_samples))
    selector = ESSelector(corpus.num_samples, b, seed=100 + rank, store=store)
    pruner = CountingPruner(corpus, store, ESWPPolicy(ratio=0.4, burn_in_epochs=0, anneal=0.0),
                            f"{out}/manifests")
    record = {"rank": rank, "trained": [], "selected": []}
    dl = loader(ds, num_workers=workers)
    for epoch in range(epochs):
        ds.set_epoch(epoch)
        trained, selected = [], []
        for mb in dl:
            if len(mb) <= b:  # a short tail: train on all of it
                chosen = torch.arange(len(mb))
                selector.update(mb.ids, losses_of(mb.ids, epoch))
            else:
                chosen = selector.select(mb.ids, losses_of(mb.ids, epoch))
            trained += mb.ids.tolist()
            selected += mb.ids[chosen].tolist()
            dist.all_reduce(torch.ones(1))  # a collective per step, as DDP does
        pruner.on_epoch_end(epoch, epochs)
        np.save(f"{out}/rank{rank}-epoch{epoch}.npy", store.to_numpy())
        record["trained"].append(trained)
        record["selected"].append(selected)
    record["writes"] = CountingPruner.writes
    dist.barrier()
    dist.destroy_process_group()
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    main()
