"""One rank of a real 2-process gloo run, started by test_agreement.py: builds an ESDataset
with the seed and meta-batch size given for this rank, runs the epoch-start agreement check,
and records what happened. Usage: python _dist_agree.py CORPUS OUT_JSON SEED0,SEED1 B0,B1 [VIA]
where VIA is "check" (default: check_ranks_agree called directly) or "set_epoch" (the check
ESDataset.set_epoch runs; the dataset is then iterated for the epoch and the ids it yielded are
recorded)."""

import json
import sys

import torch.distributed as dist

from es_stream import Corpus, ESDataset
from es_stream.agreement import check_ranks_agree, dataset_fields


def main() -> None:
    corpus_path, out, seeds, sizes = sys.argv[1:5]
    via = sys.argv[5] if len(sys.argv) > 5 else "check"
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    ds = ESDataset(Corpus.load(corpus_path), int(sizes.split(",")[rank]),
                   seed=int(seeds.split(",")[rank]))
    try:
        if via == "set_epoch":
            ds.set_epoch(0)
            ids = [int(i) for mb in ds for i in mb.ids.tolist()]
            result = {"rank": rank, "ok": True, "ids": ids}
        else:
            check_ranks_agree(dataset_fields(ds, 0), where="at the start of epoch 0")
            result = {"rank": rank, "ok": True}
    except Exception as exc:  # noqa: BLE001 - recorded for the test
        result = {"rank": rank, "ok": False, "type": type(exc).__name__, "message": str(exc)}
    dist.barrier()  # both ranks got here: nothing hung
    dist.destroy_process_group()
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
