"""Node URLs, addresses and networks: the canonical form of a node's URL, a control plane's
allow-list, and the bind addresses (``0.0.0.0``, ``::``) engines put in the URLs they register.
Pure functions, except ``host_addresses`` which asks the resolver about a host name."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from urllib.parse import urlsplit, urlunsplit

from django.core.exceptions import ValidationError

from .masking import mask_credentials

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def normalize_node_url(value: str) -> str:
    """Return the canonical form of a node's base URL, or raise ``ValidationError``.

    Scheme and host are lower-cased, the scheme is kept (http or https), a trailing slash is
    removed, and query strings or fragments are refused: a node is addressed by its base URL.
    """
    if not isinstance(value, str) or not value.strip():
        raise ValidationError("Enter the node's base URL, for example http://10.0.0.5:8000.", code="required")
    raw = value.strip()
    shown = mask_credentials(raw)  # error messages never echo a password
    try:
        parts = urlsplit(raw)
        port = parts.port  # raises ValueError for a port out of range or not a number
    except ValueError as exc:
        raise ValidationError(f"{shown!r} is not a valid URL ({mask_credentials(str(exc))}).", code="invalid") from None
    scheme = parts.scheme.lower()
    if scheme not in {"http", "https"}:
        raise ValidationError(f"{shown!r} must start with http:// or https://.", code="invalid_scheme")
    if not parts.hostname:
        raise ValidationError(f"{shown!r} has no host.", code="invalid_host")
    if parts.query or parts.fragment:
        raise ValidationError(f"{shown!r} must not carry a query string or fragment.", code="invalid")
    if parts.username or parts.password:
        raise ValidationError(f"{shown!r} must not carry credentials.", code="invalid")
    host = parts.hostname.lower()
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    netloc = f"{host}:{port}" if port is not None else host
    path = parts.path.rstrip("/")
    return f"{scheme}://{netloc}{path}"


def parse_network(value: str) -> IPNetwork:
    """``10.0.0.0/8``, ``fd00::/8`` or a single address (a /32 or /128); ``ValueError`` otherwise.
    Host bits are allowed (``10.1.2.3/8`` means ``10.0.0.0/8``)."""
    return ipaddress.ip_network(value.strip(), strict=False)


def parse_address(value: str) -> IPAddress | None:
    """An IP address from a URL host or a socket peer (``[::1]``, ``::ffff:10.0.0.5`` as
    ``10.0.0.5``); ``None`` when ``value`` is a host name."""
    try:
        address = ipaddress.ip_address(value.strip().strip("[]"))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def host_addresses(host: str) -> list[IPAddress]:
    """The addresses ``host`` stands for: itself when it is an IP address, else what the resolver
    answers now (empty when it cannot be resolved)."""
    literal = parse_address(host)
    if literal is not None:
        return [literal]
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return []
    found: list[IPAddress] = []
    for *_, sockaddr in infos:
        address = parse_address(str(sockaddr[0]).split("%", 1)[0])
        if address is not None and address not in found:
            found.append(address)
    return found


def in_networks(address: IPAddress, networks: Iterable[IPNetwork]) -> bool:
    return any(address.version == network.version and address in network for network in networks)


def is_unspecified(host: str) -> bool:
    """``0.0.0.0`` or ``::``: an address a server binds to, never one another host can reach."""
    address = parse_address(host)
    return address is not None and address.is_unspecified


def url_host(url: str) -> str:
    return urlsplit(url).hostname or ""


def with_host(url: str, host: str) -> str:
    """``url`` with its host replaced by ``host`` (bracketed when IPv6), keeping scheme, port and path."""
    parts = urlsplit(url)
    shown = f"[{host}]" if ":" in host else host
    netloc = f"{shown}:{parts.port}" if parts.port is not None else shown
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
