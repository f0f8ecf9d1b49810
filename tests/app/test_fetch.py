"""Images by URL: off by default, and when on, fetched under the SSRF policy (app/fetch.py, app/addresses.py).

Every origin here is a real server on 127.0.0.1 (tests/app/origin.py); no test reaches an address outside loopback.
Other loopback addresses (127.0.0.2, ::1) appear only as what a fetch must refuse before connecting.
"""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
import time
from collections.abc import Iterator
from typing import Any

import pytest
import trustme

from app.addresses import AddressPolicy, ip_literal, is_public, loose_ipv4
from app.errors import ImageUrlFailed, ImageUrlForbidden, ImageUrlsDisabled, TooManyImageFetches
from app.fetch import ImageFetcher, ImageUrl
from app.main import create_app

from . import origin as origins
from .conftest import LABELS, running

# ---- the address policy, without any network ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),  # decimal
        ("0x7f000001", "127.0.0.1"),  # hex
        ("0177.0.0.1", "127.0.0.1"),  # octal
        ("0x7f.1", "127.0.0.1"),  # two parts, the last fills three bytes
        ("127.1", "127.0.0.1"),
        ("10.0.258", "10.0.1.2"),
        ("0", "0.0.0.0"),
    ],
)
def test_ipv4_is_read_in_every_spelling_the_resolver_accepts(host: str, address: str) -> None:
    assert loose_ipv4(host) == ipaddress.IPv4Address(address)
    assert ip_literal(host) == ipaddress.IPv4Address(address)


@pytest.mark.parametrize(
    "host", ["example.com", "1.2.3.4.5", "256.1.1.1", "08.1.1.1", "1e3", "", "a.1", "fe80::1%eth0"]
)
def test_names_and_impossible_numbers_are_not_addresses(host: str) -> None:
    assert ip_literal(host) is None


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",  # cloud metadata
        "100.64.0.1",  # shared address space (CGNAT)
        "0.0.0.0",
        "224.0.0.1",
        "240.0.0.1",
        "192.0.2.1",  # documentation
        "::1",
        "::",
        "fe80::1",
        "fc00::1",
        "ff02::1",
        "::ffff:127.0.0.1",  # IPv4-mapped
        "::ffff:10.0.0.1",
        "::127.0.0.1",  # IPv4-compatible
        "2002:7f00:1::",  # 6to4 of 127.0.0.1
        "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
    ],
)
def test_addresses_that_are_not_public_are_refused(address: str) -> None:
    assert not is_public(ipaddress.ip_address(address))
    assert not AddressPolicy([]).allows(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["93.184.215.14", "8.8.8.8", "2606:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_are_allowed(address: str) -> None:
    assert is_public(ipaddress.ip_address(address))


def test_the_allow_list_takes_cidrs_addresses_and_what_names_resolve_to() -> None:
    policy = AddressPolicy(["10.0.0.0/8", "127.0.0.1", "images.internal"])
    assert policy.hostnames == ["images.internal"]
    assert policy.allows(ipaddress.ip_address("10.200.1.1"))
    assert policy.allows(ipaddress.ip_address("::ffff:127.0.0.1"))  # the mapped form of an allowed address
    assert not policy.allows(ipaddress.ip_address("127.0.0.2"))
    named = [ipaddress.ip_address("192.168.7.7")]
    assert policy.allows(ipaddress.ip_address("192.168.7.7"), named)
    assert not policy.allows(ipaddress.ip_address("192.168.7.8"), named)
    with pytest.raises(ValueError, match="neither a hostname"):
        AddressPolicy(["not a host!"])


# ---- through the service -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def origin() -> Iterator[origins.Origin]:
    with origins.serve() as served:
        yield served


def as_json(url: str, **fields: Any) -> dict[str, Any]:
    return {"json": {"image_url": url, "labels": LABELS, **fields}}


@pytest.mark.anyio
async def test_urls_are_refused_while_fetching_is_off(make_settings: Any, origin: origins.Origin) -> None:
    async with running(create_app(make_settings())) as client:
        for request in (
            as_json(origin.url("/cat.png")),
            as_json("file:///etc/passwd"),
            {"data": {"labels": LABELS}, "files": {"image_url": (None, origin.url("/cat.png"))}},
        ):
            response = await client.post("/classify", **request)
            assert response.status_code == 400, response.text
            assert response.json()["error"]["code"] == "image_urls_disabled"
    assert origin.requests == []


@pytest.mark.anyio
async def test_an_allow_listed_loopback_image_is_classified(make_settings: Any, origin: origins.Origin) -> None:
    app = create_app(make_settings(image_urls=True, image_url_allow_hosts=("127.0.0.1",)))
    async with running(app) as client:
        by_json = await client.post("/classify", **as_json(origin.url("/cat.png")))
        by_form = await client.post(
            "/classify", data={"labels": LABELS}, files={"image_url": (None, origin.url("/octet"))}
        )
        by_hops = await client.post("/classify", **as_json(origin.url("/hops/3")))  # three redirects: the most
        spelled = await client.post("/classify", **as_json(f"http://2130706433:{origin.port}/cat.png"))
        too_many = await client.post("/classify", **as_json(origin.url("/hops/4")))
    for response in (by_json, by_form, by_hops, spelled):
        assert response.status_code == 200, response.text
        assert response.json()["predictions"][0]["label"] in LABELS
    assert too_many.status_code == 422 and too_many.json()["error"]["code"] == "image_url_failed"
    assert "more than 3" in too_many.json()["error"]["message"]
    hops = [headers for path, headers in origin.requests if path.startswith("/hops/") or path == "/cat.png"]
    assert hops and all("cookie" not in headers and "authorization" not in headers for headers in hops)
    assert all(headers["host"] in (f"127.0.0.1:{origin.port}", f"2130706433:{origin.port}") for headers in hops)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("url", "status", "code", "message"),
    [
        ("file:///etc/passwd", 403, "image_url_forbidden", "http or https"),
        ("ftp://127.0.0.1/cat.png", 403, "image_url_forbidden", "http or https"),
        ("http://user:secret@127.0.0.1:{port}/cat.png", 403, "image_url_forbidden", "credentials"),
        ("http://127.0.0.2:{port}/cat.png", 403, "image_url_forbidden", "127.0.0.2"),
        ("http://[::1]:{port}/cat.png", 403, "image_url_forbidden", "not a public address"),
        ("http://[::ffff:127.0.0.2]:{port}/cat.png", 403, "image_url_forbidden", "not a public address"),
        ("http://0x7f.2:{port}/cat.png", 403, "image_url_forbidden", "127.0.0.2"),
        (
            "http://127.0.0.1:{port}/redirect?to=http://127.0.0.2:{port}/cat.png",
            403,
            "image_url_forbidden",
            "127.0.0.2",
        ),
        ("http://127.0.0.1:{port}/redirect?to=file:///etc/passwd", 403, "image_url_forbidden", "http or https"),
        ("http://127.0.0.1:{port}/page.html", 422, "image_url_failed", "text/html"),
        ("http://127.0.0.1:{port}/missing", 422, "image_url_failed", "HTTP 404"),
        ("http://127.0.0.1:{port}/huge", 422, "image_url_failed", "exceeds"),
        ("http://127.0.0.1:{port}/huge-declared", 422, "image_url_failed", "the limit is"),
        ("http://127.0.0.1:{port}/slow", 422, "image_url_failed", "longer than"),
        ("http://127.0.0.1:{port}/stall", 422, "image_url_failed", "stalled"),
    ],
)
async def test_refusals_name_their_reason(
    make_settings: Any, origin: origins.Origin, url: str, status: int, code: str, message: str
) -> None:
    settings = make_settings(
        image_urls=True,
        image_url_allow_hosts=("127.0.0.1",),
        max_upload_bytes=1024 * 1024,
        image_url_read_timeout_seconds=0.5,
        image_url_timeout_seconds=1.5,
    )
    async with running(create_app(settings)) as client:
        started = time.monotonic()
        response = await client.post("/classify", **as_json(url.format(port=origin.port)))
        assert time.monotonic() - started < 10
        body = response.json()["error"]
        assert (response.status_code, body["code"]) == (status, code), response.text
        assert message in body["message"]
        assert (await client.get("/readyz")).status_code == 200  # a bad origin never wedges the service


@pytest.mark.anyio
async def test_without_an_allow_list_loopback_is_refused_in_every_spelling(
    make_settings: Any, origin: origins.Origin
) -> None:
    async with running(create_app(make_settings(image_urls=True))) as client:
        for host in ("127.0.0.1", "2130706433", "0177.0.0.1", "localhost", "[::ffff:127.0.0.1]", "[::1]"):
            response = await client.post("/classify", **as_json(f"http://{host}:{origin.port}/cat.png"))
            assert response.status_code == 403, (host, response.text)
            assert response.json()["error"]["code"] == "image_url_forbidden"


@pytest.mark.anyio
async def test_huggingface_inputs_may_be_urls(make_settings: Any, origin: origins.Origin) -> None:
    app = create_app(make_settings(image_urls=True, image_url_allow_hosts=("127.0.0.1",)))
    async with running(app) as client:
        body = {"inputs": origin.url("/cat.png"), "parameters": {"candidate_labels": LABELS}}
        response = await client.post("/compat/huggingface", json=body)
        assert response.status_code == 200, response.text
        assert {item["label"] for item in response.json()} == set(LABELS)


# ---- the fetcher itself: pinned connections, TLS on the hostname, the concurrency cap ------------------------------


@pytest.mark.anyio
async def test_a_name_is_resolved_once_and_the_checked_address_is_connected_to(
    make_settings: Any, origin: origins.Origin
) -> None:
    resolved: list[str] = []

    async def resolver(host: str, port: int) -> list[Any]:
        resolved.append(host)
        return {"images.test": [ipaddress.ip_address("127.0.0.1")], "pics.test": [ipaddress.ip_address("10.9.9.9")]}[
            host
        ]

    fetcher = ImageFetcher(make_settings(image_urls=True, image_url_allow_hosts=("127.0.0.1",)), resolver=resolver)
    try:
        # images.test exists nowhere but in this resolver: the connection can only have gone to the checked address.
        [data] = await fetcher.fetch_all([ImageUrl(f"http://images.test:{origin.port}/cat.png")], batch=False)
        assert data == origins.IMAGE and resolved == ["images.test"]
        assert origin.requests[-1][1]["host"] == f"images.test:{origin.port}"
        with pytest.raises(ImageUrlForbidden, match="10.9.9.9"):
            await fetcher.fetch(f"http://pics.test:{origin.port}/cat.png")
    finally:
        await fetcher.close()
    by_name = ImageFetcher(make_settings(image_urls=True, image_url_allow_hosts=("images.test",)), resolver=resolver)
    try:  # a hostname on the allow-list allows what it resolves to
        assert await by_name.fetch(f"http://127.0.0.1:{origin.port}/cat.png") == origins.IMAGE
    finally:
        await by_name.close()


@pytest.fixture(scope="module")
def authority() -> trustme.CA:
    return trustme.CA()


@pytest.mark.anyio
async def test_https_checks_the_certificate_against_the_urls_hostname(
    make_settings: Any, authority: trustme.CA
) -> None:
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("localhost").configure_cert(server_context)  # a certificate for the name only
    client_context = ssl.create_default_context()
    authority.configure_trust(client_context)

    async def resolver(host: str, port: int) -> list[Any]:
        assert host == "localhost"
        return [ipaddress.ip_address("127.0.0.1")]

    settings = make_settings(image_urls=True, image_url_allow_hosts=("127.0.0.1",))
    fetcher = ImageFetcher(settings, resolver=resolver, ssl_context=client_context)
    try:
        with origins.serve(tls=server_context) as secure:
            # Connected to 127.0.0.1, with SNI and the certificate check on "localhost": accepted.
            assert await fetcher.fetch(secure.url("/cat.png", host="localhost")) == origins.IMAGE
            # The same server by address: the certificate names no address, so the check (on the URL's host) fails.
            with pytest.raises(ImageUrlFailed, match="could not fetch"):
                await fetcher.fetch(secure.url("/cat.png"))
    finally:
        await fetcher.close()


@pytest.mark.anyio
async def test_concurrent_fetches_are_capped(make_settings: Any, origin: origins.Origin) -> None:
    settings = make_settings(
        image_urls=True, image_url_allow_hosts=("127.0.0.1",), max_image_fetches=1, image_url_timeout_seconds=2.0
    )
    fetcher = ImageFetcher(settings)
    try:
        asked = len(origin.requests)
        held = asyncio.create_task(fetcher.fetch_all([ImageUrl(origin.url("/stall"))], batch=False))
        while not any(path == "/stall" for path, _ in origin.requests[asked:]):
            await asyncio.sleep(0.01)
        with pytest.raises(TooManyImageFetches):
            await fetcher.fetch_all([ImageUrl(origin.url("/cat.png"))], batch=False)
        with pytest.raises(ImageUrlFailed):
            await held
        assert await fetcher.fetch_all([b"bytes", ImageUrl(origin.url("/cat.png"))], batch=True) == [
            b"bytes",
            origins.IMAGE,
        ]
    finally:
        await fetcher.close()


@pytest.mark.anyio
async def test_a_disabled_fetcher_refuses_before_resolving(make_settings: Any) -> None:
    async def resolver(host: str, port: int) -> list[Any]:
        raise AssertionError("nothing may be resolved while fetching is off")

    fetcher = ImageFetcher(make_settings(), resolver=resolver)
    with pytest.raises(ImageUrlsDisabled):
        await fetcher.fetch_all([ImageUrl("http://example.com/cat.png")], batch=False)
    assert await fetcher.fetch_all([b"x"], batch=False) == [b"x"]
