"""Where llmos may connect when it moves models to or from another server: no SSRF through transfers.

Contract: :func:`check_target` takes the URL a user gave (``http(s)://host[:port][/prefix]``), refuses anything that
is not a plain http(s) URL (other schemes, credentials in the URL, query strings, fragments, no host), resolves the
host with ``getaddrinfo`` and refuses it when *any* address it resolves to is not a public unicast address: loopback,
private (10/8, 172.16/12, 192.168/16, fc00::/7), link-local (169.254/16 with the cloud metadata address
169.254.169.254, fe80::/10), shared (100.64/10), unspecified, multicast, reserved or documentation ranges, also when
wrapped in an IPv6 form (IPv4-mapped, 6to4, NAT64, Teredo). ``allow_private`` lifts the address rule (never the URL
rules). The check needs no connection: IP literals are judged as written, names are only resolved. It returns a
:class:`Target` pinned to the first checked address, so that a DNS answer that changes between the check and the
connection (DNS rebinding) cannot redirect the transfer; clients connect to ``Target.connect_url`` with the original
``Host`` header (and TLS server name). Redirects are never followed by the transfer client.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from llmos.errors import InvalidInputError, PermissionDeniedError

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Sequence[str]]
"""``(host, port) -> addresses`` as text; the default asks the system resolver (getaddrinfo)."""

ALLOW_HINT = "pass --allow-private (or set LLMOS_TRANSFER_ALLOW_PRIVATE=1) to allow it on purpose"
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


@dataclass(frozen=True)
class Target:
    """A checked remote server: the URL as given, and the address the transfer connects to."""

    url: str
    """Normalised base URL (scheme://host[:port][/prefix], no trailing slash)."""
    scheme: str
    host: str
    port: int
    prefix: str
    address: str
    """The checked IP address connections go to."""

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        shown = f"[{self.host}]" if ":" in self.host else self.host
        return shown if self.port == default else f"{shown}:{self.port}"

    @property
    def connect_url(self) -> str:
        """Base URL with the checked address in place of the host name."""
        shown = f"[{self.address}]" if ":" in self.address else self.address
        return f"{self.scheme}://{shown}:{self.port}{self.prefix}"


def system_resolver(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise InvalidInputError(f"cannot resolve the host {host!r}: {exc}", param="url") from exc
    return [str(info[4][0]) for info in infos]


def _embedded(address: Address) -> list[Address]:
    """The address plus any IPv4 address it carries (IPv4-mapped, 6to4, NAT64, Teredo)."""
    found: list[Address] = [address]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            found.append(address.ipv4_mapped)
        if address.sixtofour is not None:
            found.append(address.sixtofour)
        if address.teredo is not None:
            found.extend(address.teredo)
        if address in _NAT64:
            found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return found


def why_not_public(address: Address) -> str | None:
    """Why ``address`` is not a public unicast address (``None`` when it is)."""
    for candidate in _embedded(address):
        if candidate.is_loopback:
            return "a loopback address"
        if candidate.is_link_local:
            return "a link-local address (cloud metadata services live there)"
        if candidate.is_unspecified:
            return "the unspecified address"
        if candidate.is_multicast:
            return "a multicast address"
        if candidate.is_private:
            return "a private-network address"
        if candidate.is_reserved or not candidate.is_global:
            return "a reserved or non-public address"
    return None


def parse_url(url: str) -> tuple[str, str, int, str]:
    """``(scheme, host, port, prefix)`` of a server URL, or :class:`InvalidInputError` naming what is wrong."""
    if not isinstance(url, str) or not url or len(url) > 2048 or any(c.isspace() for c in url):
        raise InvalidInputError("the server URL is empty, too long or contains whitespace", param="url")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InvalidInputError(f"invalid server URL {url!r}: {exc}", param="url") from exc
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise InvalidInputError(f"refusing {url!r}: only http:// and https:// servers are supported", param="url")
    if parts.username is not None or parts.password is not None:
        raise InvalidInputError("the server URL must not contain credentials; use --api-key", param="url")
    if parts.query or parts.fragment:
        raise InvalidInputError("the server URL must not contain a query string or fragment", param="url")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise InvalidInputError(f"the server URL {url!r} has no host", param="url")
    prefix = parts.path.rstrip("/")
    return scheme, host, port or (443 if scheme == "https" else 80), prefix


def check_target(url: str, *, allow_private: bool = False, resolve: Resolver | None = None) -> Target:
    """Validate ``url`` and its addresses (see the module docstring); raise before any connection is made."""
    scheme, host, port, prefix = parse_url(url)
    try:
        literal: Address | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        addresses: list[Address] = [literal]
    else:
        answers = (resolve or system_resolver)(host, port)
        addresses = []
        for answer in answers:
            try:
                addresses.append(ipaddress.ip_address(answer.split("%", 1)[0]))
            except ValueError:
                continue
        if not addresses:
            raise InvalidInputError(f"the host {host!r} resolves to no usable address", param="url")
    if not allow_private:
        for address in addresses:
            reason = why_not_public(address)
            if reason is not None:
                via = "" if literal is not None else f" (it resolves to {address})"
                raise PermissionDeniedError(f"refusing to connect to {host}{via}: it is {reason}; {ALLOW_HINT}")
    shown = f"[{host}]" if ":" in host else host
    default = 443 if scheme == "https" else 80
    base = f"{scheme}://{shown}{'' if port == default else f':{port}'}{prefix}"
    return Target(base, scheme, host, port, prefix, str(addresses[0]))
