"""A deterministic CPU training run with ES + ESWP that checkpoints every 5 steps and can be
killed (SIGKILL) at a given step; started again, it resumes from its last checkpoint.

Usage: python _resume_run.py CORPUS_PARQUET OUT_DIR LOG_NAME [KILL_AT_STEP]
Appends one JSON line per step (step, epoch, selected ids) to OUT_DIR/LOG_NAME and, at the end,
saves the final scores to OUT_DIR/final-scores.npy. Used by test_resume.py.
"""

import json
import os
import signal
import sys

import torch
import torch.nn.functional as F

from es_stream import (Checkpointer, Corpus, ESDataset, ESSelector, ESWPPolicy, Pruner, ScoreStore,
                       loader)

EPOCHS, META_BATCH, BATCH, EVERY = 4, 16, 6, 5


def main() -> None:
    corpus_path, out, log_name = sys.argv[1:4]
    kill_at = int(sys.argv[4]) if len(sys.argv) > 4 else -1
    torch.manual_seed(0)
    corpus = Corpus.load(corpus_path)
    n = corpus.num_samples
    dataset = ESDataset(corpus, META_BATCH, seed=3, drop_last=True, manifests=f"{out}/manifests")
    store = ScoreStore.open(f"{out}/live-scores.npy", n, buffer_size=50)
    selector = ESSelector(n, BATCH, seed=5, store=store)
    pruner = Pruner(corpus, store, ESWPPolicy(ratio=0.3, anneal=0.25, burn_in_epochs=1),
                    f"{out}/manifests")
    model = torch.nn.Linear(8, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    checkpoints = Checkpointer(f"{out}/checkpoints")

    step, start_epoch, batches = 0, 0, 0
    loaded = checkpoints.load(store=store)  # the live store gets the checkpoint's scores
    if loaded is not None:
        step, state = loaded
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        selector.load_state_dict(state["selector"])
        dataset.load_state_dict(state["dataset"])
        pruner.load_state_dict(state["pruner"])
        start_epoch, batches = state["dataset"]["epoch"], state["dataset"]["batches"]

    log = open(os.path.join(out, log_name), "a")
    dl = loader(dataset, num_workers=2)
    for epoch in range(start_epoch, EPOCHS):
        dataset.set_epoch(epoch)
        if epoch != start_epoch:
            batches = 0
        for mb in dl:
            x, y = mb.data["npy"], mb.data["cls"]
            with torch.no_grad():
                losses = F.cross_entropy(model(x), y, reduction="none")
            keep = selector.select(mb.ids, losses)
            opt.zero_grad()
            F.cross_entropy(model(x[keep]), y[keep]).backward()
            opt.step()
            step, batches = step + 1, batches + 1
            log.write(json.dumps({"step": step, "epoch": epoch,
                                  "ids": sorted(mb.ids[keep].tolist())}) + "\n")
            log.flush()
            if step % EVERY == 0:
                checkpoints.save(step, {"model": model.state_dict(), "opt": opt.state_dict(),
                                        "selector": selector.state_dict(),
                                        "dataset": dataset.state_at(batches),
                                        "pruner": pruner.state_dict()}, store)
            if step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        pruner.on_epoch_end(epoch, EPOCHS)
    store.save(f"{out}/final-scores.npy")


if __name__ == "__main__":
    main()
