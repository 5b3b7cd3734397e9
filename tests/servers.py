"""Real servers on 127.0.0.1 for the object-store tests: an S3 API (moto's threaded server), a
static HTTP server that honours ``Range``, and an HTTP proxy that injects faults.

Each is a context manager that binds a free port on 127.0.0.1, serves from daemon threads and
stops (closing its socket) on exit; the fixtures in ``conftest_remote.py`` wrap them. Every
fault the proxy injects is bounded in count (``max_faults``) and every wait it adds is bounded
in time (a hung request ends when the proxy stops), so no test can hang on them.
"""

from __future__ import annotations

import http.client
import os
import random
import re
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Sequence

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class _Handler(BaseHTTPRequestHandler):
    """Keeps its connection in the owner's set, so that stopping the server drops open
    keep-alive connections too (a server that is gone answers nothing, not even on them)."""

    protocol_version = "HTTP/1.1"  # keep-alive, as object stores serve

    def setup(self) -> None:
        super().setup()
        # headers and body go out as separate writes: without this, Nagle's algorithm and the
        # client's delayed ACK add ~40 ms to every small response
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        owner = self.server.owner  # type: ignore[attr-defined]
        with owner.conn_lock:
            owner.connections.add(self.connection)

    def finish(self) -> None:
        owner = self.server.owner  # type: ignore[attr-defined]
        with owner.conn_lock:
            owner.connections.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, *args: object) -> None:  # quiet test output
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the default 5 drops SYNs when many clients connect at once


class _Served:
    """A ThreadingHTTPServer run on a daemon thread; ``url`` once started."""

    server: ThreadingHTTPServer

    def _serve(self, handler: type) -> None:
        self.connections: set[socket.socket] = set()
        self.conn_lock = threading.Lock()
        self.server = _Server((HOST, 0), handler)
        self.server.owner = self  # type: ignore[attr-defined]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        with self.conn_lock:
            for conn in list(self.connections):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self.thread.join(timeout=10)

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ------------------------------------------------------------------------------ Range server
_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")


class _RangeHandler(_Handler):
    def _file(self) -> str | None:
        root = self.server.owner.root  # type: ignore[attr-defined]
        rel = os.path.normpath(self.path.split("?", 1)[0].lstrip("/"))
        path = os.path.join(root, rel)
        if rel.startswith("..") or not os.path.isfile(path):
            return None
        return path

    def _error(self, code: int, headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _respond(self, body: bool) -> None:
        owner = self.server.owner  # type: ignore[attr-defined]
        with owner.lock:
            owner.requests += 1
        path = self._file()
        if path is None:
            return self._error(404)
        size = os.path.getsize(path)
        start, stop, code = 0, size, 200
        spec = self.headers.get("Range")
        if spec is not None:
            m = _RANGE.match(spec.strip())
            if m is None or (m.group(1) == "" and m.group(2) == ""):
                return self._error(416, {"Content-Range": f"bytes */{size}"})
            if m.group(1) == "":  # suffix range: the last N bytes
                start = max(0, size - int(m.group(2)))
            else:
                start = int(m.group(1))
                stop = min(size, int(m.group(2)) + 1) if m.group(2) else size
            if start >= size or stop <= start:
                return self._error(416, {"Content-Range": f"bytes */{size}"})
            code = 206
        self.send_response(code)
        self.send_header("Content-Length", str(stop - start))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Last-Modified", self.date_time_string(int(os.path.getmtime(path))))
        self.send_header("ETag", f'"{size}-{os.stat(path).st_mtime_ns}"')
        if code == 206:
            self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{size}")
        self.end_headers()
        if body:
            with open(path, "rb") as f:
                f.seek(start)
                data = f.read(stop - start)
            with owner.lock:  # counted before it is sent: a client that has it sees it counted
                owner.bytes_sent += len(data)
            self.wfile.write(data)

    def do_GET(self) -> None:
        self._respond(True)

    def do_HEAD(self) -> None:
        self._respond(False)


class RangeHTTPServer(_Served):
    """Serves the files under ``root`` read-only with single byte ranges (``206``/``416``),
    ``HEAD``, ``ETag`` and ``Last-Modified``; counts requests and body bytes sent."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = os.fspath(root)
        self.lock = threading.Lock()
        self.requests = 0
        self.bytes_sent = 0

    def __enter__(self) -> "RangeHTTPServer":
        self._serve(_RangeHandler)
        return self


# ------------------------------------------------------------------------------ fault proxy
_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer",
        "upgrade", "proxy-authorization", "proxy-authenticate"}
FAULT_KINDS = ("503", "500", "throttle", "reset", "truncate")


class _ProxyHandler(_Handler):
    def _reset(self) -> None:
        """Close the client's connection with a TCP RST (SO_LINGER 0), as a dropped link does."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()

    def _send_error_status(self, code: int, text: str) -> None:
        body = f"<Error><Code>{text}</Code><Message>injected by the test proxy</Message></Error>".encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _proxy(self) -> None:
        owner: FaultProxy = self.server.owner  # type: ignore[attr-defined]
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        fault = owner._next_fault(self.path)
        if owner.hang:  # a server that accepts and never answers, until the proxy stops
            owner._stopping.wait(owner.hang_limit_s)
            return self._reset()
        if owner.latency_s:
            time.sleep(owner.latency_s)
        if fault == "reset":
            return self._reset()
        if fault in ("503", "500", "throttle"):
            code, text = {"503": (503, "ServiceUnavailable"), "500": (500, "InternalError"),
                          "throttle": (503, "SlowDown")}[fault]
            return self._send_error_status(code, text)
        up = http.client.HTTPConnection(HOST, owner.upstream_port, timeout=30)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
            up.request(self.command, self.path, body=body, headers=headers)
            resp = up.getresponse()
            data = resp.read()
            self.send_response(resp.status, resp.reason)
            for k, v in resp.getheaders():
                if k.lower() not in _HOP and k.lower() != "content-length":
                    self.send_header(k, v)
            # a HEAD has no body: its Content-Length is the object's size, as upstream says
            length = resp.getheader("Content-Length") if self.command == "HEAD" else None
            self.send_header("Content-Length", length or str(len(data)))
            self.end_headers()
        finally:
            up.close()
        if self.command == "HEAD":
            return
        if fault == "truncate":  # promise the whole body, send half, drop the link
            self._throttled_write(owner, data[:len(data) // 2])
            return self._reset()
        self._throttled_write(owner, data)

    def _throttled_write(self, owner: "FaultProxy", data: bytes) -> None:
        with owner.lock:  # counted before it is sent, as the Range server does
            owner.bytes_sent += len(data)
        if not owner.bandwidth and not owner.link_bandwidth:
            self.wfile.write(data)
            return
        chunk = 1 << 16
        for i in range(0, len(data), chunk):
            piece = data[i:i + chunk]
            if owner.link_bandwidth:  # one link for every response: take the next free slot
                with owner.lock:
                    start = max(time.monotonic(), owner.link_free)
                    owner.link_free = start + len(piece) / owner.link_bandwidth
                    done = owner.link_free
                time.sleep(max(done - time.monotonic(), 0))
            self.wfile.write(piece)
            if owner.bandwidth:
                time.sleep(len(piece) / owner.bandwidth)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _proxy


class FaultProxy(_Served):
    """An HTTP proxy on 127.0.0.1 in front of ``upstream_port`` that injects faults.

    Args:
        latency_s: added before each response (per request, as a distant store adds it).
        bandwidth: bytes per second cap of each response body (0: none).
        link_bandwidth: bytes per second cap of all response bodies together, as one network
            link shares its capacity (0: none).
        fail_rate: chance that a request is answered by a fault instead of the upstream, drawn
            from ``random.Random(seed)`` in arrival order.
        fail_first: the first N requests fail regardless of ``fail_rate``.
        max_faults: at most this many faults in all (the bound that keeps retries finite).
        kinds: faults to cycle through: ``"503"``, ``"500"``, ``"throttle"`` (503 SlowDown),
            ``"reset"`` (TCP RST before answering), ``"truncate"`` (half the body, then RST).
        hang: accept requests and never answer (a dead server that keeps the socket), until
            :meth:`stop` or ``hang_limit_s``.
        only_paths: when given, faults are injected only into requests whose path contains
            one of these strings (one shard's object failing while the others are served).

    Counts ``requests``, ``faults`` (per kind in ``fault_counts``) and body ``bytes_sent``.
    """

    def __init__(self, upstream_port: int, *, latency_s: float = 0.0, bandwidth: float = 0,
                 link_bandwidth: float = 0, fail_rate: float = 0.0, fail_first: int = 0, max_faults: int = 1000,
                 kinds: Sequence[str] = ("503", "reset"), seed: int = 0, hang: bool = False,
                 hang_limit_s: float = 60.0, only_paths: Sequence[str] = ()) -> None:
        bad = set(kinds) - set(FAULT_KINDS)
        if bad:
            raise ValueError(f"unknown fault kinds {sorted(bad)}; use some of {FAULT_KINDS}")
        self.upstream_port = upstream_port
        self.latency_s, self.bandwidth = latency_s, bandwidth
        self.link_bandwidth, self.link_free = link_bandwidth, 0.0
        self.fail_rate, self.fail_first, self.max_faults = fail_rate, fail_first, max_faults
        self.kinds = tuple(kinds)
        self.rng = random.Random(seed)
        self.hang, self.hang_limit_s = hang, hang_limit_s
        self.only_paths = tuple(only_paths)
        self.lock = threading.Lock()
        self._stopping = threading.Event()
        self.requests = 0
        self.faults = 0
        self.fault_counts: dict[str, int] = {}
        self.bytes_sent = 0

    def _next_fault(self, path: str = "") -> str | None:
        with self.lock:
            self.requests += 1
            draw = self.rng.random()
            if self.faults >= self.max_faults:
                return None
            if self.only_paths and not any(p in path for p in self.only_paths):
                return None
            if self.requests <= self.fail_first or draw < self.fail_rate:
                kind = self.kinds[self.faults % len(self.kinds)]
                self.faults += 1
                self.fault_counts[kind] = self.fault_counts.get(kind, 0) + 1
                return kind
            return None

    def __enter__(self) -> "FaultProxy":
        self._serve(_ProxyHandler)
        return self

    def stop(self) -> None:
        self._stopping.set()
        super().stop()


# ------------------------------------------------------------------------------ S3 (moto)
class S3Server:
    """moto's ``ThreadedMotoServer`` on 127.0.0.1 (a real S3 REST API over HTTP), with dummy
    credentials; ``env`` holds the variables a client reads to reach it."""

    def __init__(self) -> None:
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request
        self.port = free_port()
        self._server = ThreadedMotoServer(ip_address=HOST, port=self.port, verbose=False)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def env(self, endpoint: str | None = None) -> dict[str, str]:
        """The standard AWS variables pointing a client at ``endpoint`` (default: this server;
        pass a proxy's URL to go through it)."""
        return {"AWS_ENDPOINT_URL": endpoint or self.url, "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"}

    def client(self):
        """A boto3 S3 client on this server (for writing test objects)."""
        import boto3

        return boto3.client("s3", endpoint_url=self.url, aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name="us-east-1")

    def upload_dir(self, bucket: str, directory: str | os.PathLike, prefix: str = "") -> list[str]:
        """Create ``bucket`` (if needed) and upload every file of ``directory`` (recursively)
        under ``prefix``; the ``s3://`` URLs, sorted."""
        client = self.client()
        try:
            client.create_bucket(Bucket=bucket)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        urls = []
        root = os.fspath(directory)
        for dirpath, _, files in os.walk(root):
            for name in files:
                path = os.path.join(dirpath, name)
                key = "/".join(p for p in (prefix, os.path.relpath(path, root)) if p)
                client.upload_file(path, bucket, key)
                urls.append(f"s3://{bucket}/{key}")
        return sorted(urls)

    def __enter__(self) -> "S3Server":
        self._server.start()
        deadline = time.monotonic() + 20
        while True:  # ready when it accepts connections
            try:
                socket.create_connection((HOST, self.port), timeout=1).close()
                return self
            except OSError:
                if time.monotonic() > deadline:
                    self._server.stop()
                    raise RuntimeError(f"moto's S3 server did not start on {self.url}")
                time.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        self._server.stop()
