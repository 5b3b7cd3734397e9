"""Cost of selection next to the forward pass it follows.

For each meta-batch size B in ``--sizes`` and b in {B/2, B/4}, one run times on the same
meta-batch: the pipeline model's no-grad forward (``pipelines.mnist1d``'s 1D CNN, per-sample
cross-entropy), and ``select(ids, losses)`` of :class:`es_stream.ESSelector` (store of
``--num-samples`` scores, random ids) and of the baselines. Times are medians of ``--repeats``
calls after warm-up; the ratio column is select / forward. Goal: ES select <= 1% of the
forward at B = 4096 on CPU. On a CUDA machine ``--device cuda`` times both there (synchronising
only around the timed region, never inside ``select``).

    .venv/bin/python tools/bench_select.py
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for `pipelines`

from es_stream import (ESSelector, LossSelector, SelectiveBackpropSelector,  # noqa: E402
                       TopKSelector, UniformSelector)
from pipelines.mnist1d.train import CNN1D  # noqa: E402

from _timing import median_ms  # noqa: E402  (tools/_timing.py)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="256,4096,65536", help="comma-separated meta-batch sizes B")
    p.add_argument("--num-samples", type=int, default=1_000_000, help="corpus size n (score store)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = CNN1D().to(device).eval()
    n = args.num_samples
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"python {platform.python_version()}, torch {torch.__version__}, device {device}")
    print(f"n = {n:,} scores; medians of {args.repeats} calls\n")
    head = f"{'B':>6} {'b':>6} {'forward ms':>11} {'selector':<18} {'select ms':>10} {'select/forward':>15}"
    print(head)
    print("-" * len(head))
    for B in (int(s) for s in args.sizes.split(",")):
        x = torch.randn(B, 1, 40, device=device)
        y = torch.randint(0, 10, (B,), device=device)

        def forward() -> torch.Tensor:
            with torch.no_grad():
                return F.cross_entropy(model(x), y, reduction="none")

        fwd = median_ms(forward, args.repeats, device)
        losses = forward()
        gen = torch.Generator().manual_seed(B)
        ids = torch.randperm(n, generator=gen)[:B].to(device)
        for b in (B // 2, B // 4):
            selectors = {"ES": ESSelector(n, b, device=device), "Loss": LossSelector(b),
                         "SelectiveBackprop": SelectiveBackpropSelector(b),
                         "TopK": TopKSelector(b), "Uniform": UniformSelector(b)}
            for name, sel in selectors.items():
                ms = median_ms(lambda: sel.select(ids, losses), args.repeats, device)
                print(f"{B:>6} {b:>6} {fwd:>11.3f} {name:<18} {ms:>10.3f} {100 * ms / fwd:>14.2f}%")
        print()


if __name__ == "__main__":
    main()
