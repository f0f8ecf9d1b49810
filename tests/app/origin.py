"""A real HTTP(S) origin on loopback for image-URL tests: redirect chains, a slow body, a huge body, the wrong type.

Runs ``http.server`` on a thread, bound to 127.0.0.1 (never another address); records each request's path and
headers so tests can see what the fetcher sent (Host, cookies, credentials).
"""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from . import imagegen

IMAGE = imagegen.png((32, 32))
HUGE_BYTES = 3 * 1024 * 1024


@dataclass
class Origin:
    """A running origin: its port and what it has been asked."""

    port: int
    scheme: str = "http"
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)  # (path, headers)
    stop: threading.Event = field(default_factory=threading.Event)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"


def _handler(origin: Origin) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            return

        def _send(self, status: int, body: bytes, kind: str, **headers: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            for name, value in headers.items():
                self.send_header(name.replace("_", "-"), value)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            origin.requests.append((self.path, {name.lower(): value for name, value in self.headers.items()}))
            path, _, query = self.path.partition("?")
            if path == "/cat.png":
                self._send(200, IMAGE, "image/png")
            elif path == "/octet":
                self._send(200, IMAGE, "application/octet-stream")
            elif path == "/page.html":
                self._send(200, b"<html>not an image</html>", "text/html; charset=utf-8")
            elif path == "/missing":
                self._send(404, b"no", "text/plain")
            elif path.startswith("/hops/"):  # /hops/N: N redirects, then the image
                left = int(path.rsplit("/", 1)[1])
                if left == 0:
                    self._send(200, IMAGE, "image/png")
                else:
                    self._send(302, b"", "text/plain", Location=f"/hops/{left - 1}", Set_Cookie="session=1; Path=/")
            elif path == "/redirect":  # ?to=<absolute or relative URL>
                target = query.removeprefix("to=")
                self._send(302, b"", "text/plain", Location=target)
            elif path == "/huge":  # declares nothing, sends more than the cap
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Connection", "close")
                self.end_headers()
                chunk = b"\0" * 65536
                try:
                    for _ in range(HUGE_BYTES // len(chunk) + 1):
                        self.wfile.write(chunk)
                except OSError:
                    return
            elif path == "/huge-declared":
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(HUGE_BYTES))
                self.send_header("Connection", "close")
                self.end_headers()
            elif path == "/slow":  # a byte every 0.2 s, forever (until the test stops the origin)
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(IMAGE) * 100))
                self.end_headers()
                try:
                    while not origin.stop.wait(0.2):
                        self.wfile.write(b"\0")
                        self.wfile.flush()
                except OSError:
                    return
            elif path == "/stall":  # headers, then nothing
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", "100")
                self.end_headers()
                self.wfile.flush()
                origin.stop.wait(30)
            else:
                self._send(404, b"unknown", "text/plain")

    return Handler


@contextmanager
def serve(tls: ssl.SSLContext | None = None) -> Iterator[Origin]:
    """An origin on 127.0.0.1 and a free port (``tls``: serve https with this server context)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    origin = Origin(port=server.server_address[1], scheme="https" if tls else "http")
    server.RequestHandlerClass = _handler(origin)
    server.daemon_threads = True
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield origin
    finally:
        origin.stop.set()
        time.sleep(0.05)
        server.shutdown()
        server.server_close()
