"""A local HTTP server serving bytes we control, and a guard that keeps downloads on it.

Shared by the tests of the download machinery (``test_weights.py``, ``test_faults.py``,
``test_exact.py``).
"""

from __future__ import annotations

import dataclasses
import http.server
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter

import pytest


@dataclasses.dataclass
class Route:
    body: bytes = b""
    status: int = 200
    delay: float = 0.0  # seconds to stall before sending the status line
    chunk: int = 0  # >0: send the body in chunks of this many bytes ...
    chunk_sleep: float = 0.0  # ... sleeping this long between chunks
    content_length: int | None = None  # advertise another length (a connection dropped mid-body)
    stall_after: int | None = None  # send this many body bytes, then stall for ``delay`` seconds
    chunked: bool = False  # Transfer-Encoding: chunked (with ``chunk``-sized chunks)
    drop_after: int | None = None  # chunked only: hang up after this many body bytes, no last chunk


class LocalServer:
    """``ThreadingHTTPServer`` on 127.0.0.1:0 serving ``routes``; counts and times GET requests."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.hits: Counter[str] = Counter()
        self.spans: list[tuple[float, float]] = []  # (start, end) monotonic times of served GETs
        self.release = threading.Event()  # set at teardown: ends every stall at once
        self._lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep pytest's output clean
                pass

            def do_GET(self) -> None:  # noqa: N802
                t0 = time.monotonic()
                with server._lock:
                    server.hits[self.path] += 1
                route = server.routes.get(self.path)
                try:
                    if route is None:
                        self._plain(404, b"not found")
                        return
                    if route.delay and route.stall_after is None:
                        server.release.wait(route.delay)
                    if route.status != 200:
                        self._plain(route.status, b"error body")
                        return
                    body = route.body
                    self.send_response(200)
                    self.send_header("Content-Type", "application/octet-stream")
                    if route.chunked:
                        self.send_header("Transfer-Encoding", "chunked")
                        self.end_headers()
                        end = len(body) if route.drop_after is None else route.drop_after
                        step = route.chunk or len(body)
                        for i in range(0, end, step):
                            piece = body[i : min(i + step, end)]
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                        if route.drop_after is None:
                            self.wfile.write(b"0\r\n\r\n")
                        self.wfile.flush()
                        return
                    length = len(body) if route.content_length is None else route.content_length
                    self.send_header("Content-Length", str(length))
                    self.end_headers()
                    if route.stall_after is not None:
                        self.wfile.write(body[: route.stall_after])
                        self.wfile.flush()
                        server.release.wait(route.delay)
                        return
                    step = route.chunk or len(body) or 1
                    for i in range(0, len(body), step):
                        self.wfile.write(body[i : i + step])
                        self.wfile.flush()
                        if route.chunk_sleep:
                            time.sleep(route.chunk_sleep)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout tests)
                finally:
                    with server._lock:
                        server.spans.append((t0, time.monotonic()))

            def _plain(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        class Server(http.server.ThreadingHTTPServer):
            def handle_error(self, request: object, client_address: object) -> None:
                pass  # a client that hung up is part of these tests, not an error

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def url(self, path: str) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}{path}"

    def serve(self, path: str, **kw: object) -> str:
        self.routes[path] = Route(**kw)  # type: ignore[arg-type]
        return self.url(path)

    def start(self) -> LocalServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail (rather than reach the internet) if anything downloads from a non-local URL."""
    real = urllib.request.urlopen

    def guarded(req, *args, **kwargs):  # type: ignore[no-untyped-def]
        url = req.full_url if isinstance(req, urllib.request.Request) else str(req)
        host = urllib.parse.urlsplit(url).hostname
        assert host == "127.0.0.1", f"a test tried to download {url}"
        return real(req, *args, **kwargs)

    monkeypatch.setattr(urllib.request, "urlopen", guarded)
