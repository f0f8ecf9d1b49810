"""Images by URL (``LRAEE_IMAGE_URLS=true``), fetched as a server-side request forgery risk has to be fetched.

Off by default: a URL is then refused (``image_urls_disabled``) before anything is resolved. When on, each fetch:

* takes ``http`` and ``https`` only, and no credentials in the URL (``image_url_forbidden``);
* resolves the host itself (a numeric host in any spelling without DNS, app/addresses.py) and keeps only the
  addresses the policy allows: public ones, or those ``LRAEE_IMAGE_URL_ALLOW_HOSTS`` names (``image_url_forbidden``
  when none is left);
* connects to the address it checked, with no second resolution (the request goes to the IP; the Host header keeps
  the URL's host), and for https sends SNI and verifies the certificate against the URL's hostname;
* uses no proxy variables, ``.netrc`` or other ambient configuration, sends no cookies or credentials, keeps no
  connection for reuse (a pooled connection would be shared by names that resolve alike), and asks for no
  compression (a decompression bomb has nothing to expand);
* follows at most 3 redirects, each checked from the start like the first URL;
* refuses more than ``LRAEE_MAX_UPLOAD_BYTES`` while streaming, a declared type that is not an image, and any answer
  but 200 (``image_url_failed``), with connect, read and total timeouts;
* runs at most ``LRAEE_MAX_IMAGE_FETCHES`` at once (429 beyond), all on the event loop as network I/O, so a slow or
  failing origin holds one slot until its total timeout and never the service.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import certifi
import httpx

from .addresses import AddressPolicy, IPAddress, ip_literal
from .errors import (
    ImageUrlFailed,
    ImageUrlForbidden,
    ImageUrlsDisabled,
    TooManyImageFetches,
    first_failure_or_results,
)
from .settings import Settings

log = logging.getLogger(__name__)

MAX_REDIRECTS = 3
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
SCHEMES = {"http": 80, "https": 443}
# Declared types a fetched image may have: any image/*, and the generic binary types object stores default to.
BINARY_TYPES = frozenset({"application/octet-stream", "binary/octet-stream"})
USER_AGENT = "lraee-image-fetch/1"

# (hostname, port) -> the addresses it resolves to; app/fetch.py asks the system resolver unless a test gives one.
Resolver = Callable[[str, int], Awaitable[list[IPAddress]]]


@dataclass(frozen=True)
class ImageUrl:
    """An image given by URL in a request (fetched by :class:`ImageFetcher` before it is decoded)."""

    url: str


async def system_resolver(host: str, port: int) -> list[IPAddress]:
    """The addresses the system resolver gives ``host`` (TCP), in its order."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses: list[IPAddress] = []
    for _, _, _, _, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if address not in addresses:
            addresses.append(address)
    return addresses


@dataclass(frozen=True)
class _Target:
    """One checked hop: where to connect and what to tell the origin."""

    url: httpx.URL  # the URL with its host replaced by the checked address
    host_header: str  # the URL's own host[:port]
    server_name: str | None  # https: the hostname for SNI and the certificate check (None: an IP literal)


class ImageFetcher:
    """Fetches image URLs under the policy in the module docstring; one per app."""

    def __init__(
        self, settings: Settings, *, resolver: Resolver | None = None, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        self.enabled = settings.image_urls
        self.policy = AddressPolicy(settings.image_url_allow_hosts)
        self.max_bytes = settings.max_upload_bytes
        self.max_fetches = settings.max_image_fetches
        self.total_timeout = settings.image_url_timeout_seconds
        self.connect_timeout = settings.image_url_connect_timeout_seconds
        self._timeouts = {
            "connect": settings.image_url_connect_timeout_seconds,
            "read": settings.image_url_read_timeout_seconds,
            "write": settings.image_url_read_timeout_seconds,
            "pool": settings.image_url_connect_timeout_seconds,
        }
        self._resolve = resolver or system_resolver
        self._fetching = 0
        self._transport: httpx.AsyncHTTPTransport | None = None
        if self.enabled:
            self._transport = httpx.AsyncHTTPTransport(
                verify=ssl_context if ssl_context is not None else ssl.create_default_context(cafile=certifi.where()),
                trust_env=False,
                retries=0,
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=0),
            )

    async def fetch_all(self, images: Sequence[bytes | ImageUrl], *, batch: bool) -> list[bytes]:
        """``images`` with every URL replaced by its bytes (fetched concurrently); the first failure (lowest index)
        is raised, naming its index when ``batch``."""
        urls = [image for image in images if isinstance(image, ImageUrl)]
        if not urls:
            return [image for image in images if isinstance(image, bytes)]
        if not self.enabled:
            raise ImageUrlsDisabled(
                "images by URL are not fetched by this service (LRAEE_IMAGE_URLS is off); send the image's bytes"
            )
        if self._fetching + len(urls) > self.max_fetches:
            raise TooManyImageFetches(self.max_fetches)
        self._fetching += len(urls)
        try:
            outcomes = await asyncio.gather(*(self._bytes_of(image) for image in images), return_exceptions=True)
        finally:
            self._fetching -= len(urls)
        return first_failure_or_results(outcomes, batch=batch)

    async def _bytes_of(self, image: bytes | ImageUrl) -> bytes:
        return image if isinstance(image, bytes) else await self.fetch(image.url)

    async def fetch(self, url: str) -> bytes:
        """The bytes of one image URL (the caller has counted it against ``max_fetches``)."""
        try:
            async with asyncio.timeout(self.total_timeout):
                return await self._follow(url)
        except TimeoutError:
            raise ImageUrlFailed(f"fetching the image URL took longer than {self.total_timeout:g} s") from None

    async def _follow(self, url: str) -> bytes:
        current = self._parse(url)
        for hop in range(MAX_REDIRECTS + 1):
            target = await self._check(current)
            assert self._transport is not None
            request = httpx.Request(
                "GET",
                target.url,
                headers={
                    "Host": target.host_header,
                    "User-Agent": USER_AGENT,
                    "Accept": "image/*",
                    "Accept-Encoding": "identity",
                },
                extensions={
                    "timeout": self._timeouts,
                    **({"sni_hostname": target.server_name} if target.server_name else {}),
                },
            )
            try:
                response = await self._transport.handle_async_request(request)
            except httpx.TimeoutException:
                raise ImageUrlFailed(f"the image URL's host did not answer in time ({_shown(current)})") from None
            except httpx.HTTPError as exc:
                raise ImageUrlFailed(f"could not fetch the image URL ({_shown(current)}): {_reason(exc)}") from None
            try:
                if response.status_code in REDIRECT_STATUSES:
                    location = response.headers.get("location")
                    if not location:
                        raise ImageUrlFailed(f"the image URL redirected nowhere ({_shown(current)})")
                    if hop == MAX_REDIRECTS:
                        raise ImageUrlFailed(f"the image URL redirected more than {MAX_REDIRECTS} times")
                    current = self._parse(str(current.join(location)))
                    continue
                return await self._body(response, current)
            finally:
                await response.aclose()
        raise AssertionError("unreachable: the loop returns or raises")

    def _parse(self, url: str) -> httpx.URL:
        """A URL this service may fetch at all: http(s), a host, no credentials."""
        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, TypeError, ValueError):
            raise ImageUrlForbidden("the image URL is not a valid URL") from None
        if parsed.scheme not in SCHEMES:
            raise ImageUrlForbidden(f"image URLs must be http or https, not {parsed.scheme or '(none)'!r}")
        if not parsed.host:
            raise ImageUrlForbidden("the image URL has no host")
        if parsed.userinfo:
            raise ImageUrlForbidden("image URLs must not carry credentials (user:password@); none are forwarded")
        return parsed

    async def _check(self, url: httpx.URL) -> _Target:
        """Resolve ``url``'s host, keep the addresses the policy allows, and say how to reach the first of them."""
        host = url.host
        port = url.port or SCHEMES[url.scheme]
        literal = ip_literal(host)
        try:
            async with asyncio.timeout(self.connect_timeout):
                addresses = [literal] if literal is not None else await self._resolve(host, port)
                named = [
                    address for name in self.policy.hostnames for address in await self._resolve_quietly(name, port)
                ]
        except TimeoutError:
            raise ImageUrlFailed(f"resolving the image URL's host took too long ({host})") from None
        except OSError as exc:
            raise ImageUrlFailed(f"the image URL's host {host!r} does not resolve: {exc}") from None
        allowed = [address for address in addresses if self.policy.allows(address, named)]
        if not allowed:
            shown = ", ".join(str(address) for address in addresses) or "nothing"
            raise ImageUrlForbidden(
                f"the image URL's host {host!r} is {shown}: not a public address, and not in "
                "LRAEE_IMAGE_URL_ALLOW_HOSTS"
            )
        address = allowed[0]
        host_header = host if literal is None or literal.version == 4 else f"[{host}]"
        if url.port is not None:
            host_header = f"{host_header}:{url.port}"
        return _Target(
            url=url.copy_with(host=str(address)),
            host_header=host_header,
            server_name=host if url.scheme == "https" and literal is None else None,
        )

    async def _resolve_quietly(self, name: str, port: int) -> list[IPAddress]:
        """What an allow-listed hostname resolves to now; nothing when it does not resolve."""
        try:
            return await self._resolve(name, port)
        except OSError:
            return []

    async def _body(self, response: httpx.Response, url: httpx.URL) -> bytes:
        """The image bytes of a final answer, within the size cap, or :class:`ImageUrlFailed`."""
        if response.status_code != 200:
            raise ImageUrlFailed(f"the image URL answered HTTP {response.status_code} ({_shown(url)})")
        kind = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if kind and not kind.startswith("image/") and kind not in BINARY_TYPES:
            raise ImageUrlFailed(f"the image URL answered {kind!r}, not an image ({_shown(url)})")
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise ImageUrlFailed(f"the image URL answered {encoding!r}-encoded bytes; only identity is accepted")
        declared = response.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            raise ImageUrlFailed(f"the image URL's image is {declared} bytes; the limit is {self.max_bytes}")
        data = bytearray()
        try:
            async for chunk in response.aiter_raw():
                data += chunk
                if len(data) > self.max_bytes:
                    raise ImageUrlFailed(f"the image URL's image exceeds {self.max_bytes} bytes")
        except httpx.TimeoutException:
            raise ImageUrlFailed(f"the image URL's body stalled ({_shown(url)})") from None
        except httpx.HTTPError as exc:
            raise ImageUrlFailed(f"the image URL's body failed ({_shown(url)}): {_reason(exc)}") from None
        if not data:
            raise ImageUrlFailed(f"the image URL answered no bytes ({_shown(url)})")
        return bytes(data)

    async def close(self) -> None:
        """Close the transport (no connection is kept, so this only releases its state)."""
        if self._transport is not None:
            await self._transport.aclose()


def _shown(url: httpx.URL) -> str:
    """A URL for an error message: scheme, host and path, no query (it may hold a signature)."""
    return str(url.copy_with(query=None, fragment=None))


def _reason(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
