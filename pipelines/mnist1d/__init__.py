"""MNIST-1D pipeline: standard training against Evolved Sampling (and baselines) on a sharded
corpus. Run ``python -m pipelines.mnist1d --help``; from code, ``main([...]) -> dict``."""

from __future__ import annotations

from typing import Any, Sequence


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``python -m pipelines.mnist1d`` from code; see :func:`pipelines.mnist1d.__main__.main`."""
    # imported here, not at the top: `python -m pipelines.mnist1d` imports this package first,
    # and runpy warns when the package has already imported its own __main__
    from .__main__ import main as cli_main

    return cli_main(argv)


__all__ = ["main"]
