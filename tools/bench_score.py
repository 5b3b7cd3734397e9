"""Reference scoring throughput: ``score_corpus`` against the same model's bare no-grad forward
over the same stream, side by side in one run, with 1 and 2 DataLoader workers.

Goal: ``score_corpus`` (the path ``es-stream score`` takes: store
writes, progress points, the progress bar off) at >= 0.9x the bare loop's samples/s. The bare
loop iterates the same ``ESDataset`` (same decode, collate, workers) and runs the model under
``torch.inference_mode()``, discarding the losses; on CUDA both loops end with a synchronise.

    .venv/bin/python tools/bench_score.py                       # 20k samples, CPU
    .venv/bin/python tools/bench_score.py --samples 200000 --device cuda --width 1024

Writes a small corpus of tar shards (``--samples`` samples of ``--dim`` float32 features and a
label) into a temporary directory, indexes it, then times each configuration ``--repeats`` times
(median). Prints a table and, with ``--json``, writes the numbers.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import es_stream as es  # noqa: E402


def write_corpus(directory: Path, n: int, dim: int) -> es.Corpus:
    import webdataset as wds

    rng = np.random.default_rng(0)
    with wds.ShardWriter(str(directory / "train-%06d.tar"), maxcount=5000, verbose=0) as w:
        for i in range(n):
            buf = io.BytesIO()
            np.save(buf, rng.normal(size=dim).astype(np.float32))
            w.write({"__key__": f"{i:08d}", "npy": buf.getvalue(), "cls": i % 10})
    return es.Corpus.from_webdataset(str(directory))


def make_model(dim: int, width: int, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(dim, width), torch.nn.ReLU(),
                               torch.nn.Linear(width, width), torch.nn.ReLU(),
                               torch.nn.Linear(width, 10)).to(device).eval()


def bare(corpus: es.Corpus, model: torch.nn.Module, device: torch.device, b: int,
         workers: int) -> float:
    """Samples/s of the bare no-grad forward over the same stream."""
    ds = es.ESDataset(corpus, b, shuffle=False)
    start, n = time.perf_counter(), 0
    with torch.inference_mode():
        for mb in es.loader(ds, num_workers=workers, persistent_workers=False):
            x = mb.data["npy"].to(device, non_blocking=True)
            y = mb.data["cls"].to(device, non_blocking=True)
            F.cross_entropy(model(x), y, reduction="none")
            n += len(mb)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return n / (time.perf_counter() - start)


def scored(corpus: es.Corpus, model: torch.nn.Module, device: torch.device, b: int, workers: int,
           out: Path) -> float:
    """Samples/s of score_corpus into a fresh memory-mapped store."""
    def score_fn(batch):
        return F.cross_entropy(model(batch["npy"]), batch["cls"], reduction="none")

    for p in out.parent.glob(out.stem + "*"):
        p.unlink()
    start = time.perf_counter()
    result = es.score_corpus(corpus, score_fn, out, meta_batch_size=b, num_workers=workers,
                             device=device, scorer="bench", progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result.scored / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        corpus = write_corpus(Path(tmp), args.samples, args.dim)
        model = make_model(args.dim, args.width, device)
        for workers in args.workers:
            bare_rates, score_rates = [], []
            for _ in range(args.repeats):  # interleaved, so drift hits both alike
                bare_rates.append(bare(corpus, model, device, args.batch, workers))
                score_rates.append(scored(corpus, model, device, args.batch, workers,
                                          Path(tmp) / "scores.npy"))
            b, s = statistics.median(bare_rates), statistics.median(score_rates)
            rows.append({"workers": workers, "bare_samples_per_s": b, "score_samples_per_s": s,
                         "ratio": s / b, "goal_met": s / b >= 0.9})
    print(f"device {device}, {args.samples} samples, meta-batch {args.batch}, model "
          f"{args.dim}-{args.width}-{args.width}-10, median of {args.repeats}")
    print(f"{'workers':>7} {'bare/s':>10} {'score/s':>10} {'ratio':>6}  goal >= 0.9")
    for r in rows:
        print(f"{r['workers']:>7} {r['bare_samples_per_s']:>10.0f} {r['score_samples_per_s']:>10.0f} "
              f"{r['ratio']:>6.2f}  {'met' if r['goal_met'] else 'NOT met'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": str(device), "args": vars(args),
                                               "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
