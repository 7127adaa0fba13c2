"""Node URLs, addresses and networks: the canonical form of a node's URL, a control plane's
allow-list, and the bind addresses (``0.0.0.0``, ``::``) engines put in the URLs they register.
Pure functions, except ``host_addresses`` which asks the resolver about a host name."""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable
from urllib.parse import urlsplit, urlunsplit

from django.core.exceptions import ValidationError

from .masking import mask_credentials

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


# A host name's labels. Underscores are not in the DNS's host name rules, but Docker and Kubernetes
# service names carry them and resolvers accept them.
_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")
# A host made only of these parts is an IPv4 address to the C resolver (inet_aton), however short.
_NUMBER = re.compile(r"^(?:0x[0-9a-f]*|[0-9]+)$")
# What a URL's path may hold without percent-encoding (RFC 3986's pchar and "/").
_PATH = re.compile(r"^[A-Za-z0-9._~!$&'()*+,;=:@%/-]*$")
_DEFAULT_PORTS = {"http": 80, "https": 443}
# RFC 6761: localhost is the loopback address and is never looked up; 127.0.0.1 is how it is written.
LOCALHOST = "127.0.0.1"


def _ipv4_from_numbers(host: str) -> str:
    """A numeric IPv4 spelling (``127.1``, ``2130706433``, ``0x7f.0.0.1``: the forms inet_aton
    reads, which the resolver and so every HTTP client reach) as a dotted quad; ``ValueError``."""
    parts = host.split(".")
    if len(parts) > 4:
        raise ValueError("an IPv4 address has at most four parts")
    numbers: list[int] = []
    for part in parts:
        if part.startswith("0x"):
            if part == "0x":
                raise ValueError("0x needs hexadecimal digits after it")
            numbers.append(int(part, 16))
        elif len(part) > 1 and part.startswith("0"):
            # inet_aton reads 010 as octal (8): refused rather than guessed at.
            raise ValueError(f"{part} has a leading zero, which makes it octal to the resolver; write it without")
        else:
            numbers.append(int(part))
    *head, last = numbers
    if any(n > 255 for n in head) or last >= 256 ** (4 - len(head)):
        raise ValueError("a part is out of range")
    value = last
    for index, n in enumerate(head):
        value += n << (8 * (3 - index))
    return str(ipaddress.IPv4Address(value))


def canonical_host(host: str) -> str:
    """The one spelling of a node's host, so that one backend is one node; ``ValueError`` when
    ``host`` is not a host.

    Literal addresses are rewritten to their standard form: every IPv4 spelling inet_aton reads as
    a dotted quad, an IPv4-mapped IPv6 address (``::ffff:127.0.0.1``) as that IPv4 address, other
    IPv6 addresses compressed. ``localhost`` is ``127.0.0.1`` (RFC 6761 makes it the loopback
    address without a lookup; an engine listening on ``::1`` only is given as ``[::1]``). Other
    names are kept as written, lower-cased and without a trailing dot: they are never resolved
    here. A name is the operator's choice of identity (DNS may move it, a proxy in front may serve
    several names on one address), so two names are two nodes.
    """
    host = host.lower().removesuffix(".")
    if not host:
        raise ValueError("the host is empty")
    if ":" in host:
        address, _, zone = host.partition("%")
        parsed = ipaddress.IPv6Address(address)
        if parsed.ipv4_mapped is not None and not zone:
            return str(parsed.ipv4_mapped)
        if zone and not _LABEL.match(zone.removeprefix("25")):
            raise ValueError("the IPv6 zone is not a network interface name")
        return f"[{parsed.compressed}{'%25' + zone.removeprefix('25') if zone else ''}]"
    labels = host.split(".")
    if all(_NUMBER.match(label) for label in labels):
        return _ipv4_from_numbers(host)
    if len(host) > 253 or not all(_LABEL.match(label) for label in labels):
        raise ValueError("a host name is letters, digits, hyphens and dots")
    return LOCALHOST if host == "localhost" else host


def normalize_node_url(value: object) -> str:
    """Return the canonical form of a node's base URL, or raise ``ValidationError``.

    The scheme is http or https; the host is in its one spelling (``canonical_host``); the port is
    left out when it is the scheme's default; a trailing slash is removed. Credentials, query
    strings, fragments, spaces, control characters and anything a URL must percent-encode are
    refused: a node is addressed by its base URL, and the URL shows up in logs, metrics and pages.
    """
    if not isinstance(value, str) or not value.strip():
        raise ValidationError("Enter the node's base URL, for example http://10.0.0.5:8000.", code="required")
    raw = value.strip()
    shown = mask_credentials(raw)  # error messages never echo a password
    if not raw.isprintable() or any(char.isspace() for char in raw) or not raw.isascii():
        shown = shown.encode("ascii", "backslashreplace").decode("ascii")
        raise ValidationError(
            f"'{shown}' holds a space, a control character or a character a URL must percent-encode "
            "(a host name in another script is written in its xn-- form).",
            code="invalid",
        )
    try:
        parts = urlsplit(raw)
        port = parts.port  # raises ValueError for a port out of range or not a number
    except ValueError as exc:
        raise ValidationError(f"{shown!r} is not a valid URL ({mask_credentials(str(exc))}).", code="invalid") from None
    scheme = parts.scheme.lower()
    if scheme not in {"http", "https"}:
        raise ValidationError(f"{shown!r} must start with http:// or https://.", code="invalid_scheme")
    if parts.username or parts.password:
        raise ValidationError(f"{shown!r} must not carry credentials.", code="invalid")
    if not parts.hostname:
        raise ValidationError(f"{shown!r} has no host.", code="invalid_host")
    if parts.query or parts.fragment or "?" in raw or "#" in raw:
        raise ValidationError(f"{shown!r} must not carry a query string or fragment.", code="invalid")
    if port == 0:
        raise ValidationError(f"{shown!r}: port 0 is not a port a server listens on.", code="invalid")
    if not _PATH.match(parts.path):
        raise ValidationError(f"{shown!r}: percent-encode the path's special characters.", code="invalid")
    try:
        host = canonical_host(parts.hostname)
    except ValueError as exc:
        raise ValidationError(f"{shown!r} has no usable host: {exc}.", code="invalid_host") from None
    netloc = host if port in (None, _DEFAULT_PORTS[scheme]) else f"{host}:{port}"
    return f"{scheme}://{netloc}{parts.path.rstrip('/')}"


def validate_node_url(value: object) -> str:
    """``normalize_node_url``, refusing a bind address as well (``0.0.0.0``, ``::``): what every
    interface stores. (DLRouter's ``/nodes/add`` and the registration URL first replace a bind
    address with the caller's address, as LMDeploy registers with one.)"""
    url = normalize_node_url(value)
    host = url_host(url)
    if is_unspecified(host):
        raise ValidationError(
            f"{host} is an address a server binds to, not one RouterPanel can reach; give the engine's address "
            "(the /nodes/add and registration endpoints use the caller's address).",
            code="unspecified",
        )
    return url


def clean_networks(value: object) -> list[str]:
    """A control plane's allow-list: a list of networks (``10.0.0.0/8``, ``fd00::/8``, or an address),
    each in its standard form, without repeats; ``ValidationError`` otherwise."""
    message = 'Give a list of networks, e.g. ["10.0.0.0/8", "fd00::/8"] (empty allows any address).'
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValidationError(message, code="invalid")
    networks: list[str] = []
    for item in value:
        try:
            network = str(parse_network(item))
        except ValueError:
            shown = item.encode("ascii", "backslashreplace").decode("ascii")
            raise ValidationError(f"{shown!r} is not a network. {message}", code="invalid") from None
        if network not in networks:
            networks.append(network)
    return networks


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
