"""Which addresses an `http` agent or a notification may reach: the guard against server-side
request forgery. Pure (no database, no broker): the http runtime (workers/runtimes/http.py)
and the notifications (app/notifications, workers/notify.py) both use it.

An agent's URL is chosen by a tenant, and the worker that calls it sits inside the operator's
network, next to PostgreSQL, Redis and the cloud metadata service. So a host is refused when ANY
address it resolves to is not a public unicast address (loopback, RFC 1918 and ULA private,
link-local, CGNAT, unspecified, multicast, reserved, the metadata addresses, and IPv4-mapped or
NAT64 IPv6 forms of those), unless its name is listed in RUNYARD_HTTP_ALLOW_HOSTS.

The caller connects to the very addresses returned by `checked_addresses`, never resolving the
name again, so a DNS answer that changes between the check and the connect (DNS rebinding)
cannot move the request somewhere the check did not see.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# host, port -> the IP addresses (as text) the host resolves to.
Resolver = Callable[[str, int], list[str]]

ALLOW_SETTING = "RUNYARD_HTTP_ALLOW_HOSTS"

METADATA_ADDRESSES = frozenset(
    {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
)
SHARED_ADDRESS_SPACE = ipaddress.ip_network("100.64.0.0/10")  # CGNAT, RFC 6598
NAT64_PREFIX = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052: the low 32 bits are an IPv4 address


class AddressRefused(Exception):
    """The host resolves to an address an agent may not reach."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.hint = (
            f"an http agent may call only public addresses; to allow this host, list its name "
            f"in {ALLOW_SETTING} on the workers (comma-separated, exact host names or IPs)"
        )


class ResolutionFailed(Exception):
    """The host name does not resolve (now): a connection error, worth a retry."""


def system_resolver(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise ResolutionFailed(f"cannot resolve {host!r}: {exc}") from exc
    addresses: list[str] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        if sockaddr[0] not in addresses:
            addresses.append(sockaddr[0])
    return addresses


def refusal_reason(address: IPAddress) -> str | None:
    """Why an agent may not reach this address, or None when it is a public unicast one."""
    if address in METADATA_ADDRESSES:
        return "cloud metadata"
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or (
            ipaddress.IPv4Address(int(address) & 0xFFFFFFFF) if address in NAT64_PREFIX else None
        )
        if embedded is not None:
            reason = refusal_reason(embedded)
            return f"IPv6 form of a {reason}" if reason else None
    checks = (
        (address.is_loopback, "loopback"),
        (address.is_link_local, "link-local"),
        (address.is_unspecified, "unspecified"),
        (address.is_multicast, "multicast"),
        (isinstance(address, ipaddress.IPv4Address) and address in SHARED_ADDRESS_SPACE, "CGNAT"),
        (address.is_reserved, "reserved"),
        (address.is_private, "private"),
        # Documentation, benchmarking and other special-purpose ranges.
        (not address.is_global, "non-global"),
    )
    return next((reason for refused, reason in checks if refused), None)


def normalize_host(host: str) -> str:
    """Lower case, no trailing dot, IP literals in their canonical form (no brackets)."""
    host = host.strip().strip("[]").rstrip(".").lower()
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


def is_allowed(host: str, allow_hosts: Iterable[str]) -> bool:
    return normalize_host(host) in {normalize_host(entry) for entry in allow_hosts}


def checked_addresses(
    host: str, port: int, *, allow_hosts: Iterable[str], resolver: Resolver = system_resolver
) -> list[IPAddress]:
    """The addresses to connect to for `host`, all of them checked; AddressRefused otherwise.

    An IP literal is used as it is (no lookup). A host in `allow_hosts` skips the check (the
    operator trusts it) but is still connected to at the addresses resolved here.
    """
    name = normalize_host(host)
    try:
        addresses = [ipaddress.ip_address(name)]
    except ValueError:
        addresses = [ipaddress.ip_address(text.split("%")[0]) for text in resolver(name, port)]
    if not addresses:
        raise ResolutionFailed(f"{host!r} resolves to no address")
    if is_allowed(name, allow_hosts):
        return addresses
    for address in addresses:
        reason = refusal_reason(address)
        if reason:
            shown = host if str(address) == name else f"{host} resolves to {address}, which"
            raise AddressRefused(
                f"{shown} is a {reason} address: the request was not sent "
                f"(only hosts listed in {ALLOW_SETTING} may be non-public)"
            )
    return addresses
