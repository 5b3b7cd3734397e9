"""Why online reducible-loss selection (RHO-LOSS) can lose under label noise: which samples does
``loss - reference_loss`` rank first, under the model uniform training has after a few epochs?

Trains the MNIST-1D pipeline's CNN with uniform batches (the shared loop) for each of
``--epochs`` and, under each resulting model, prints the mean training loss of the clean and the
mislabelled samples next to the reference's, and the share of mislabelled samples among the top
half by reducible loss (what RHO-LOSS with B = 2b would tend to back-propagate) against their
share of the corpus. Reads the data and the reference store that ``tools/bench_train.py`` caches:

    .venv/bin/python tools/diag_reducible.py --noise 0.4 \\
        --reference out/bench_data/reference/mnist1d-ref-<key>/scores.npy
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipelines import loop  # noqa: E402
from pipelines.mnist1d.data import build  # noqa: E402
from pipelines.mnist1d.train import workload  # noqa: E402


def main(argv: list[str] | None = None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reference", required=True, help="the reference's score store (.npy)")
    p.add_argument("--noise", type=float, default=0.4, help="label noise of the training set")
    p.add_argument("--data-dir", default="out/bench_data/mnist1d", help="MNIST-1D cache")
    p.add_argument("--train", type=int, default=40000)
    p.add_argument("--test", type=int, default=10000)
    p.add_argument("--epochs", default="1,3,10", help="uniform training lengths to look at")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    data = build(args.data_dir, args.train, args.test, args.noise, 42, "wds")
    arrays = np.load(data.directory / "arrays.npz")
    x = torch.from_numpy(arrays["x"].astype(np.float32)).unsqueeze(1)
    y = torch.from_numpy(arrays["y"].astype(np.int64))
    noisy = arrays["noisy"]
    ref = np.asarray(np.load(args.reference, mmap_mode="r"), np.float64)
    if len(ref) != len(y):
        sys.exit(f"--reference {args.reference}: {len(ref)} scores for {len(y)} samples")
    made: list[torch.nn.Module] = []
    base = workload(data.corpus, data.test_x, data.test_y)
    w = dataclasses.replace(base, make_model=lambda: made.append(base.make_model()) or made[-1])
    lines = [f"reference loss: clean {ref[~noisy].mean():.2f}, mislabelled {ref[noisy].mean():.2f}"]
    print(lines[0], flush=True)
    for epochs in (int(e) for e in args.epochs.split(",")):
        r = loop.train(w, "uniform", loop.RunConfig(epochs, b=64, seed=0, progress=False))
        model = made[-1].eval()
        with torch.no_grad():
            loss = torch.cat([F.cross_entropy(model(x[i:i + 4096]), y[i:i + 4096], reduction="none")
                              for i in range(0, len(y), 4096)]).numpy()
        top = np.argsort(-(loss - ref))[: len(ref) // 2]
        lines.append(f"after {epochs:2d} epoch(s) of uniform training: test acc {r['final_acc']:.4f}; "
                     f"train loss clean {loss[~noisy].mean():.2f}, mislabelled {loss[noisy].mean():.2f}; "
                     f"mislabelled among the top half by reducible loss {noisy[top].mean():.3f} "
                     f"(corpus {noisy.mean():.2f})")
        print(lines[-1], flush=True)
    return lines


if __name__ == "__main__":
    main()
