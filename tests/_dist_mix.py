"""One rank of a real multi-process mixed run (gloo on CPU), started by test_mixing.py.

Usage: python _dist_mix.py WDS_PARQUET MDS_PARQUET META_BATCH WORKERS EPOCH_SIZE OUT_JSON
(rank, world size and rendezvous come from the usual torchrun environment variables).
"""

import json
import sys

import torch
import torch.distributed as dist

from es_stream import Corpus, ESDataset, loader
from es_stream.mixing import MixedDataset


def main() -> None:
    wds_path, mds_path, b, workers, epoch_size, out = sys.argv[1:7]
    dist.init_process_group("gloo")
    parts = [ESDataset(Corpus.load(p), int(b), seed=3) for p in (wds_path, mds_path)]
    mix = MixedDataset(parts, (0.7, 0.3), epoch_size=int(epoch_size), seed=5)
    dl = loader(mix, num_workers=int(workers))
    record = {"rank": dist.get_rank(), "epochs": []}
    for epoch in range(2):
        mix.set_epoch(epoch)
        batches = []
        for mb in dl:
            batches.append(mb.ids.tolist())
            dist.all_reduce(torch.ones(1))  # unequal step counts would hang here
        record["epochs"].append(batches)
    dist.barrier()
    dist.destroy_process_group()
    with open(out, "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    main()
