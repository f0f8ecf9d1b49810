"""The compose load balancer for real: deploy/nginx/nginx.conf in a real nginx, with Docker's DNS played locally.

Docker's embedded DNS (127.0.0.11) answers the service name with one address per replica. Here a small DNS server on
127.0.0.11:53 answers ``lraee`` with loopback addresses (127.0.0.2, 127.0.0.3, ...) where stand-in replicas listen on
port 8000, so the test sees what scaling does: requests spread over every replica, a replica added later gets
traffic without reloading nginx, and a replica that went away or is draining (503) costs no failed request.
"""

from __future__ import annotations

import re
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from app.local_server import free_port

from .test_static import NGINX_CONFIG, SERVICE, SERVICE_PORT

pytestmark = pytest.mark.slow

DOCKER_DNS = ("127.0.0.11", 53)
RESOLVER_VALID_SECONDS = 5  # nginx.conf's `resolver ... valid=5s`


class FakeDockerDns:
    """Answers A queries for ``name`` with the current ``addresses`` (NXDOMAIN for anything else)."""

    def __init__(self, name: str, addresses: list[str]) -> None:
        self.name = name
        self.addresses = addresses
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.bind(DOCKER_DNS)
        self.socket.settimeout(0.2)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)

    def answer(self, query: bytes) -> bytes:
        """The response datagram to one query."""
        (query_id,) = struct.unpack("!H", query[:2])
        labels, offset = [], 12
        while query[offset]:
            length = query[offset]
            labels.append(query[offset + 1 : offset + 1 + length].decode())
            offset += 1 + length
        qtype, _ = struct.unpack("!HH", query[offset + 1 : offset + 5])
        question = query[12 : offset + 5]
        found = ".".join(labels).lower() == self.name
        addresses = self.addresses if found and qtype == 1 else []
        flags = 0x8180 if found else 0x8183  # response, recursion desired + available; rcode 3 = NXDOMAIN
        header = struct.pack("!HHHHHH", query_id, flags, 1, len(addresses), 0, 0)
        records = b"".join(
            struct.pack("!HHHIH", 0xC00C, 1, 1, 1, 4) + socket.inet_aton(address) for address in addresses
        )
        return header + question + records

    def serve(self) -> None:
        """Answer until stopped."""
        while not self.stopped.is_set():
            try:
                query, peer = self.socket.recvfrom(512)
            except TimeoutError:
                continue
            self.socket.sendto(self.answer(query), peer)

    def __enter__(self) -> FakeDockerDns:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stopped.set()
        self.thread.join()
        self.socket.close()


class Replica:
    """A stand-in replica on ``address``:8000 that answers every request with its own address (or 503 when draining)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.draining = False
        replica = self

        class Handler(BaseHTTPRequestHandler):
            def reply(self) -> None:
                body = address.encode()
                self.send_response(503 if replica.draining else 200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = reply

            def log_message(self, *_: object) -> None:
                pass

        self.server = ThreadingHTTPServer((address, SERVICE_PORT), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Stop answering and close the port (as a removed container would)."""
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def dns() -> Iterator[FakeDockerDns]:
    """Docker's DNS, played on 127.0.0.11:53 (needs root, and the address free)."""
    try:
        server = FakeDockerDns(SERVICE, [])
    except OSError as error:
        pytest.skip(f"cannot play Docker's DNS on {DOCKER_DNS[0]}:{DOCKER_DNS[1]} here: {error}")
    with server:
        yield server


@pytest.fixture
def replicas() -> Iterator[dict[str, Replica]]:
    """Three stand-in replicas, on 127.0.0.2-4, port 8000."""
    started: dict[str, Replica] = {}
    try:
        for address in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
            started[address] = Replica(address)
    except OSError as error:
        for replica in started.values():
            replica.stop()
        pytest.skip(f"cannot listen on {SERVICE_PORT} of the loopback addresses here: {error}")
    yield started
    for replica in started.values():
        if replica.thread.is_alive():
            replica.stop()


@pytest.fixture
def balancer(tmp_path: Path, dns: FakeDockerDns) -> Iterator[str]:
    """nginx with the project's config; its base URL.

    Changed: pid file, listen port, and one worker instead of one per core, because each worker has its own
    resolver cache and the test must know which cache answers.
    """
    nginx = shutil.which("nginx")
    if nginx is None:
        pytest.skip("no nginx binary (Debian: apt-get install nginx)")
    port = free_port()
    config = NGINX_CONFIG.read_text()
    config = re.sub(r"^pid .*;$", f"pid {tmp_path}/nginx.pid;", config, flags=re.MULTILINE)
    config = re.sub(r"listen 8080;", f"listen 127.0.0.1:{port};", config)
    config = re.sub(r"^worker_processes .*;$", "worker_processes 1;", config, flags=re.MULTILINE)
    config_path = tmp_path / "nginx.conf"
    config_path.write_text(config)
    command = [nginx, "-p", str(tmp_path), "-e", "stderr", "-c", str(config_path), "-g", "daemon off;"]
    with (tmp_path / "nginx.log").open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    if httpx.get(f"{url}/nginx-health", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert process.poll() is None, (tmp_path / "nginx.log").read_text()
                assert time.monotonic() < deadline, "nginx did not start"
                time.sleep(0.1)
            yield url
        finally:
            process.terminate()
            process.wait(timeout=10)


def spread(url: str, requests: int) -> Counter[str]:
    """How many of ``requests`` POSTs through the balancer each replica answered (all must succeed)."""
    answered: Counter[str] = Counter()
    with httpx.Client(base_url=url, timeout=5) as client:
        for _ in range(requests):
            response = client.post("/classify", content=b"{}")
            assert response.status_code == 200, response.text
            answered[response.text] += 1
    return answered


def test_balancer_follows_the_replicas_docker_dns_returns(
    dns: FakeDockerDns, replicas: dict[str, Replica], balancer: str
) -> None:
    dns.addresses = ["127.0.0.2", "127.0.0.3"]
    # Every replica gets traffic; not evenly: nginx rotates the cached DNS answer rather than counting per replica.
    first = spread(balancer, 30)
    assert set(first) == {"127.0.0.2", "127.0.0.3"}, first

    # `docker compose up --scale lraee=3`: a new address in the DNS answer, no nginx reload.
    dns.addresses = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    time.sleep(RESOLVER_VALID_SECONDS + 1)
    scaled = spread(balancer, 45)
    assert set(scaled) == set(replicas), scaled

    # A replica draining (503) and one gone while DNS still lists them: requests that hit them go to another one.
    replicas["127.0.0.2"].draining = True
    replicas["127.0.0.3"].stop()
    survived = spread(balancer, 20)
    assert set(survived) == {"127.0.0.4"}, survived

    with httpx.Client(base_url=balancer, timeout=5) as client:
        assert client.get("/metrics").status_code == 404  # per-replica metrics are Prometheus's, not the LB's
