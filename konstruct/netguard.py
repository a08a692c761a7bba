"""Which hosts and addresses the platform may reach on a tenant's behalf (web_fetch, a tenant's LLM endpoint).

A customer must not aim the worker, with its network position, at internal services: names are
resolved once and every address judged, so a name cannot resolve to a public address for the check
and a private one for the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections.abc import Sequence

from konstruct.errors import KonstructError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


class AddressError(KonstructError):
    """A host name that does not resolve."""


def normalise_host(host: str) -> str:
    """Lower case, no trailing dot, no IPv6 brackets, international names as punycode."""
    host = host.strip().lower().rstrip(".").removeprefix("[").removesuffix("]")
    if not host.isascii():
        with contextlib.suppress(UnicodeError):
            host = ".".join(label if label == "*" else label.encode("idna").decode("ascii") for label in host.split("."))
    return host


def host_allowed(host: str, allowed_hosts: Sequence[str]) -> bool:
    """Whether ``host`` is on the allow-list: an exact entry, or ``*.example.com`` for any name under example.com (not the apex)."""
    host = normalise_host(host)
    for entry in map(normalise_host, allowed_hosts):
        if entry == host or (entry.startswith("*.") and len(entry) > 2 and host.endswith(entry[1:])):
            return True
    return False


def is_public(address: IPAddress) -> bool:
    """Whether an address is a public unicast one (IPv4-mapped, NAT64 and 6to4 IPv6 addresses judged by their IPv4 part)."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return is_public(address.ipv4_mapped)
        if address in _NAT64:
            return is_public(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
        if address.sixtofour is not None and not is_public(address.sixtofour):
            return False
    return address.is_global and not (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
    )


async def resolve(host: str, port: int) -> list[IPAddress]:
    """The addresses ``host`` resolves to, in the resolver's order, without duplicates."""
    if is_ip(host):
        return [ipaddress.ip_address(host)]
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise AddressError(f"could not resolve {host}: {exc}") from None
    addresses: list[IPAddress] = []
    for *_, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%")[0])
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise AddressError(f"could not resolve {host}")
    return addresses


async def private_address(host: str, port: int) -> IPAddress | None:
    """The first private or reserved address ``host`` resolves to (None: all public); AddressError if it resolves to
    nothing. For checks made before a URL is stored."""
    return next((address for address in await resolve(host, port) if not is_public(address)), None)


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
