"""The ``es-stream`` command line. One sub-command per task; ``--help`` on each."""

from __future__ import annotations

import argparse
import os
import sys
import time


def _cmd_index(args: argparse.Namespace) -> int:
    from .corpus import Corpus

    start = time.perf_counter()
    if args.format == "mds" or (args.format == "auto" and len(args.shards) == 1
                                and os.path.exists(os.path.join(args.shards[0], "index.json"))):
        corpus = Corpus.from_mds(args.shards[0], remote=args.remote)
    else:
        corpus = Corpus.from_webdataset(args.shards[0] if len(args.shards) == 1 else args.shards)
    corpus.save(args.output)
    print(f"indexed {corpus.num_samples} samples in {corpus.num_shards} {corpus.format} shards "
          f"in {time.perf_counter() - start:.2f}s -> {args.output} (fingerprint {corpus.fingerprint})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="es-stream", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    index = sub.add_parser("index", help="index WebDataset or MDS shards into a Parquet file",
                           description="Scan shard headers and write the corpus index (one row "
                           "per sample, with stable ids and byte offsets) as Parquet.")
    index.add_argument("shards", nargs="+", help="brace pattern, directory of .tar files, list of "
                       "paths/URLs (pipe:...), or an MDS directory holding index.json")
    index.add_argument("-o", "--output", required=True, help="Parquet file to write")
    index.add_argument("--format", choices=["auto", "wds", "mds"], default="auto",
                       help="shard format (auto: MDS when the directory has index.json)")
    index.add_argument("--remote", default=None, help="MDS remote to fetch index.json/shards from")
    index.set_defaults(func=_cmd_index)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (OSError, ValueError) as exc:  # our errors name the file or argument: show them plainly
        print(f"es-stream {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
