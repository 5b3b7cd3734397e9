"""Build the web-like corpus and print what it holds:

    python -m pipelines.webtext --out out/webtext [--samples N] [--seq-len 256] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
from typing import Sequence

from .corpus import KINDS, Mixture, build


def main(argv: Sequence[str] | None = None) -> dict:
    d = Mixture()
    p = argparse.ArgumentParser(prog="python -m pipelines.webtext", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="cache directory (the build goes inside)")
    p.add_argument("--samples", type=int, default=None, help="training samples (default: all "
                   "the material allows)")
    p.add_argument("--seq-len", type=int, default=256, help="bytes per sample")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-mb", type=float, default=None, help="collect at most this much text")
    p.add_argument("--min-mb", type=float, default=20.0, help="refuse less text than this")
    for k in KINDS:
        p.add_argument(f"--{k.replace('_', '-')}", type=float, default=getattr(d, k),
                       help=f"share of {k} samples")
    p.add_argument("--max-copies", type=int, default=d.max_copies)
    p.add_argument("--edit-rate", type=float, default=d.edit_rate)
    a = p.parse_args(argv)
    mixture = Mixture(**{k: getattr(a, k) for k in KINDS}, max_copies=a.max_copies,
                      edit_rate=a.edit_rate)
    data = build(a.out, mixture=mixture, samples=a.samples, seq_len=a.seq_len, seed=a.seed,
                 max_bytes=None if a.max_mb is None else int(a.max_mb * (1 << 20)),
                 min_bytes=int(a.min_mb * (1 << 20)))
    print(json.dumps({"directory": str(data.directory), **data.meta}, indent=1))
    return data.meta


if __name__ == "__main__":
    main()
