"""Byte-range reads of object-store URLs: range coalescing (pure), then exact reads from a real
S3 API (moto) and a real Range HTTP server on 127.0.0.1, through a fault-injecting proxy."""

from __future__ import annotations

import time

import numpy as np
import pytest

from es_stream.errors import ShardError
from es_stream.remote import RetryPolicy, coalesce_ranges, split_url
from remote_fixtures import http_root, http_server, s3_server  # noqa: F401 (fixtures)
from servers import FaultProxy, RangeHTTPServer


# ------------------------------------------------------------------------------ coalescing
def test_coalesce_adjacent_and_gap():
    # [0,10) [10,20) touch; [25,30) is 5 past; [100,110) is 70 past; key 1 is separate
    keys = np.array([0, 0, 0, 0, 1])
    offs = np.array([10, 0, 25, 100, 0])
    sizes = np.array([10, 10, 5, 10, 4])
    p0 = coalesce_ranges(keys, offs, sizes, gap=0)
    assert list(zip(p0.keys, p0.starts, p0.ends)) == [(0, 0, 20), (0, 25, 30), (0, 100, 110),
                                                      (1, 0, 4)]
    assert p0.request_bytes == int(sizes.sum())  # gap 0: nothing read that was not asked
    p5 = coalesce_ranges(keys, offs, sizes, gap=5)
    assert list(zip(p5.starts, p5.ends)) == [(0, 30), (100, 110), (0, 4)]
    p70 = coalesce_ranges(keys, offs, sizes, gap=70)
    assert list(zip(p70.keys, p70.starts, p70.ends)) == [(0, 0, 110), (1, 0, 4)]
    assert p70.request.tolist() == [0, 0, 0, 0, 1] and p70.within.tolist() == [10, 0, 25, 100, 0]


def test_coalesce_overlaps_and_window():
    # an overlapping and a repeated range share one request, read once
    p = coalesce_ranges(np.zeros(3), np.array([0, 5, 5]), np.array([20, 5, 5]))
    assert (p.num_requests, p.request_bytes) == (1, 20)
    # ranges that touch are still cut at a max_request-aligned window
    p = coalesce_ranges(np.zeros(4), np.array([0, 8, 16, 24]), np.full(4, 8), max_request=16)
    assert list(zip(p.starts, p.ends)) == [(0, 16), (16, 32)]


@pytest.mark.parametrize("gap", [0, 3, 50])
def test_coalesce_random_reconstructs_each_range(gap):
    rng = np.random.default_rng(gap)
    blobs = [rng.integers(0, 256, 5000, dtype=np.uint8).tobytes() for _ in range(3)]
    keys = rng.integers(0, 3, 300)
    offs = rng.integers(0, 4900, 300)
    sizes = rng.integers(0, 100, 300)
    p = coalesce_ranges(keys, offs, sizes, gap=gap, max_request=1024)
    bufs = [blobs[k][s:e] for k, s, e in zip(p.keys, p.starts, p.ends)]
    for i in range(300):
        got = bufs[p.request[i]][p.within[i]:p.within[i] + sizes[i]]
        assert got == blobs[keys[i]][offs[i]:offs[i] + sizes[i]]
    # every byte a request reads is asked for (by some range of its object: a request cut at
    # a window may overlap a range of the request before) or in a hole of at most `gap` bytes
    for r in range(p.num_requests):
        asked = np.zeros(5000, dtype=bool)
        for i in np.flatnonzero(keys == p.keys[r]):
            asked[offs[i]:offs[i] + sizes[i]] = True
        asked = asked[p.starts[r]:p.ends[r]]
        padded = np.diff(np.concatenate([[True], asked, [True]]).astype(np.int8))
        holes = np.flatnonzero(padded == 1) - np.flatnonzero(padded == -1)
        assert (holes <= gap).all(), (r, holes)


def test_coalesce_rejects_bad_input():
    with pytest.raises(ValueError, match="offsets >= 0"):
        coalesce_ranges([0], [-1], [3])
    with pytest.raises(ValueError, match="one length"):
        coalesce_ranges([0, 1], [0], [3])


def test_split_url():
    assert split_url("s3://bucket/a/b%20c.tar") == ("s3://bucket", "a/b c.tar")
    assert split_url("https://h:8080/d/x.tar") == ("https://h:8080", "d/x.tar")
    with pytest.raises(ValueError, match="not an object-store URL"):
        split_url("/local/x.tar")


# ------------------------------------------------------------------------------ real servers
@pytest.fixture
def blobs(http_root):
    """Three objects of random bytes in the served directory."""
    rng = np.random.default_rng(1)
    out = {}
    for name, size in (("a.bin", 300_000), ("b.bin", 70_000), ("sub/c.bin", 1_000_001)):
        path = http_root / name
        path.parent.mkdir(exist_ok=True)
        out[name] = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        path.write_bytes(out[name])
    return out


def _random_ranges(blobs, n, seed):
    rng = np.random.default_rng(seed)
    names = sorted(blobs)
    which = rng.integers(0, len(names), n)
    offs, sizes = [], []
    for w in which:
        total = len(blobs[names[w]])
        o = int(rng.integers(0, total))
        offs.append(o)
        sizes.append(int(rng.integers(0, min(5000, total - o) + 1)))
    return [names[w] for w in which], offs, sizes


def _check_exact(fetcher, base, blobs, n=200, seed=0):
    names, offs, sizes = _random_ranges(blobs, n, seed)
    got = fetcher.read_ranges([f"{base}/{n_}" for n_ in names], offs, sizes)
    assert len(got) == len(names)
    for name, o, s, g in zip(names, offs, sizes, got):
        assert g == blobs[name][o:o + s]


@pytest.mark.parametrize("gap", [0, 4096])
def test_http_ranges_exact(http_server, blobs, gap):
    from es_stream.remote import RangeFetcher
    pytest.importorskip("obstore")
    with RangeFetcher(gap=gap, max_in_flight=4) as f:
        _check_exact(f, http_server.url, blobs)
        assert f.requests == http_server.requests  # one GET per coalesced request, none lost
    assert f.bytes_fetched == http_server.bytes_sent


def test_s3_ranges_exact_env_and_storage_options(s3_server, blobs, http_root, monkeypatch):
    pytest.importorskip("obstore")
    from es_stream.remote import RangeFetcher

    s3_server.upload_dir("exact", http_root)
    for key, value in s3_server.env().items():  # the standard environment
        monkeypatch.setenv(key, value)
    with RangeFetcher() as f:
        _check_exact(f, "s3://exact", blobs, seed=1)
        assert f.size("s3://exact/sub/c.bin") == len(blobs["sub/c.bin"])
    for key in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    options = {"endpoint_url": s3_server.url, "access_key_id": "testing",
               "secret_access_key": "testing"}  # or everything in storage_options
    with RangeFetcher(options) as f:
        _check_exact(f, "s3://exact", blobs, n=50, seed=2)


@pytest.mark.parametrize("rate,kinds", [(0.01, ("503", "reset")),
                                        (0.2, ("503", "500", "throttle", "reset", "truncate"))])
def test_faulty_http_every_range_exact(http_server, blobs, rate, kinds):
    pytest.importorskip("obstore")
    from es_stream.remote import RangeFetcher

    retry = RetryPolicy(attempts=8, backoff=0.005, max_backoff=0.05)
    # fail_first=1: at least one fault whatever the draws, so the test always exercises retries
    with FaultProxy(http_server.port, fail_rate=rate, fail_first=1, kinds=kinds, seed=3) as proxy:
        with RangeFetcher(gap=0, max_in_flight=4, retry=retry) as f:
            for seed in range(3):
                _check_exact(f, proxy.url, blobs, n=150, seed=seed)
        assert proxy.faults >= 1 and f.attempts == f.requests + proxy.faults
        # nothing duplicated: each successful request is one GET the server answered
        assert http_server.requests == proxy.requests - proxy.faults + proxy.fault_counts.get("truncate", 0)


def test_faulty_s3_every_range_exact(s3_server, blobs, http_root, monkeypatch):
    pytest.importorskip("obstore")
    from es_stream.remote import RangeFetcher

    s3_server.upload_dir("faulty", http_root)
    with FaultProxy(s3_server.port, fail_rate=0.05, fail_first=2, seed=4,
                    kinds=("503", "throttle", "reset", "truncate")) as proxy:
        for key, value in s3_server.env(proxy.url).items():
            monkeypatch.setenv(key, value)
        retry = RetryPolicy(attempts=8, backoff=0.005, max_backoff=0.05)
        with RangeFetcher(gap=0, retry=retry) as f:
            _check_exact(f, "s3://faulty", blobs, n=150, seed=5)
        assert proxy.faults >= 2 and f.attempts == f.requests + proxy.faults


def test_server_gone_raises_naming_url_in_time(http_root, blobs):
    pytest.importorskip("obstore")
    from es_stream.remote import RangeFetcher

    retry = RetryPolicy(attempts=100, backoff=0.05, max_backoff=0.2, total_timeout=2,
                        request_timeout=1, connect_timeout=0.5)
    with RangeHTTPServer(http_root) as server:
        url = f"{server.url}/a.bin"
        with RangeFetcher(retry=retry) as f:
            assert f.read(url, 10, 5) == blobs["a.bin"][10:15]
    # the server is gone (connection refused): retried until the deadline, then a ShardError
    with RangeFetcher(retry=retry) as f:
        t = time.monotonic()
        with pytest.raises(ShardError, match=f"{url}.*attempt") as info:
            f.read(url, 10, 5)
        took = time.monotonic() - t
    assert 1.0 < took < retry.total_timeout + retry.request_timeout + 1, took
    assert "deadline" in str(info.value)


def test_silent_server_raises_in_time(http_server, blobs):
    pytest.importorskip("obstore")
    from es_stream.remote import RangeFetcher

    retry = RetryPolicy(attempts=3, backoff=0.05, total_timeout=2, request_timeout=0.5,
                        connect_timeout=0.5)
    with FaultProxy(http_server.port, hang=True, hang_limit_s=30) as proxy:
        with RangeFetcher(retry=retry) as f:
            t = time.monotonic()
            with pytest.raises(ShardError, match=f"{proxy.url}/a.bin"):
                f.read_ranges([f"{proxy.url}/a.bin"] * 2, [0, 50_000], [10, 10])
            assert time.monotonic() - t < retry.total_timeout + retry.request_timeout + 1
        assert http_server.requests == 0  # nothing ever reached the server


def test_missing_object_is_permanent(http_server, blobs):
    pytest.importorskip("obstore")
    from es_stream.remote import RangeFetcher

    with RangeFetcher() as f:
        with pytest.raises(ShardError, match=r"nope\.bin.*after 1 attempt.*permanent"):
            f.read(f"{http_server.url}/nope.bin", 0, 5)
        # a range past the object's end: the server answers short, which no retry can fix
        with pytest.raises(ShardError, match="shorter than the index"):
            f.read(f"{http_server.url}/b.bin", 69_990, 100)
        assert f.read(f"{http_server.url}/b.bin", 5, 0) == b""
