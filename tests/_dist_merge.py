"""One rank of a real 2-process score merge (gloo), started by test_distributed.py and by
tools/gpu_check.py (there with the store on the GPU).

Usage: python _dist_merge.py DEVICE BACKING OUT_DIR   (memory or memmap backing; rank, world size
and rendezvous from the torchrun environment variables). Rank r scores ids r, r+2, r+4, ... below
40 with 1000 r + id + 1, and both ranks score id 41 (the higher rank's value must win); the merge
runs in chunks of 7 pairs. Writes OUT_DIR/rank{r}.npy (the merged store) and rank{r}.json.
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from es_stream import ScoreStore
from es_stream.distributed import merge_rank_scores

N = 50


def updates(rank: int) -> list[int]:
    """The ids rank ``rank`` scores (with 1000 rank + id + 1)."""
    return list(range(rank, 40, 2)) + [41]


def expected_scores() -> np.ndarray:
    """Both ranks' stores after the merge: every rank's updates, the higher rank's on id 41."""
    out = np.full(N, 1.0 / N, np.float32)
    for rank in range(2):
        ids = np.array(updates(rank))
        out[ids] = 1000.0 * rank + ids + 1
    return out


def main() -> None:
    device, backing, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if backing == "memmap":
        store = ScoreStore.open(out / f"store{rank}.npy", N)
    else:
        store = ScoreStore(N, device=device)
    ids = torch.tensor(updates(rank), device=store.device)
    store.scatter(ids, (1000.0 * rank + ids + 1).float())
    applied = merge_rank_scores(store, chunk=7)
    again = merge_rank_scores(store, chunk=7)  # nothing new since: nothing sent
    np.save(out / f"rank{rank}.npy", store.to_numpy())
    (out / f"rank{rank}.json").write_text(json.dumps(
        {"applied": applied, "again": again, "device": str(store.device)}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
