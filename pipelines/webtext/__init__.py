"""A web-like pre-training stream built offline from real text and real junk (HTML boilerplate,
binaries, base64, exact and near duplicates, templated text, random bytes), each sample's kind in
a side table; see :mod:`pipelines.webtext.corpus`. Build one with
``python -m pipelines.webtext --out DIR``; from code, :func:`build`."""

from .corpus import KINDS, Mixture, WebText, build

__all__ = ["KINDS", "Mixture", "WebText", "build"]
