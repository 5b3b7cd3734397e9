"""One rank of a real 2-process gloo run, started by test_streaming_dataset_ranks.py: builds an
ESStreamingDataset over MDS_DIR with this rank's shuffle seed, runs the epoch-start check
(ESStreamingDataset.check_ranks) and records what happened.
Usage: python _dist_stream_agree.py MDS_DIR OUT_JSON SEED0,SEED1"""

import faulthandler
import json
import os
import sys
from datetime import timedelta

import torch.distributed as dist

from es_stream.integrations.streaming_dataset import ESStreamingDataset


def main() -> None:
    local, out, seeds = sys.argv[1:4]
    # streaming's own setup can wait forever on shared memory (see below): stop, do not hang
    faulthandler.dump_traceback_later(90, exit=True)
    # a short timeout: a rank whose peer failed to build its dataset stops instead of waiting
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    try:
        ds = ESStreamingDataset(local=local, batch_size=4, shuffle=True,
                                shuffle_seed=int(seeds.split(",")[rank]))
    except Exception as exc:  # noqa: BLE001 - streaming's setup, not what is tested
        # streaming picks its shared-memory prefix on each rank from /dev/shm as it is: another
        # job on the machine creating one meanwhile gives the ranks different prefixes
        with open(out, "w") as f:
            json.dump({"rank": rank, "setup_failed": f"{type(exc).__name__}: {exc}"}, f)
        os._exit(3)
    try:
        ds.check_ranks(0)
        result = {"rank": rank, "ok": True}
    except Exception as exc:  # noqa: BLE001 - recorded for the test
        result = {"rank": rank, "ok": False, "type": type(exc).__name__, "message": str(exc)}
    dist.barrier()  # both ranks got here: nothing hung
    dist.destroy_process_group()
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
