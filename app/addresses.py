"""Which network addresses an image URL may reach (the SSRF policy of app/fetch.py), as pure functions of addresses.

A fetch is allowed to reach an address that is public (globally routable unicast), or one an operator names in
``LRAEE_IMAGE_URL_ALLOW_HOSTS`` (a CIDR or single address, or a hostname: what that name resolves to). Everything
else is refused: loopback, private, link-local, multicast, reserved, unspecified, shared (CGNAT), documentation and
benchmarking ranges, in IPv4 and IPv6, including an IPv4 address inside an IPv6 one (mapped ``::ffff:a.b.c.d``,
compatible ``::a.b.c.d``, 6to4, Teredo, NAT64), which is judged as the IPv4 address it carries.

Host spellings are read the way the C resolver reads them (``inet_aton``): ``2130706433``, ``0x7f.1`` and
``0177.0.0.1`` are all 127.0.0.1, so a numeric host is classified without asking DNS and cannot slip past as a name.
The check is always made on the address that is then connected to (see app/fetch.py), never on the URL's text.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_HOSTNAME = re.compile(r"^(?=.{1,253}\.?$)[a-z0-9_](?:[a-z0-9_-]{0,62})(?:\.[a-z0-9_](?:[a-z0-9_-]{0,62}))*\.?$", re.I)
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


def _loose_ipv4_part(text: str) -> int | None:
    """One part of an ``inet_aton`` address: decimal, octal (leading 0) or hex (0x); None when it is none of them."""
    if not text:
        return None
    try:
        if text[:2].lower() == "0x":
            return int(text[2:], 16) if text[2:] else 0
        if len(text) > 1 and text[0] == "0":
            return int(text[1:], 8)
        return int(text, 10) if text.isdigit() else None
    except ValueError:
        return None


def loose_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """``host`` read as ``inet_aton`` reads it (1 to 4 parts, each decimal, octal or hex; the last part fills the
    remaining bytes), or None when it is no such spelling."""
    parts = host.split(".")
    if not 1 <= len(parts) <= 4:
        return None
    numbers = [_loose_ipv4_part(part) for part in parts]
    if any(number is None for number in numbers):
        return None
    values = [number for number in numbers if number is not None]
    *leading, last = values
    if any(value > 0xFF for value in leading) or last >= 1 << (8 * (5 - len(values))):
        return None
    address = 0
    for value in leading:
        address = address << 8 | value
    return ipaddress.IPv4Address(address << (8 * (5 - len(values))) | last)


def ip_literal(host: str) -> IPAddress | None:
    """The address a URL host spells directly (IPv6 with or without brackets, any IPv4 spelling), else None (a name
    to resolve). An IPv6 zone (``fe80::1%eth0``) is no address here: it names an interface, never a public host."""
    text = host.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if ":" in text:
        if "%" in text:
            return None
        try:
            return ipaddress.IPv6Address(text)
        except ValueError:
            return None
    return loose_ipv4(text)


def unwrap(address: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address as the IPv4 address it is (a socket to it reaches that IPv4 host)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address carries and may be routed to (compatible, 6to4, Teredo, NAT64)."""
    found = []
    if address in _IPV4_COMPATIBLE and int(address) > 1:
        found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    if address.sixtofour is not None:
        found.append(address.sixtofour)
    if address.teredo is not None:
        found.extend(address.teredo)
    if any(address in network for network in _NAT64):
        found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return found


def is_public(address: IPAddress) -> bool:
    """Whether ``address`` is a globally routable unicast address, judging an IPv4 address carried inside an IPv6
    one as that IPv4 address."""
    address = unwrap(address)
    if (
        not address.is_global
        or address.is_multicast
        or address.is_loopback
        or address.is_private
        or address.is_link_local
        or address.is_reserved
        or address.is_unspecified
    ):
        return False
    if isinstance(address, ipaddress.IPv6Address):
        if address.is_site_local:
            return False
        return all(is_public(inner) for inner in _embedded_ipv4(address))
    return True


def is_host_or_network(entry: str) -> bool:
    """Whether an allow-list entry is a CIDR or address, or a hostname."""
    try:
        ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return bool(_HOSTNAME.match(entry))
    return True


class AddressPolicy:
    """The allow-list (``LRAEE_IMAGE_URL_ALLOW_HOSTS``) and the rule for everything else: public addresses only."""

    def __init__(self, allow: Iterable[str]) -> None:
        self.networks: list[IPNetwork] = []
        self.hostnames: list[str] = []  # lower-cased, no trailing dot: what they resolve to is allowed
        for entry in allow:
            try:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                if not _HOSTNAME.match(entry):
                    raise ValueError(f"{entry!r} is neither a hostname nor an IP address or CIDR") from None
                self.hostnames.append(entry.lower().rstrip("."))

    def allows(self, address: IPAddress, named: Iterable[IPAddress] = ()) -> bool:
        """Whether a fetch may connect to ``address``: public, or inside an allowed network, or one of ``named``
        (what the allow-listed hostnames resolve to right now)."""
        address = unwrap(address)
        if any(address.version == network.version and address in network for network in self.networks):
            return True
        if any(address == unwrap(other) for other in named):
            return True
        return is_public(address)
