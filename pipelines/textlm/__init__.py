"""Byte-level language model pipeline: standard training against Evolved Sampling (and
baselines) on real text (the Python standard library's sources and docs) streamed from
WebDataset shards. Run ``python -m pipelines.textlm --help``; from code, ``main([...]) -> dict``."""

from __future__ import annotations

from typing import Any, Sequence


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``python -m pipelines.textlm`` from code; see :func:`pipelines.textlm.__main__.main`."""
    # imported here, not at the top: runpy warns when a package has already imported its __main__
    from .__main__ import main as cli_main

    return cli_main(argv)


__all__ = ["main"]
