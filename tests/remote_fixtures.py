"""pytest fixtures for the real servers of ``servers.py``; import them by name into a test
module (``from remote_fixtures import s3_server, ...``). Each stops its server on teardown."""

from __future__ import annotations

from typing import Iterator

import pytest

from servers import RangeHTTPServer, S3Server


@pytest.fixture(scope="module")
def s3_server() -> Iterator[S3Server]:
    """moto's S3 API on 127.0.0.1, for the module (its buckets outlive one test)."""
    pytest.importorskip("moto.server")
    pytest.importorskip("flask")
    with S3Server() as server:
        yield server


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The standard AWS variables point at the moto server for this test."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return s3_server


@pytest.fixture
def http_root(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    return root


@pytest.fixture
def http_server(http_root) -> Iterator[RangeHTTPServer]:
    """A Range-honouring static HTTP server over ``http_root``."""
    with RangeHTTPServer(http_root) as server:
        yield server
