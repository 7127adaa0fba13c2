"""Who may join, and how: a control plane's registration token, its allow-list of networks and its
approval mode. The services (``nodes.services.registration``, ``nodes.services.registry_sync``)
apply these rules to every node that joins through a control plane; see docs/architecture.md
("Who may join").

The registration token is a bearer credential carried in a URL path (engines such as LMDeploy's
``api_server --proxy-url`` send no header), so it is stored hashed, like API keys, and shown once
when issued: a copy of the database or a read-only SQL account does not hand out the right to
join. A token is 256 random bits; presented tokens are hashed and compared with every control
plane's hash in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from .choices import ApprovalMode, NodeState
from .models import ControlPlane
from .networks import IPAddress, host_addresses, in_networks, parse_address, parse_network, url_host

REGISTRATION_TOKEN_PREFIX = "rpr-"


class AdmissionRefused(Exception):
    """A node may not join: its address is outside the control plane's allow-list. The message
    says which address and which networks, for the engine's log and the operator."""


def generate_registration_token() -> str:
    return REGISTRATION_TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_registration_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def control_plane_for_token(token: str) -> ControlPlane | None:
    """The control plane whose registration token is ``token``, or ``None``.

    Every stored hash is compared (``hmac.compare_digest``, no early exit), so the time taken does
    not depend on which hash, or how much of one, matched. Control planes are few.
    """
    presented = hash_registration_token(token)
    found: int | None = None
    for pk, stored in ControlPlane.objects.exclude(registration_token_hash="").values_list(
        "pk", "registration_token_hash"
    ):
        if hmac.compare_digest(presented, stored):
            found = pk
    return ControlPlane.objects.filter(pk=found).first() if found is not None else None


def initial_state(control_plane: ControlPlane | None) -> str:
    """The state a new node of ``control_plane`` starts in: ``pending`` when an operator approves
    new nodes, else ``active``."""
    if control_plane is not None and control_plane.approval_mode == ApprovalMode.MANUAL:
        return NodeState.PENDING.value
    return NodeState.ACTIVE.value


def _outside(control_plane: ControlPlane, addresses: list[IPAddress]) -> bool:
    networks = [parse_network(n) for n in control_plane.allowed_networks]
    return not addresses or not all(in_networks(address, networks) for address in addresses)


def check_allowed(control_plane: ControlPlane, *, url: str, peer: str | None = None) -> None:
    """Raise ``AdmissionRefused`` unless the node at ``url`` (every address its host resolves to)
    and, for a registration, the address it registered from (``peer``) are inside the control
    plane's allowed networks. An empty allow-list allows any address."""
    if not control_plane.allowed_networks:
        return
    allowed = ", ".join(control_plane.allowed_networks)
    host = url_host(url)
    addresses = host_addresses(host)
    if _outside(control_plane, addresses):
        shown = ", ".join(str(a) for a in addresses) or "an address that does not resolve"
        raise AdmissionRefused(
            f"{host} ({shown}) is outside the networks control plane {control_plane.name!r} allows ({allowed})."
        )
    if peer is not None:
        address = parse_address(peer)
        if _outside(control_plane, [address] if address is not None else []):
            raise AdmissionRefused(
                f"The registration came from {peer}, outside the networks control plane "
                f"{control_plane.name!r} allows ({allowed})."
            )
