"""Which network addresses an `http(s)://` adapter source may reach (SSRF guard).

Boundary: `decide_address` is pure (an address and the allowlist in, a refusal reason or None
out); `CheckedTransport` is the httpx transport that applies it. The source URI is tenant input,
and the server fetches it from inside the cluster: without this guard a tenant reads the cloud
metadata service (`169.254.169.254`), the Redis or Ray ports on localhost, or any private
service. Refused unless `allow` names them: loopback, link-local, private (RFC 1918, ULA),
shared (CGNAT), multicast, unspecified, reserved and documentation addresses, and the same
hidden inside IPv6 (IPv4-mapped, NAT64, 6to4, Teredo).

Resolve once, connect to what was checked: the transport resolves a host itself, checks every
address the resolver returned (one bad address refuses the host: a name that mixes public and
private answers is a rebinding attempt or a misconfiguration), and connects to the checked IP;
TLS still verifies the certificate against the host name. Each redirect hop opens its own
connection, so it is checked the same way. Environment proxies are not used (a proxy resolves
names itself, after our check).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import httpcore
import httpx

__all__ = [
    "AddressRefused",
    "CheckedTransport",
    "IPNetwork",
    "Resolver",
    "decide_address",
    "parse_networks",
    "system_resolver",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Sequence[str]]
"""`(host, port) -> IP address strings`; the system resolver unless a test injects another."""

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


class AddressRefused(Exception):
    """The source's host resolves to an address intake may not reach. Permanent."""


def parse_networks(specs: Iterable[str]) -> tuple[IPNetwork, ...]:
    """`["127.0.0.0/8", "10.1.2.3"]` -> networks; a bad spec raises `ValueError`."""
    return tuple(ipaddress.ip_network(s.strip(), strict=False) for s in specs)


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    return None


def _category(ip: IPAddress) -> str | None:
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_private:
        return "private"
    if not ip.is_global:  # shared (100.64/10), reserved, documentation, benchmarking...
        return "non-public"
    return None


def decide_address(ip: IPAddress, allow: Sequence[IPNetwork]) -> str | None:
    """None when intake may connect to `ip`; otherwise why not (for the refusal message).

    An address inside an `allow` network is accepted whatever its kind; an IPv6 address that
    carries an IPv4 one is judged by both.
    """
    if any(ip.version == net.version and ip in net for net in allow):
        return None
    kind = _category(ip)
    if kind is not None:
        return f"{ip} is a {kind} address"
    inner = _embedded_ipv4(ip) if isinstance(ip, ipaddress.IPv6Address) else None
    if inner is None or any(inner in net for net in allow if net.version == 4):
        return None
    inner_kind = _category(inner)
    return None if inner_kind is None else f"{ip} carries {inner}, a {inner_kind} address"


def system_resolver(host: str, port: int) -> list[str]:
    """Every address the system resolver gives for `host` (A and AAAA), in its order."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    seen: list[str] = []
    for *_, sockaddr in infos:
        address = str(sockaddr[0]).split("%", 1)[0]  # drop an IPv6 zone id
        if address not in seen:
            seen.append(address)
    return seen


class _CheckedBackend(httpcore.NetworkBackend):
    """httpcore's TCP backend, connecting only to checked addresses of the host."""

    def __init__(self, allow: Sequence[IPNetwork], resolve: Resolver) -> None:
        self._allow = tuple(allow)
        self._resolve = resolve
        self._inner = httpcore.SyncBackend()

    def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                    local_address: str | None = None,
                    socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        try:
            addresses = [ipaddress.ip_address(a) for a in self._resolve(host, port)]
        except (OSError, ValueError) as exc:  # socket.gaierror is an OSError
            raise httpcore.ConnectError(f"cannot resolve the source's host: {exc}") from exc
        if not addresses:
            raise httpcore.ConnectError("the source's host has no address")
        for ip in addresses:
            reason = decide_address(ip, self._allow)
            if reason is not None:
                raise AddressRefused(f"the source's host resolves to {reason}; adapter intake "
                                     "fetches only from public addresses unless the server's "
                                     "allowlist names this network")
        last: Exception | None = None
        for ip in addresses:  # connect to the checked addresses, never to the name again
            try:
                return self._inner.connect_tcp(str(ip), port, timeout=timeout,
                                               local_address=local_address,
                                               socket_options=socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        assert last is not None
        raise last

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        raise AddressRefused("adapter sources never use unix sockets")

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class CheckedTransport(httpx.HTTPTransport):
    """An `httpx.HTTPTransport` whose every TCP connection goes to a checked address.

    No proxy and no environment (`trust_env=False`): the name is resolved here, by this
    process, or not at all.
    """

    def __init__(self, allow: Sequence[IPNetwork] = (), resolve: Resolver = system_resolver,
                 ) -> None:
        super().__init__(trust_env=False)
        ssl_context = httpx.create_ssl_context(trust_env=False)
        # httpx offers no network_backend argument; its pool is rebuilt with ours, the same
        # settings otherwise (HTTP/1.1, httpx's default pool limits).
        self._pool = httpcore.ConnectionPool(
            ssl_context=ssl_context,
            max_connections=100,
            max_keepalive_connections=20,
            keepalive_expiry=5.0,
            network_backend=_CheckedBackend(allow, resolve),
        )
